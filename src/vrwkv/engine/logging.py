"""Run records: ``steps.csv`` (every ``log_every`` optimizer steps), ``metrics.csv`` (one row per epoch),
TensorBoard scalars, and a one-line console summary per epoch. Only the main process writes."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("vrwkv")


def _truncate_csv(path: Path, max_step: int) -> None:
    """Drop rows with ``step > max_step``: a resumed run rewrites what the interrupted run logged after its
    last checkpoint."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0].keys()) if rows else None
    if fields is None:
        return
    keep = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) <= max_step]
    if len(keep) != len(rows):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(keep)


class RunLogger:
    """Writes metrics of a run to ``run_dir`` (CSV + TensorBoard) on the main process; no-op elsewhere.

    Args:
        run_dir: output folder of the run.
        enabled: False on non-main processes.
        tensorboard: also write TensorBoard event files (``run_dir/tb``).
        resume_step: when resuming, rows logged after this optimizer step are discarded first.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            for name in ("steps.csv", "metrics.csv"):
                _truncate_csv(self.run_dir / name, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)

    def _append_csv(self, name: str, row: dict[str, Any]) -> None:
        path = self.run_dir / name
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as f:
                fields = next(csv.reader(f))
            missing = [k for k in row if k not in fields]
            if missing:  # a new column (e.g. EMA metrics switched on at resume): rewrite with a wider header
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
                fields += missing
                with open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(rows)
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)
        else:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
                writer.writerow(row)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Training scalars at optimizer step ``step`` (e.g. loss, lr, throughput)."""
        if not self.enabled:
            return
        self._append_csv("steps.csv", {"step": step, **metrics})
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def log_epoch(self, epoch: int, step: int, metrics: dict[str, float], total_epochs: int) -> None:
        """End-of-epoch metrics: a CSV row, TensorBoard scalars (``epoch/<name>``) and a console line."""
        if not self.enabled:
            return
        self._append_csv("metrics.csv", {"epoch": epoch, "step": step, **metrics})
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"epoch/{k}", v, step)
            self.writer.flush()
        logger.info(format_epoch_line(epoch, total_epochs, metrics))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def format_epoch_line(epoch: int, total_epochs: int, m: dict[str, float]) -> str:
    """``epoch 3/30 | train loss 0.512 | val loss 0.210 top1 95.28 top5 99.72 | lr 9.1e-04 | 1520 img/s | 12.3 s``"""
    parts = [f"epoch {epoch}/{total_epochs}"]
    if "train_loss" in m:
        parts.append(f"train loss {m['train_loss']:.4f}")
    if "val_top1" in m:
        parts.append(f"val loss {m['val_loss']:.4f} top1 {m['val_top1']:.2f} top5 {m['val_top5']:.2f}")
    elif "val_loss" in m:  # a task without accuracy (MAE pre-training)
        parts.append(f"val loss {m['val_loss']:.4f}")
    if "ema_val_top1" in m:
        parts.append(f"EMA top1 {m['ema_val_top1']:.2f}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    if "train_img_per_s" in m:
        parts.append(f"{m['train_img_per_s']:.0f} img/s")
    if "epoch_time_s" in m:
        parts.append(f"{m['epoch_time_s']:.1f} s")
    if m.get("bad_images"):
        parts.append(f"{int(m['bad_images'])} bad images skipped")
    return " | ".join(parts)
