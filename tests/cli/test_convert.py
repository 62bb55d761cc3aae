"""``vrwkv convert``: official .pth -> our safetensors, loadable by create_model; user errors exit 2 on one line."""
import torch
from safetensors import safe_open

from conftest import perturb_
import vrwkv
from vrwkv.cli import main


def _official_file(path, seed=0):
    torch.manual_seed(seed)
    model = vrwkv.create_model("test_vrwkv", num_classes=10, img_size=48)  # 3x3 pos_embed grid
    perturb_(model, 0.05)
    sd = {("head.fc." + k[5:] if k.startswith("head.") else "backbone." + k): v for k, v in model.state_dict().items()}
    torch.save({"meta": {"epoch": 300}, "state_dict": sd}, path)
    return model.eval()


def test_convert_roundtrip(tmp_path, capsys):
    ref = _official_file(tmp_path / "mmcls.pth")
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(tmp_path / "mmcls.pth"), str(out), "--model", "test_vrwkv"]) == 0
    msg = capsys.readouterr().out
    assert "from a mmcls checkpoint" in msg and "grid 3x3" in msg and "checked against test_vrwkv" in msg
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == "vrwkv" and meta["pos_embed_grid"] == "3x3" and meta["arch"] == "test_vrwkv"
    assert keys == set(ref.state_dict())  # our names: no backbone. prefix, head.fc -> head
    loaded = vrwkv.create_model("test_vrwkv", num_classes=10, img_size=48, checkpoint_path=out).eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    # without --model: a plain key conversion, same tensors
    assert main(["convert", str(tmp_path / "mmcls.pth"), str(tmp_path / "plain.safetensors")]) == 0
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), ref.state_dict()[k]) for k in keys)


def test_convert_user_errors(tmp_path, capsys):
    _official_file(tmp_path / "mmcls.pth")
    cases = [
        (["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")], "checkpoint not found"),
        (["convert", str(tmp_path / "mmcls.pth"), str(tmp_path / "no_dir" / "o.safetensors")], "output directory"),
        (["convert", str(tmp_path / "mmcls.pth"), str(tmp_path / "o.safetensors"), "--model", "resnet"],
         "unknown model 'resnet'"),
        (["convert", str(tmp_path / "mmcls.pth"), str(tmp_path / "o.safetensors"), "--model", "test_vrwkv2"],
         "does not fit this model"),
    ]
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    cases.append((["convert", str(tmp_path / "other.pth"), str(tmp_path / "o.safetensors")],
                  "not a Vision-RWKV checkpoint"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("vrwkv convert: error:")
    assert not (tmp_path / "o.safetensors").exists()
