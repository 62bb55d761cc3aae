"""``vrwkv pretrain-mae`` end to end, in-process: pre-train a few steps, resume, draw reconstructions, and fine-tune
a classifier from the encoder with ``vrwkv train --init-from``."""
import csv
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vrwkv.cli import main
from vrwkv.engine.checkpoint import load_checkpoint

# the digits preset's encoder shrunk to 32 x 2 (4x4 patches of 16 px digits: 16 tokens, 4 visible), decoder 16 x 1
OPTIONS = ["--img-size", "16", "--batch-size", "32", "--epochs", "2", "--num-images", "3"]
OVERRIDES = ["run.progress=false", "run.threads=1", "run.deterministic=true", "schedule.warmup_epochs=0",
             "run.log_every=1", "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.decoder_embed_dim=16",
             "model.kwargs.decoder_depth=1"]  # KEY=VALUE overrides go last, in one group


def _losses(run_dir):
    with open(run_dir / "steps.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def _check_png(path, min_width=200):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > min_width and height > 200
    assert np.asarray(Image.open(path).convert("L")).std() > 5  # something was drawn


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run, and one stopped after 3 steps then resumed to 6 (grid sparse mode)."""
    base = tmp_path_factory.mktemp("mae")
    ref, cut = base / "reference", base / "resumed"
    assert main(["pretrain-mae", *OPTIONS, "--sparse-mode", "grid", "--output", str(ref), *OVERRIDES,
                 "run.max_steps=6"]) == 0
    assert main(["pretrain-mae", *OPTIONS, "--sparse-mode", "grid", "--output", str(cut), *OVERRIDES,
                 "run.max_steps=3", "run.tensorboard=false"]) == 0
    assert load_checkpoint(cut / "last.pt")["loop"]["step"] == 3
    assert main(["pretrain-mae", "--resume", str(cut), "run.max_steps=6"]) == 0
    return ref, cut


def test_pretraining_writes_config_checkpoints_logs_and_figures(runs, capsys):
    ref, _ = runs
    names = {p.name for p in ref.iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.csv", "steps.csv", "tb", "reconstructions"} <= names
    ckpt = load_checkpoint(ref / "last.pt")
    assert ckpt["config"]["model"]["kwargs"]["sparse_mode"] == "grid"
    assert ckpt["config"]["encoder"]["embed_dim"] == 32 and "decoder_pred.weight" in ckpt["model"]
    assert 0 < ckpt["metrics"]["val_loss"] < 10
    groups = ckpt["optimizer"]["param_groups"]  # official recipe: weight decay on every parameter
    assert all(g["weight_decay"] == 0.05 for g in groups if g["params"])
    assert sum(len(g["params"]) for g in groups if g["params"]) == len(ckpt["model"])
    figures = sorted((ref / "reconstructions").glob("*.png"))
    assert [f.name for f in figures] == ["epoch0000-step0000006.png"]  # one evaluation: at the step limit
    _check_png(figures[0])


def test_resumed_run_equals_the_uninterrupted_one(runs):
    ref, cut = runs
    a, b = load_checkpoint(cut / "last.pt"), load_checkpoint(ref / "last.pt")
    assert a["loop"]["step"] == b["loop"]["step"] == 6
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert _losses(cut) == _losses(ref)
    assert len(list((cut / "reconstructions").glob("*.png"))) == 2  # at step 3 and at step 6
    with open(cut / "metrics.csv", newline="") as f:
        val = [float(r["val_loss"]) for r in csv.DictReader(f)]
    assert len(val) == 2 and load_checkpoint(cut / "best.pt")["metrics"]["val_loss"] == min(val)  # lower is better


def test_visualize_a_checkpoint(runs, tmp_path, capsys):
    ref, _ = runs
    out = tmp_path / "recon.png"
    assert main(["pretrain-mae", "--visualize", str(ref / "last.pt"), "--figure", str(out), "--num-images",
                 "5"]) == 0
    assert str(out) in capsys.readouterr().out
    _check_png(out, min_width=400)


def test_finetune_from_the_encoder(runs, tmp_path, capsys):
    from vrwkv.engine.classification import build_model
    from vrwkv.engine.config import ModelConfig

    ref, _ = runs
    mae_state = load_checkpoint(ref / "last.pt")["model"]
    clf = build_model(ModelConfig(name="test_vrwkv", kwargs={"patch_size": 4, "embed_dim": 32},
                                  init_from=str(ref / "last.pt")), num_classes=10, img_size=16)
    own = clf.state_dict()
    encoder_keys = [k for k in mae_state if k.startswith(("blocks.", "patch_embed.", "pos_embed", "ln1."))]
    assert len(encoder_keys) == len(own) - 2  # all but the head
    for k in encoder_keys:
        assert torch.equal(own[k.replace("blocks.", "layers.", 1)], mae_state[k]), k

    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(ref / "last.pt"), "--model", "test_vrwkv", "--img-size", "16",
                 "--batch-size", "32", "--epochs", "1", "--layer-decay", "0.75", "--output", str(out),
                 "model.kwargs={patch_size: 4, embed_dim: 32, depth: 2}", "run.max_steps=2", "run.progress=false",
                 "run.threads=1", "run.tensorboard=false"]) == 0
    assert "final val top-1" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["config"]["model"]["init_from"] == str(ref / "last.pt")


@pytest.mark.parametrize("argv, message", [
    (["pretrain-mae", "--preset", "nope"], "unknown preset 'nope'"),
    (["pretrain-mae", "--model", "mae_vit_base", "--img-size", "16"], "unknown MAE model 'mae_vit_base'"),
    (["pretrain-mae", "--mask-ratio", "1.0", "--img-size", "16"], "task.mask_ratio must be in [0, 1)"),
    (["pretrain-mae", "model.init_from=x.pt"], "model.init_from initialises a classifier"),
    (["pretrain-mae", "--visualize", "/no/such.pt"], "checkpoint /no/such.pt does not exist"),
    (["train", "--init-from", "/no/such.pt"], "checkpoint /no/such.pt does not exist"),
])
def test_user_errors_are_one_line_exit_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--output", str(tmp_path / "out")] if "--visualize" not in argv else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_resume_refuses_a_classification_run(tmp_path, capsys):
    torch.save({"format": "vrwkv-run-1", "config": {"model": {}}}, tmp_path / "last.pt")
    assert main(["pretrain-mae", "--resume", str(tmp_path)]) == 2
    assert "not an MAE pre-training run" in capsys.readouterr().err


def test_list_presets(capsys):
    assert main(["pretrain-mae", "--list-presets"]) == 0
    assert capsys.readouterr().out.split() == ["digits"]
