"""Two CPU processes (torchrun, gloo) train the same model as one process with the same global batch."""
import csv
import os
import subprocess
import sys

from conftest import rel_err
from tiny_setup import RUN, VRWKV
from vrwkv.engine.checkpoint import load_checkpoint
from vrwkv.engine.classification import make_config, train

# SGD: Adam would turn float-rounding-level gradients (e.g. of the key bias, which softmax ignores) into full steps
COMMON = VRWKV + RUN + ["run.max_steps=8", "run.deterministic=true", "optim.opt=sgd", "optim.lr=0.1",
                        "data.batch_size=32"]


def _losses(run_dir):
    with open(run_dir / "steps.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vrwkv.cli", "train", *COMMON, f"run.output_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr

    single_dir, _ = train(make_config("digits", COMMON + [f"run.output_dir={tmp_path / 'single'}"]))
    ddp_dir = tmp_path / "ddp"
    ddp_losses, single_losses = _losses(ddp_dir), _losses(single_dir)
    assert len(ddp_losses) == len(single_losses) == 8  # one writer: no duplicated rows
    for a, b in zip(ddp_losses, single_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    a, b = load_checkpoint(ddp_dir / "last.pt"), load_checkpoint(single_dir / "last.pt")
    for k, v in b["model"].items():
        assert rel_err(a["model"][k], v) < 1e-4, k
    assert len(a["rng"]) == 2  # each process's RNG state is saved for an exact resume
    # evaluation is reduced over both processes: same metrics as one process on the whole val set
    assert abs(a["metrics"]["val_top1"] - b["metrics"]["val_top1"]) < 1e-9
    assert abs(a["metrics"]["val_loss"] - b["metrics"]["val_loss"]) < 1e-4
