"""seg-train / seg-eval / seg-predict end to end on a tiny adapter and a few digit scenes."""
import numpy as np
import pytest
import torch
from PIL import Image

from vrwkv.cli import main

TINY = ["model.backbone=test_vrwkv", "model.kwargs={}", "model.channels=16", "model.aux_channels=8",
        "data.scenes_train=16", "data.scenes_val=4", "data.batch_size=8", "data.eval_batch_size=4",
        "schedule.epochs=1", "schedule.warmup_epochs=0", "run.progress=false", "run.seed=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "run"
    assert main(["seg-train", "--output", str(out), "--layer-decay", "0.9", *TINY]) == 0
    return out


def test_seg_train_writes_a_resumable_run(run_dir, capsys):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["loop"]["step"] == 2 and "val_mIoU" in ckpt["metrics"] and (run_dir / "config.yaml").is_file()
    assert ckpt["config"]["classes"][0] == "background" and ckpt["config"]["optim"]["layer_decay"] == 0.9
    assert "decode_head.conv_seg.weight" in ckpt["model"] and "backbone.spm.fc1.weight" in ckpt["model"]
    # resume to a second epoch: continues from step 2
    assert main(["seg-train", "--resume", str(run_dir), "schedule.epochs=2"]) == 0
    assert torch.load(run_dir / "last.pt", weights_only=True)["loop"]["step"] == 4
    assert "final val mIoU" in capsys.readouterr().out


def test_seg_eval_and_slide(run_dir, capsys):
    assert main(["seg-eval", str(run_dir / "last.pt")]) == 0
    whole = capsys.readouterr().out
    assert whole.startswith("mIoU ") and "4 images" in whole
    assert main(["seg-eval", str(run_dir / "last.pt"), "--slide", "32", "--stride", "16"]) == 0
    assert capsys.readouterr().out.startswith("mIoU ")


def test_seg_predict_writes_mask_and_overlay(run_dir, tmp_path, capsys):
    img = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "mask.png"
    assert main(["seg-predict", str(img), "--checkpoint", str(run_dir / "last.pt"), "--out", str(out)]) == 0
    mask, overlay = Image.open(out), Image.open(tmp_path / "mask_overlay.png")
    assert mask.size == overlay.size == (72, 40) and mask.mode == "RGB"
    assert "%" in capsys.readouterr().out


def test_seg_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["seg-train", "--output", str(tmp_path / "x"), "model.neck=fpn", *TINY]) == 2
    assert "model.neck" in capsys.readouterr().err
    assert main(["seg-eval", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    ckpt = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    assert main(["seg-eval", str(ckpt)]) == 2
    assert "preset" in capsys.readouterr().err


def test_two_process_training_on_cpu(tmp_path):
    """torchrun (gloo, CPU): no SyncBN off CUDA (torch's is CUDA-only), and the validation mIoU logged by two
    processes equals a single-process seg-eval of the saved weights (BatchNorm statistics taken from rank 0)."""
    import os
    import subprocess
    import sys

    from vrwkv.engine import segmentation

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vrwkv.cli",
           "seg-train", "--output", str(out), *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    logged = torch.load(out / "last.pt", weights_only=True)["metrics"]
    single = segmentation.evaluate(segmentation.load_segmentor(out / "last.pt"))
    assert single["mIoU"] == pytest.approx(logged["val_mIoU"], abs=1e-6)
