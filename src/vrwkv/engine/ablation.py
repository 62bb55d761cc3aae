"""Small-scale ablations on the bundled digits: train each variant with several seeds, tabulate mean ± std.

``shift``: the token-shift of both mixers — Q-Shift (official) vs 1-D token shift vs none.
``wkv``: the attention — bidirectional Bi-WKV (official) vs causal (uni-directional) WKV.
"""
from __future__ import annotations

import csv
import logging
import statistics
import time
from pathlib import Path

from vrwkv.engine.classification import make_config, train

logger = logging.getLogger("vrwkv")

ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "shift": ("shift_mode", ["q_shift", "token_shift", "none"]),
    "wkv": ("wkv_mode", ["bidirectional", "causal"]),
}


def run_ablation(kind: str, seeds: list[int], output_dir: str | Path, overrides: list[str] | None = None,
                 preset: str = "digits") -> Path:
    """Train every variant of ablation ``kind`` once per seed; write ``results.csv`` (one row per run),
    ``summary.csv`` and ``summary.md`` (mean ± sample std of the final val top-1) to ``output_dir``.

    Returns the path of ``summary.md``.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"unknown ablation {kind!r}; choose from {sorted(ABLATIONS)}")
    if not seeds:
        raise ValueError("give at least one seed")
    key, variants = ABLATIONS[kind]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_config(preset, list(overrides or []))  # fail fast on bad overrides, before any training
    rows = []
    for variant in variants:
        for seed in seeds:
            run_dir = out / f"{variant}-seed{seed}"
            cfg = make_config(preset, list(overrides or []) + [
                f"model.kwargs.{key}={variant}", f"run.seed={seed}", f"run.output_dir={run_dir}"])
            logger.info(f"ablation {kind}: {key}={variant}, seed {seed}")
            t0 = time.perf_counter()
            _, metrics = train(cfg, preset=preset)
            rows.append({"variant": variant, "seed": seed, "val_top1": metrics["val_top1"],
                         "val_top5": metrics["val_top5"], "val_loss": metrics["val_loss"],
                         "train_s": round(time.perf_counter() - t0, 1)})
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = []
    for variant in variants:
        top1 = [r["val_top1"] for r in rows if r["variant"] == variant]
        summary.append({"variant": variant, "runs": len(top1), "top1_mean": statistics.mean(top1),
                        "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                        "top1_min": min(top1), "top1_max": max(top1)})
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    lines = [f"# Ablation `{kind}` ({key}) on {preset}", "",
             f"Final held-out top-1 over seeds {seeds}; overrides: {' '.join(overrides or []) or '(none)'}.", "",
             f"| {key} | runs | top-1 mean ± std (%) | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {s['variant']} | {s['runs']} | {s['top1_mean']:.2f} ± {s['top1_std']:.2f} | {s['top1_min']:.2f} | "
              f"{s['top1_max']:.2f} |" for s in summary]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
