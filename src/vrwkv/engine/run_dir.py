"""Run-folder and process-state helpers shared by every training entry point (classification, MAE, segmentation,
detection): numbered run folders, finding the latest run, the saved config of a run to resume, seeding."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from vrwkv.engine.checkpoint import load_checkpoint
from vrwkv.engine.config import apply_overrides, from_dict
from vrwkv.engine.distributed import DistInfo, all_gather_objects
from vrwkv.engine.loop import LAST_CHECKPOINT

T = TypeVar("T")

__all__ = ["latest_run_dir", "new_run_dir", "resolve_run_dir", "saved_config", "seed_all", "set_deterministic"]


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Deterministic algorithms (warn-only where none exists) and no cuDNN autotuning, if ``on``."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def new_run_dir(base: Path) -> Path:
    """``base`` if it holds no run yet, else the first free ``base-1``, ``base-2``..."""
    if not (base / LAST_CHECKPOINT).exists() and not (base / "config.yaml").exists():
        return base
    i = 1
    while (base.parent / f"{base.name}-{i}").exists():
        i += 1
    return base.parent / f"{base.name}-{i}"


def latest_run_dir(base: Path) -> Path | None:
    """The most recently modified run folder ``base`` or ``base-N`` holding a ``last.pt``."""
    candidates = [p for p in [base, *base.parent.glob(f"{base.name}-*")] if (p / LAST_CHECKPOINT).is_file()]
    return max(candidates, key=lambda p: (p / LAST_CHECKPOINT).stat().st_mtime) if candidates else None


def resolve_run_dir(output_dir: str | None, default: str | Path, dist: DistInfo,
                    resume: str | Path | None) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint to resume from or None)``.

    A resumed run keeps its folder. A new run takes ``output_dir`` (or ``default``, numbered if taken, decided by
    the main process for all); an explicit ``output_dir`` that already holds a run is an error.
    """
    if resume is not None:
        return Path(resume), Path(resume) / LAST_CHECKPOINT
    base = Path(output_dir or default)
    run_dir = Path(all_gather_objects(str(new_run_dir(base)) if dist.is_main else None)[0])
    if output_dir and (run_dir / LAST_CHECKPOINT).exists():
        raise ValueError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it or choose another "
                         f"output folder")
    return run_dir, None


def saved_config(cls: type[T], run_dir: Path, overrides: list[str] | None, extra_keys: tuple[str, ...] = ("classes",),
                 required_key: str | None = None, wrong_kind: str = "") -> T:
    """The experiment config ``cls`` stored in ``run_dir/last.pt``, with ``overrides`` applied.

    Args:
        cls: the experiment dataclass.
        run_dir: the run folder.
        overrides: ``key=value`` items.
        extra_keys: entries stored beside the experiment in the checkpoint's config (class names, ...), dropped.
        required_key: an entry that runs of this kind always store (``"encoder"`` for MAE), checked.
        wrong_kind: the error's explanation when ``required_key`` is absent.

    Raises:
        ValueError: no ``last.pt``, a run of another kind, or bad overrides.
    """
    ckpt = run_dir / LAST_CHECKPOINT
    if not ckpt.is_file():
        raise ValueError(f"cannot resume: {ckpt} does not exist")
    saved = load_checkpoint(ckpt).get("config") or {}
    if required_key is not None and required_key not in saved:
        raise ValueError(f"cannot resume: {ckpt} is not {wrong_kind or 'a run of this kind'}")
    data = {k: v for k, v in saved.items() if k not in extra_keys}
    return from_dict(cls, apply_overrides(data, overrides) if overrides else data)
