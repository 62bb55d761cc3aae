"""``vrwkv plot RUN_DIR``: loss and accuracy curves of a training run, as a PNG."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run folder (holds metrics.csv / steps.csv)")
    p.add_argument("--output", "-o", help="PNG path (default: RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import user_errors

    with user_errors():
        from vrwkv.engine.plot import plot_run

        out = plot_run(args.run_dir, args.output)
    print(out)
    return 0
