"""``vrwkv ablate shift|wkv``: small-scale ablations on the bundled digits, several seeds, mean ± std table."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["shift", "wkv"],
                   help="shift: q_shift vs token_shift vs none; wkv: bidirectional vs causal")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides applied to every run (one group), e.g. schedule.epochs=10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per variant (default: 0 1 2)")
    p.add_argument("--preset", default="digits", help="preset to ablate (default: digits)")
    p.add_argument("--output", help="output folder (default: runs/ablate-<kind>)")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from vrwkv.engine.ablation import run_ablation

        path = run_ablation(args.kind, args.seeds, args.output or f"runs/ablate-{args.kind}",
                            ["run.progress=false", *args.overrides], preset=args.preset)
    print(path.read_text(), end="")
    print(f"(tables: {path}, {path.with_name('summary.csv')}; per run: {path.with_name('results.csv')})")
    return 0
