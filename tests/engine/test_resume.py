"""Kill -9 a training process mid-epoch, resume it, and compare with an uninterrupted run (bit-exact on CPU)."""
import csv
import os
import signal
import subprocess
import sys
import time

import torch

from tiny_setup import RUN, VRWKV
from vrwkv.engine.checkpoint import load_checkpoint
from vrwkv.engine.classification import make_config, train

# 22 steps per epoch: the run crosses an epoch boundary and is killed inside the first epoch
COMMON = VRWKV + RUN + ["data.batch_size=64", "run.max_steps=30", "run.ckpt_every=3", "run.deterministic=true",
                        "optim.lr=3e-3", "model.drop_path_rate=0.1"]  # drop path: the RNG streams must resume too


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vrwkv.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_kill_reaches_the_uninterrupted_weights(tmp_path):
    killed_dir = tmp_path / "killed"
    proc = _cli(COMMON + [f"run.output_dir={killed_dir}"])
    deadline = time.monotonic() + 120
    while not (killed_dir / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # as soon as the first checkpoint appears: mid-epoch, maybe mid-write
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(killed_dir / "last.pt")["loop"]  # never corrupt
    assert 3 <= at_kill["step"] < 22 and at_kill["epoch"] == 0

    resumed = _cli(["--resume", str(killed_dir)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in err

    reference_dir, _ = train(make_config("digits", COMMON + [f"run.output_dir={tmp_path / 'reference'}"]))
    a, b = load_checkpoint(killed_dir / "last.pt"), load_checkpoint(reference_dir / "last.pt")
    assert a["loop"]["step"] == b["loop"]["step"] == 30
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert _losses(killed_dir) == _losses(reference_dir)  # rows logged after the kill's checkpoint were replaced


def _losses(run_dir):
    with open(run_dir / "steps.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_ctrl_c_ends_with_a_resume_hint_not_a_traceback(tmp_path):
    run_dir = tmp_path / "interrupted"
    # the child gets the default SIGINT disposition even when pytest itself runs in the background (where the
    # shell sets SIGINT to "ignore" and children inherit it)
    proc = _cli(COMMON + [f"run.output_dir={run_dir}"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert load_checkpoint(run_dir / "last.pt")["loop"]["step"] >= 3
