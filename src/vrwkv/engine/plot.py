"""Loss / accuracy curves of a run folder (``steps.csv``, ``metrics.csv``) drawn to a PNG with matplotlib (Agg)."""
from __future__ import annotations

import csv
from pathlib import Path


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw training loss (per logged step and per epoch), validation loss and top-1/top-5 accuracy.

    Returns the PNG path (default ``run_dir/curves.png``). Raises ValueError if the folder has no metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    steps, epochs = _read_csv(run_dir / "steps.csv"), _read_csv(run_dir / "metrics.csv")
    if not steps and not epochs:
        raise ValueError(f"{run_dir} has no steps.csv or metrics.csv to plot (is it a training run folder?)")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps if "loss" in r], [r["loss"] for r in steps if "loss" in r],
                     lw=0.8, alpha=0.6, label="train loss (steps)")
    for key, label in (("train_loss", "train loss (epoch mean)"), ("val_loss", "val loss")):
        pts = [(r["step"], r[key]) for r in epochs if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    plotted = False
    for key, label in (("val_top1", "val top-1"), ("val_top5", "val top-5"), ("ema_val_top1", "EMA val top-1")):
        pts = [(r["epoch"], r[key]) for r in epochs if key in r]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", ms=3, label=label)
            plotted = True
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("validation accuracy")
    ax_acc.grid(alpha=0.3)
    if plotted:
        ax_acc.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(output) if output else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
