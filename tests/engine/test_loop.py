import csv

import pytest
import torch

from conftest import rel_err
from vrwkv.data import BadImageError
from vrwkv.engine.checkpoint import load_checkpoint
from vrwkv.engine.classification import make_config, train
from vrwkv.engine.loop import NonFiniteLossError

from tiny_setup import RUN, TINY, VRWKV


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_digits_run_learns_and_records(tmp_path):
    cfg = make_config("digits", RUN + VRWKV + [f"run.output_dir={tmp_path}", "schedule.epochs=4", "optim.lr=3e-3",
                                               "run.ema=true", "run.ema_decay=0.9"])
    run_dir, metrics = train(cfg)
    assert metrics["val_top1"] > 60, metrics  # 10 classes: chance is 10 %
    epochs = _rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 3, 4] and "ema_val_top1" in epochs[0]
    assert float(epochs[-1]["train_loss"]) < float(epochs[0]["train_loss"])
    assert len(_rows(run_dir / "steps.csv")) == 4 * (1438 // 32)
    assert (run_dir / "config.yaml").read_text().count("test_vrwkv") == 1
    ckpt = load_checkpoint(run_dir / "best.pt")
    assert ckpt["config"]["classes"] == [str(i) for i in range(10)] and ckpt["ema"] is not None


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    # SGD: Adam's 1/sqrt(v) would amplify float rounding in near-zero gradients into full steps
    common = TINY + ["run.max_steps=3", "optim.clip_grad=null", "optim.opt=sgd", "optim.lr=0.1"]
    _, _ = train(make_config("digits", common + [f"run.output_dir={tmp_path / 'big'}"]))
    _, _ = train(make_config("digits", common + [f"run.output_dir={tmp_path / 'acc'}", "data.batch_size=16",
                                                 "run.accum_steps=2"]))
    big, acc = (load_checkpoint(tmp_path / n / "last.pt") for n in ("big", "acc"))
    assert big["loop"]["step"] == acc["loop"]["step"] == 3
    for k, v in big["model"].items():
        assert rel_err(acc["model"][k], v) < 1e-5, k


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = make_config("digits", TINY + [f"run.output_dir={tmp_path}", "optim.lr=1e30",
                                                  "optim.clip_grad=null", "run.ckpt_every=1"])
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf).*step (\d+).*Last good checkpoint") as e:
        train(cfg)
    step = int(e.value.args[0].split("step ")[1].split(";")[0])
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["loop"]["step"] == step - 1  # the bad update was never applied nor saved
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def _folder(root, corrupt: bool):
    from PIL import Image

    for split, n in (("train", 8), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("L" if i % 2 else "RGB", (20, 20), 40 * i).save(root / split / cls / f"{i}.png")
    if corrupt:
        (root / "train" / "b" / "3.png").write_bytes(b"broken")
        (root / "val" / "a" / "1.png").write_bytes(b"")  # empty file in the val split


def test_bad_images_are_skipped_and_counted_or_stop_the_run(tmp_path):
    _folder(tmp_path / "data", corrupt=True)
    base = TINY + [f"data.dataset={tmp_path / 'data'}", "data.batch_size=4", "schedule.epochs=1"]
    with pytest.raises(BadImageError, match=r"train/b/3.png"):
        train(make_config("digits", base + [f"run.output_dir={tmp_path / 'e'}"]))
    run_dir, metrics = train(make_config("digits", base + [f"run.output_dir={tmp_path / 's'}",
                                                           "data.on_bad_image=skip"]))
    assert metrics["bad_images"] == 2 and 0 <= metrics["val_top1"] <= 100  # train: replaced, val: dropped
    assert _rows(run_dir / "metrics.csv")[0]["bad_images"] == "2.0"


def test_grad_checkpointing_and_channels_last_train_the_same_model(tmp_path):
    """Gradient checkpointing recomputes the same operations: the same weights after AdamW steps. channels_last
    changes the patch embedding's convolution algorithm (float rounding differs at ~1e-7), which AdamW's first steps
    turn into sign-sized updates wherever a gradient is near zero; with SGD the weights follow the gradients."""
    common = VRWKV + RUN + ["run.max_steps=2", "run.deterministic=true"]
    runs = {"plain": [], "ckpt": ["model.grad_checkpointing=true"],
            "sgd": ["optim.opt=sgd"], "sgd_cl": ["optim.opt=sgd", "model.grad_checkpointing=true",
                                                 "model.channels_last=true"]}
    for name, extra in runs.items():
        train(make_config("digits", common + [f"run.output_dir={tmp_path / name}"] + extra))
    for a_name, b_name in (("plain", "ckpt"), ("sgd", "sgd_cl")):
        a, b = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in (a_name, b_name))
        for k, v in a.items():
            assert rel_err(b[k], v) < 1e-5, (b_name, k)


def test_bf16_autocast_and_layer_decay_run_on_vrwkv6(tmp_path):
    cfg = make_config("digits", RUN + ["model.name=test_vrwkv6", "model.kwargs={patch_size: 4}", "run.max_steps=2",
                                       "run.amp=bf16", "optim.layer_decay=0.75", f"run.output_dir={tmp_path}"])
    _, metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and 0 <= metrics["val_top1"] <= 100
    opt = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    scales = sorted({g["lr_scale"] for g in opt["param_groups"]})
    assert len(scales) >= 3 and scales[-1] == 1.0  # stem < blocks < head
