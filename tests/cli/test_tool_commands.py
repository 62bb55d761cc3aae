"""``vrwkv flops | erf | export | features``: end to end through the CLI; user errors exit 2 with one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_
import vrwkv
from vrwkv.cli import main
from vrwkv.data import load_rgb
from vrwkv.tools.erf import sample_photos
from vrwkv.tools.features import eval_transform, load_features, pooled_features


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line_error(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vrwkv {command}: error:") and "\n" not in err
    return err


def test_flops_command(capsys):
    assert main(["flops", "vrwkv_tiny"]) == 0  # default: the model's own 224x224
    out = capsys.readouterr().out
    assert "T = 196 tokens" in out and "6,155,176" in out and "1.171G" in out and "29·T·C per layer" in out
    assert main(["flops", "vrwkv_tiny", "--img-size", "320", "256"]) == 0
    assert "20x16 patches, T = 320 tokens" in capsys.readouterr().out
    assert main(["flops", "vrwkv_tiny", "--img-size", "100"]) == 2
    assert "multiple of the patch size" in _one_line_error(capsys, "flops")
    assert main(["flops", "nope"]) == 2
    assert "unknown model 'nope'" in _one_line_error(capsys, "flops")


def test_erf_command_compares_variants(tmp_path, capsys):
    out = tmp_path / "erf.png"
    argv = ["erf", "test_vrwkv", "--img-size", "64", "--num-images", "2", "--output", str(out),
            "--compare", "wkv_mode=bidirectional,wkv_mode=causal+shift_mode=none"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "wkv_mode=bidirectional: area holding 20% of the gradient" in text
    assert "wkv_mode=causal+shift_mode=none:" in text and f"wrote {out}" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 1.5 * im.height
    assert main(["erf", "test_vrwkv", "--compare", "wkv_mode", "--output", str(out)]) == 2
    assert "expected KEY=VALUE" in _one_line_error(capsys, "erf")
    assert main(["erf", "test_vrwkv", "--compare", "wkv_mode=sideways", "--output", str(out)]) == 2
    assert "wkv_mode must be one of" in _one_line_error(capsys, "erf")


def test_export_command(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["export", "test_vrwkv", str(out), "--img-size", "32", "--dynamic-batch", "--model-kwargs", "depth=1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "dynamic batch" in text and "max relative error vs PyTorch: batch 1:" in text
    assert main(["export", "test_vrwkv", str(tmp_path / "m.pt"), "--dynamic-batch"]) == 2
    assert "ONNX option" in _one_line_error(capsys, "export")
    assert main(["export", "test_vrwkv", str(out), "--model-kwargs", "bogus=1"]) == 2
    assert "bogus" in _one_line_error(capsys, "export")


@pytest.fixture()
def photo_dir(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, crop in enumerate((sample_photos(3, 48, seed=4).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)):
        Image.fromarray(crop).save(root / f"img{i}.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_features_command(photo_dir, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    argv = ["features", str(photo_dir), str(out), "--model", "test_vrwkv", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "3 embeddings of dimension 64" in text and "skipped 1 bad image(s)" in text and "broken.png" in text
    feats, files, meta = load_features(out)
    assert feats.shape == (3, 64) and files == ["img0.jpg", "img1.jpg", "img2.jpg"] and meta["model"] == "test_vrwkv"
    assert torch.isfinite(feats).all()
    assert main(argv + ["--on-bad-image", "error"]) == 2
    assert "broken.png" in _one_line_error(capsys, "features")
    assert main(["features", str(tmp_path / "missing"), str(out)]) == 2
    assert "does not exist" in _one_line_error(capsys, "features")


def test_features_command_with_checkpoint(photo_dir, tmp_path, capsys):
    torch.manual_seed(1)
    model = vrwkv.create_model("test_vrwkv", num_classes=7).eval()
    perturb_(model, 0.1)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "feats.safetensors"
    weights = str(tmp_path / "weights.pth")
    argv = ["features", str(photo_dir), str(out), "--model", "test_vrwkv", "--checkpoint", weights,
            "--model-kwargs", "num_classes=7", "--no-progress"]
    assert main(argv) == 0
    feats, files, meta = load_features(out)
    transform = eval_transform(model)
    with torch.no_grad():
        expected = pooled_features(model, torch.stack([transform(load_rgb(photo_dir / f)) for f in files]))
    assert torch.allclose(feats, expected, atol=1e-5) and meta["checkpoint"] == weights
    # the exact low-memory mode gives the same embeddings; models without one are a one-line error
    low = tmp_path / "low.safetensors"
    assert main(argv[:2] + [str(low)] + argv[3:] + ["--low-memory"]) == 0
    assert torch.allclose(load_features(low)[0], expected, atol=1e-5)
    capsys.readouterr()
    assert main(["features", str(photo_dir), str(low), "--model", "test_vrwkv6", "--low-memory", "--no-progress"]) == 2
    assert "low-memory" in _one_line_error(capsys, "features")
