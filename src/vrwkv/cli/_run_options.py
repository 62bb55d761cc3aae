"""Command-line options shared by the training subcommands (``train``, ``pretrain-mae``, ``seg-train``,
``det-train``): config overrides, preset, resume, and the run / schedule / data-loading flags. Kept free of heavy
imports (``vrwkv --help`` imports every subcommand's parser)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

# flag (argparse dest) -> config key it overrides, for the flags added by add_run_options
RUN_FLAGS = {
    "epochs": "schedule.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "output": "run.output_dir",
    "device": "run.device", "amp": "run.amp", "seed": "run.seed", "threads": "run.threads",
    "workers": "data.workers", "on_bad_image": "data.on_bad_image",
}


def add_run_options(p: argparse.ArgumentParser, *, default_preset: str, preset_help: str, output_help: str,
                    overrides_example: str) -> None:
    """Add the ``KEY=VALUE`` overrides, ``--preset``, ``--list-presets``, ``--resume`` and the :data:`RUN_FLAGS`
    options to a training subcommand's parser."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"config overrides, in one group before or after the options, e.g. {overrides_example}")
    p.add_argument("--preset", default=default_preset, help=f"{preset_help} (default: {default_preset}; see "
                                                            f"--list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the bundled presets and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint (default: the latest run of --preset)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch per step, summed over processes")
    p.add_argument("--lr", type=float)
    p.add_argument("--output", help=output_help)
    p.add_argument("--device", help="torch device (default: this process's GPU, else mps, else cpu)")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="CPU threads per process (run.threads)")
    p.add_argument("--workers", type=int, help="data-loading processes per training process")
    p.add_argument("--on-bad-image", choices=["skip", "error"],
                   help="unreadable images / empty class folders: skip and report, or stop (default: error)")


def collect_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """``key=value`` items of the given flags (``dest -> config key``; :data:`RUN_FLAGS` included) that were set,
    then the positional overrides (which win)."""
    items = []
    for flag, key in {**RUN_FLAGS, **flags}.items():
        value: Any = getattr(args, flag)
        if value is not None:
            items.append(f"{key}={'true' if value is True else value}")
    return items + list(args.overrides)


def resume_dir(args: argparse.Namespace, output_dir: str | None, default_output: str | Path,
               latest: Callable[[Path], Path | None]) -> Path | None:
    """The run folder ``--resume`` names: ``None`` without it, the latest run under the output folder for a bare
    ``--resume``."""
    from vrwkv.cli import CLIError

    if args.resume is None:
        return None
    if args.resume != "latest":
        return Path(args.resume)
    base = Path(output_dir or default_output)
    found = latest(base)
    if found is None:
        raise CLIError(f"no run to resume under {base}[-N] (no last.pt); give the run folder")
    return found


def set_threads(threads: int | None) -> None:
    """``--threads`` of the inference subcommands: torch's CPU thread count (unchanged if None)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
