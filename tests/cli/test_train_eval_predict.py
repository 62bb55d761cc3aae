"""The training subcommands end to end, in-process: train → eval → predict → plot, and their error messages."""
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vrwkv.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--img-size", "16", "--batch-size", "32", "--epochs", "1", "--model", "test_vrwkv",
        "model.kwargs={patch_size: 4}", "run.max_steps=6", "run.progress=false", "run.threads=1",
        "schedule.warmup_epochs=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--output", str(out)]) == 0
    return out


def test_train_writes_config_checkpoints_and_records(run_dir, capsys):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.csv", "steps.csv", "tb"} <= names
    assert any((run_dir / "tb").iterdir())  # TensorBoard event file


def test_eval_on_our_checkpoint(run_dir, capsys):
    assert main(["eval", str(run_dir), "--batch-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "359 images" in out and "img/s" in out


def test_predict_on_a_real_image(run_dir, tmp_path, capsys):
    from vrwkv.data import DigitsDataset

    img, label = DigitsDataset("val", 48)[0]  # a real digit, written as a grey-level PNG of another size
    path = tmp_path / "digit.png"
    img.convert("L").save(path)
    assert main(["predict", str(path), "--checkpoint", str(run_dir), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(path) and len(lines) == 4
    probs = [float(line.split("%")[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    assert all(line.split()[-1] in "0123456789" for line in lines[1:])


def test_plot_writes_a_valid_png(run_dir, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 200
    assert np.asarray(Image.open(out).convert("L")).std() > 5  # something was drawn


def test_resume_continues_a_finished_run_without_training_more(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "run.progress=false"]) == 0
    assert "final val top-1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "optim.lr=fast"], "optim.lr: expected a number"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--data", "/no/such/folder"], "/no/such/folder/train does not exist"),
    (["train", "--model", "no_such_model", "--data", "digits"], "unknown model 'no_such_model'"),
    (["train", "--resume", "/no/such/run"], "cannot resume: /no/such/run/last.pt does not exist"),
    (["eval", "/no/such.pt"], "checkpoint /no/such.pt does not exist"),
    (["predict", "x.png"], "give --checkpoint"),
    (["predict", "x.png", "--model", "test_vrwkv", "--threads", "0"], "--threads must be >= 1"),
    (["eval", "/no/such.pt", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["plot", "/no/such/run"], "run folder /no/such/run does not exist"),
])
def test_user_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_predict_names_an_unreadable_image(run_dir, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    assert main(["predict", str(bad), "--checkpoint", str(run_dir)]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_foreign_checkpoint_needs_a_model_name(tmp_path, capsys):
    import torch

    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    assert main(["eval", str(path)]) == 2
    assert "give the model name (--model)" in capsys.readouterr().err


def test_argparse_rejects_bad_choices():
    with pytest.raises(SystemExit) as e:
        main(["train", "--amp", "fp8"])
    assert e.value.code == 2
