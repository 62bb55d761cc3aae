"""det-train / det-eval / det-predict end to end on a tiny adapter, trained on a COCO folder written from the bundled
digit scenes (the COCO path on a real stand-in of the format), evaluated on that folder and on the scenes."""
import numpy as np
import pytest
import torch
from PIL import Image

from vrwkv.cli import main
from vrwkv.data.detection import DigitDetectionScenes, export_coco

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.backbone=test_vrwkv", "model.kwargs={}", "model.rcnn.fpn_channels=16",
        "model.rcnn.representation_size=32", "model.rcnn.mask_channels=8", "model.rcnn.rpn_post_nms_top_n_train=20",
        "model.rcnn.rpn_post_nms_top_n_test=20", "model.rcnn.box_batch_size_per_image=16", "model.rcnn.min_size=[64]",
        "data.scenes_val=4", "data.batch_size=4", "data.eval_batch_size=4", "schedule.epochs=1",
        "schedule.warmup_epochs=0", "run.progress=false", "run.seed=1"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    for split, n in (("train", 8), ("val", 4)):
        export_coco(DigitDetectionScenes(split, 64, n), root / f"{split}2017",
                    root / "annotations" / f"instances_{split}2017.json")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, coco_root):
    out = tmp_path_factory.mktemp("det") / "run"
    assert main(["det-train", "--output", str(out), "--data", str(coco_root), "--layer-decay", "0.9",
                 "--threads", "1", *TINY]) == 0
    return out


def test_det_train_writes_a_resumable_run(run_dir, capsys):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["loop"]["step"] == 2 and "val_box_AP" in ckpt["metrics"] and "val_mask_AP75" in ckpt["metrics"]
    assert ckpt["config"]["classes"] == [str(i) for i in range(10)] and ckpt["config"]["category_ids"][0] == 1
    assert ckpt["config"]["optim"]["layer_decay"] == 0.9 and ckpt["config"]["run"]["threads"] == 1
    assert "backbone.body.spm.fc1.weight" in ckpt["model"] and "roi_heads.mask_predictor.mask_fcn_logits.weight" \
        in ckpt["model"]
    assert main(["det-train", "--resume", str(run_dir), "schedule.epochs=2"]) == 0
    assert torch.load(run_dir / "last.pt", weights_only=True)["loop"]["step"] == 4
    assert "final val box AP" in capsys.readouterr().out


def test_det_eval_on_the_coco_folder_equals_the_bundled_scenes(run_dir, capsys):
    assert main(["det-eval", str(run_dir / "last.pt")]) == 0  # the run's data: the COCO folder
    on_folder = capsys.readouterr().out
    assert on_folder.startswith("box  AP ") and "\nmask AP " in on_folder and "4 images" in on_folder
    assert main(["det-eval", str(run_dir / "last.pt"), "--data", "digit_scenes"]) == 0
    on_scenes = capsys.readouterr().out
    assert on_scenes.splitlines()[:2] == on_folder.splitlines()[:2]


def test_det_predict_draws_on_the_image(run_dir, tmp_path, capsys):
    img = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "drawn.png"
    assert main(["det-predict", str(img), "--checkpoint", str(run_dir / "last.pt"), "--out", str(out),
                 "--score-thresh", "0", "--scale", "2", "--threads", "1"]) == 0
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == (80, 144, 3)  # enlarged twice
    text = capsys.readouterr().out
    n = int(text.split(": ")[1].split(" detection")[0])
    assert n == text.count(" box [") and "written" in text
    enlarged = np.asarray(Image.open(img)).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(drawn, enlarged) == (n == 0)  # drawn on exactly when something was detected


def test_det_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["det-train", "--output", str(tmp_path / "x"), "model.neck=fpn", *TINY]) == 2
    assert "model.neck" in capsys.readouterr().err
    assert main(["det-train", "--output", str(tmp_path / "y"), "--data", str(tmp_path / "nowhere"), *TINY]) == 2
    assert "COCO root" in capsys.readouterr().err
    assert main(["det-eval", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    assert main(["det-eval", str(plain)]) == 2
    assert "not a vrwkv det-train checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["det-predict", str(bad), "--checkpoint", str(run_dir / "last.pt")]) == 2
    assert "bad image" in capsys.readouterr().err
    assert main(["det-train", "--resume", str(tmp_path / "norun")]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_two_process_training_gathers_every_detection(tmp_path):
    """torchrun (gloo): the validation AP logged by two processes, each predicting half of the images, equals a
    single-process det-eval of the same weights."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vrwkv.cli",
           "det-train", "--output", str(out), "data.scenes_train=8", *TINY, "data.eval_batch_size=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr and proc.stdout.count("final val box AP") == 1
    logged = torch.load(out / "last.pt", weights_only=True)["metrics"]
    from vrwkv.engine import detection

    single = detection.evaluate(detection.load_detector(out / "last.pt"), batch_size=1)  # as each process
    assert single["count"] == 4 and single["detections"] == logged["val_detections"] > 0
    for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP75"):
        assert single[key] == pytest.approx(logged[f"val_{key}"], abs=1e-6), key
