import csv
import statistics

import pytest

from tiny_setup import RUN, VRWKV
from vrwkv.engine.ablation import run_ablation


def test_wkv_ablation_writes_runs_and_mean_std_tables(tmp_path):
    overrides = VRWKV + RUN + ["run.max_steps=2", "data.batch_size=64"]
    summary = run_ablation("wkv", [0, 1], tmp_path, overrides)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [("bidirectional", "0"), ("bidirectional", "1"),
                                                         ("causal", "0"), ("causal", "1")]
    cfg = (tmp_path / "causal-seed1" / "config.yaml").read_text()
    assert "wkv_mode: causal" in cfg and "seed: 1" in cfg
    with open(tmp_path / "summary.csv", newline="") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    top1 = [float(r["val_top1"]) for r in rows if r["variant"] == "causal"]
    assert float(table["causal"]["top1_mean"]) == pytest.approx(statistics.mean(top1))
    assert float(table["causal"]["top1_std"]) == pytest.approx(statistics.stdev(top1))
    text = summary.read_text()
    assert "| bidirectional | 2 |" in text and "| causal | 2 |" in text and "±" in text


def test_unknown_ablation_and_bad_overrides_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown ablation"):
        run_ablation("depth", [0], tmp_path)
    with pytest.raises(ValueError, match="unknown config key"):
        run_ablation("shift", [0], tmp_path, ["optim.nope=1"])
    assert not (tmp_path / "q_shift-seed0").exists()
