"""Checkpoint files: every recognised layout loads through the public paths, pos_embed is resized to the model grid,
a different class count drops the classifier, and files that do not fit fail with a message naming the keys."""
import numpy as np
import pytest
import timm
import torch

import vrwkv
from conftest import DEVICE, perturb_
from vrwkv.layers import resize_pos_embed
from vrwkv.models._checkpoint import read_checkpoint, save_safetensors


class Trainer:
    """Pickled by reference (module + name): loading it would import and run code from this module."""


def _model(name="test_vrwkv", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    perturb_(model, 0.05)
    return model.eval()


def _official(state_dict, mmcls_head=True):
    """Our names -> official classifier names: ``backbone.*`` + ``head.fc.*`` (mmcls) or ``head.*`` (InternImage)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head."):
            out[k.replace("head.", "head.fc.") if mmcls_head else k] = v
        else:
            out["backbone." + k] = v
    return out


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_layouts_and_containers(tmp_path):
    ref = _model()
    sd = ref.state_dict()
    files = {
        # mmcv runner format; metric values in meta are numpy scalars
        "mmcls.pth": {"meta": {"hook_msgs": {"best_score": np.float64(75.1)}, "epoch": np.int64(300)},
                      "state_dict": _official(sd), "optimizer": {"state": {}}},
        "ddp_plain.pt": {"module." + k: v for k, v in sd.items()},
        "ours_plain.pt": sd,
        "model_key.pth": {"model": _official(sd, mmcls_head=False), "epoch": 3},
    }  # fmt: skip
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        loaded = vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / name)
        assert _same_weights(loaded, ref), name
    save_safetensors(sd, tmp_path / "ours.safetensors", {"pos_embed_grid": "4x4"})
    assert _same_weights(vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / "ours.safetensors"), ref)
    assert read_checkpoint(tmp_path / "mmcls.pth").container == "state_dict"
    # timm's in-memory state_dict overlay goes through the same filter (checkpoint_filter_fn)
    via_timm = timm.create_model("test_vrwkv", pretrained=True, pretrained_cfg_overlay=dict(state_dict=_official(sd)))
    assert _same_weights(via_timm, ref)


def test_internimage_mlp_head_and_ema(tmp_path):
    ref, ema = _model("test_vrwkv2", seed=0), _model("test_vrwkv2", seed=1)
    assert any(k.startswith("head.2.") for k in ref.state_dict())
    path = tmp_path / "l_style.pth"
    torch.save({"state_dict": _official(ref.state_dict(), mmcls_head=False),
                "model_ema": _official(ema.state_dict(), mmcls_head=False), "epoch": 19}, path)  # fmt: skip
    assert _same_weights(vrwkv.create_model("test_vrwkv2", checkpoint_path=path), ref)
    model = timm.create_model("test_vrwkv2")
    model.load_pretrained(path, use_ema=True)
    assert _same_weights(model, ema)


def test_pos_embed_is_resized_to_the_model_grid(tmp_path):
    """A 4x4-grid checkpoint in a 6x6-grid model: resized once at load, so at 96 px both models agree."""
    ref = _model()
    torch.save(_official(ref.state_dict()), tmp_path / "w.pth")
    big = vrwkv.create_model("test_vrwkv", img_size=96, checkpoint_path=tmp_path / "w.pth")
    assert big.pos_embed.shape == (1, 36, 64)
    assert torch.equal(big.pos_embed, resize_pos_embed(ref.pos_embed, (4, 4), (6, 6)))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(big(x), ref(x), atol=1e-5)
    # a non-square grid survives a round trip through our safetensors (its metadata records the grid)
    rect = _model(img_size=(32, 96))
    save_safetensors(rect.state_dict(), tmp_path / "rect.safetensors", {"pos_embed_grid": "2x6"})
    square = vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / "rect.safetensors")  # 4x4 model grid
    assert torch.equal(square.pos_embed, resize_pos_embed(rect.pos_embed, (2, 6), (4, 4)))


def test_other_class_count_drops_only_the_classifier(tmp_path):
    ref = _model()
    torch.save({"state_dict": _official(ref.state_dict())}, tmp_path / "w.pth")
    model = vrwkv.create_model("test_vrwkv", num_classes=10, checkpoint_path=tmp_path / "w.pth")
    assert model.head.weight.shape == (10, 64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), ref.forward_features(x))
    feats = vrwkv.create_model("test_vrwkv", num_classes=0, checkpoint_path=tmp_path / "w.pth")
    with torch.no_grad():
        assert torch.allclose(feats(x), ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_files_that_do_not_fit(tmp_path):
    sd = _official(_model().state_dict())
    cases = {
        "missing": ({k: v for k, v in sd.items() if ".layers.1." not in k}, r"missing keys \(\d+\): layers\.1\."),
        "unexpected": ({**sd, "backbone.layers.0.att.extra": torch.zeros(1)}, r"unexpected keys \(1\): "
                                                                            r"layers\.0\.att\.extra"),
        "shapes": ({**sd, "backbone.layers.1.att.key.weight": torch.zeros(64, 32)},
                   r"shape mismatches \(1\): layers\.1\.att\.key\.weight: checkpoint \(64, 32\) vs model \(64, 64\)"),
    }  # fmt: skip
    for name, (state, message) in cases.items():
        torch.save({"state_dict": state}, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=message):
            vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / f"{name}.pth")
    with pytest.raises(ValueError, match="depth 3"):  # a 2-block file into a 3-block model
        vrwkv.create_model("test_vrwkv2", checkpoint_path=tmp_path / "unexpected.pth")

    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / "text.pth")
    torch.save({"state_dict": sd, "trainer": Trainer()}, tmp_path / "code.pth")  # a global outside the allow-list
    with pytest.raises(ValueError, match="refusing to run code.*test_checkpoint.Trainer"):
        vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / "code.pth")
    torch.save({"epoch": 1, "optimizer": {}}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="no state dict found"):
        vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / "nostate.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        vrwkv.create_model("test_vrwkv", checkpoint_path=tmp_path / "nowhere.pth")
