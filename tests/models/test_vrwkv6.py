"""VRWKV6: conformance with the official model (golden vrwkv6_t.pt), checkpoint conversion, and the timm model API
on the tiny registered test variants (64 px inputs)."""
import math

import pytest
import timm
import torch
from timm.models import group_parameters

import vrwkv
from conftest import DEVICE, perturb_, rel_err
from vrwkv.models import VRWKV6
from vrwkv.models._convert import convert_checkpoint

LOGITS_TOL, FEAT_TOL = 1e-5, 2e-5  # float32 tolerances of data/GOLDEN_README.md
# test_vrwkv6: VRWKV6-T options, 2 heads; test_vrwkv6b: post-norm, layer scale, key_norm, cls token, 1 head
TEST_MODELS = ["test_vrwkv6", "test_vrwkv6b"]


def golden_kwargs(config: dict) -> dict:
    """Official VRWKV6 constructor kwargs -> ours (only the names differ)."""
    rename = {"embed_dims": "embed_dim", "in_channels": "in_chans"}
    kwargs = {rename.get(k, k): v for k, v in config["backbone"].items()}
    kwargs.pop("out_indices")  # the official backbone returns the last block; ours gives it as forward_features
    return kwargs


def mmcls_file(golden, tmp_path):
    d = golden("vrwkv6_t")
    path = tmp_path / "vrwkv6_mmcls.pth"
    torch.save({"meta": {"mmcls_version": "0.25.0", "epoch": 300}, "state_dict": d["state_dict"]}, path)
    return d, path


def check_golden_outputs(model, d: dict, logits_tol: float, feat_tol: float, keys=("224", "320x256")) -> None:
    model = model.to(DEVICE).eval()
    for key in keys:
        x = d["inputs"][key].to(DEVICE, next(model.parameters()).dtype)
        with torch.no_grad():
            tokens, blocks = model.forward_intermediates(x, output_fmt="NLC")
            logits = model.forward_head(tokens)
            (feat,) = model.forward_backbone(x)
        out = d["outputs"]
        assert rel_err(logits, out[f"logits_{key}"]) < logits_tol, key
        assert rel_err(feat, out[f"feat_{key}"]) < feat_tol, key
        if key == "224":
            assert rel_err(torch.stack(blocks)[:, 0], out["block_outputs_224_img0"]) < feat_tol


def test_golden_from_official_mmcls_checkpoint(golden, tmp_path):
    d, path = mmcls_file(golden, tmp_path)
    model = timm.create_model("vrwkv6_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **golden_kwargs(d["config"]))  # fmt: skip
    check_golden_outputs(model, d, LOGITS_TOL, FEAT_TOL)
    # float64 reproduces the float64 reference run to rounding: no approximation anywhere in the model
    with torch.no_grad():
        logits = model.double()(d["inputs"]["224"][:1].to(DEVICE, torch.float64))
    assert rel_err(logits, d["outputs"]["logits_224"][:1]) < 1e-10


def test_golden_after_conversion_to_safetensors(golden, tmp_path):
    d, path = mmcls_file(golden, tmp_path)
    report = convert_checkpoint(path, tmp_path / "vrwkv6_t.safetensors")
    assert report.layout == "mmcls" and report.grid == (14, 14) and report.num_tensors == len(d["state_dict"])
    model = vrwkv.create_model("vrwkv6_tiny", checkpoint_path=tmp_path / "vrwkv6_t.safetensors",
                               **golden_kwargs(d["config"]))  # fmt: skip
    check_golden_outputs(model, d, LOGITS_TOL, FEAT_TOL, keys=("320x256",))


def test_conversion_through_the_model_and_mismatch_errors(tmp_path):
    src = perturbed("test_vrwkv6b")
    official = {("head.fc." + k[5:] if k.startswith("head.") else "backbone." + k): v
                for k, v in src.state_dict().items()}  # fmt: skip
    torch.save({"meta": {}, "state_dict": official}, tmp_path / "v6.pth")
    convert_checkpoint(tmp_path / "v6.pth", tmp_path / "v6.safetensors", model_name="test_vrwkv6b")
    loaded = vrwkv.create_model("test_vrwkv6b", checkpoint_path=tmp_path / "v6.safetensors").to(DEVICE).eval()
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    assert torch.equal(loaded(x), src(x))
    with pytest.raises(ValueError, match="cls_token"):  # the V6 file has a cls token, the other model none
        vrwkv.create_model("test_vrwkv6", embed_dim=64, num_heads=1, depth=3, checkpoint_path=tmp_path / "v6.pth")


def perturbed(name: str, **kwargs) -> VRWKV6:
    """A test model whose parameters are all non-trivial (the init has zero pos_embed/cls, unit norms, ~0 LoRA)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(DEVICE)
    perturb_(model, 0.05)
    return model.eval()


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_and_grad_checkpointing(name):
    model = perturbed(name, num_classes=7)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    model.set_grad_checkpointing()
    out_cp = model(x)  # grad enabled: the blocks really run under torch.utils.checkpoint
    assert out_cp.requires_grad and torch.equal(out, out_cp)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_backward_reaches_every_parameter(name):
    model = perturbed(name, num_classes=5, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 48, 80, device=DEVICE)  # non-square, pos_embed resized from 4x4 to 3x5
    model(x).square().sum().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad
    assert not [n for n, p in model.named_parameters() if p.grad.abs().max() == 0]


def test_cls_token_features_and_intermediates(tmp_path):
    model = perturbed("test_vrwkv6b")  # depth 3, cls token
    x = torch.randn(2, 3, 64, 96, device=DEVICE)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 4 * 6 + 1, 64)  # the cls token is the last token
    final, inter = model.forward_intermediates(x)
    assert torch.equal(final, tokens) and len(inter) == 3 and all(t.shape == (2, 64, 4, 6) for t in inter)
    patches = tokens[:, :-1].reshape(2, 4, 6, 64).permute(0, 3, 1, 2)
    normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
    assert torch.equal(normed[0], patches)
    pooled = model.forward_head(tokens, pre_logits=True)
    assert torch.allclose(pooled, tokens[:, :-1].mean(1))  # average pooling skips the cls token

    torch.save(model.state_dict(), tmp_path / "w.pth")  # weights are loaded before the feature wrapper prunes
    feats = vrwkv.create_model("test_vrwkv6b", features_only=True, out_indices=(0, 2),
                               checkpoint_path=tmp_path / "w.pth")  # fmt: skip
    outs = feats.to(DEVICE)(x)
    assert feats.feature_info.channels() == [64, 64] and torch.equal(outs[0], inter[0])


def test_forward_backbone_with_output_cls_token():
    model = perturbed("test_vrwkv6b", out_indices=(0, -1), output_cls_token=True)
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    (first_map, first_cls), (last_map, last_cls) = model.forward_backbone(x)
    tokens = model.forward_features(x)
    assert torch.allclose(last_map, tokens[:, :-1].reshape(1, 4, 4, 64).permute(0, 3, 1, 2))
    assert torch.equal(last_cls, tokens[:, -1]) and first_cls.shape == (1, 64) and first_map.shape == (1, 64, 4, 4)
    with pytest.raises(ValueError, match="with_cls_token"):
        timm.create_model("test_vrwkv6", output_cls_token=True)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_reset_classifier_and_dynamic_size(name):
    model = perturbed(name)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(model.get_classifier()(pre), model(x), atol=1e-5)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().bias.abs().max() == 0
    for h, w in [(32, 32), (48, 80), (96, 64)]:
        assert model(torch.randn(1, 3, h, w, device=DEVICE)).shape == (1, 3)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 50, 64, device=DEVICE))


@pytest.mark.parametrize("name,count", [("vrwkv6_tiny", 7_641_256), ("vrwkv6_small", 27_677_032),
                                        ("vrwkv6_base", 104_898_280)])  # fmt: skip
def test_parameter_counts(name, count):
    """Spec §4.5 (README: 7.6M / 27.7M / 104.9M), built on the meta device."""
    model = vrwkv.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count


def test_official_size_configurations():
    t, s, b = (vrwkv.create_model(f"vrwkv6_{n}", device="meta") for n in ("tiny", "small", "base"))
    assert (t.num_heads, s.num_heads, b.num_heads) == (3, 6, 12) and t.embed_dim == 192 and b.embed_dim == 768
    assert t.layers[0].gamma1 is None and not t.layers[0].post_norm and t.cls_token is None
    assert s.layers[3].post_norm and s.layers[3].gamma2.shape == (384,) and b.layers[11].gamma1.shape == (768,)
    assert b.layers[5].att.ln_x.num_groups == 12 and b.layers[5].att.time_faaaa.shape == (12, 64)
    assert t.pretrained_cfg["url"].endswith("vrwkv6_t_in1k_224.pth") and t.layers[0].ln0 is not None
    assert isinstance(t, VRWKV6) and "vrwkv6_tiny" in timm.list_models("vrwkv6*")


def test_init():
    """Fancy V6 init (spec §4.4) plus the classifier init_cfg: trunc-normal(0.02) Linears incl. head, LayerNorm and
    GroupNorm 1/0, zero pos_embed, layer scale = init_values."""
    torch.manual_seed(0)
    model = vrwkv.create_model("vrwkv6_small", num_classes=10)
    assert model.pos_embed.abs().max() == 0 and torch.all(model.layers[4].gamma1 == 1e-5)
    gate = model.layers[3].att.gate.weight
    assert abs(gate.std().item() - 0.02) < 0.002 and model.head.bias.abs().max() == 0
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    assert len(norms) == 12 * 3 + 2 and all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)
    C, L = 384, 12
    for layer in (0, 11):
        att = model.layers[layer].att
        r0, r1 = layer / (L - 1), 1 - layer / L
        assert abs(att.time_decay[0, 0, 200].item() - (-6 + 5 * (200 / (C - 1)) ** (0.7 + 1.3 * r0))) < 1e-5
        assert abs(att.time_maa_g[0, 0, 200].item() - (1 - (200 / C) ** (0.5 * r1))) < 1e-6
        assert att.time_maa_w1.abs().max() <= 1e-4
        assert abs(model.layers[layer].ffn.spatial_mix_k[0, 0, 200].item() - (200 / C) ** r1) < 1e-6
    conv = model.patch_embed.projection.weight
    assert conv.abs().max() <= 1 / math.sqrt(3 * 16 * 16)  # PyTorch's default conv init, untouched


def test_options_and_errors():
    model = timm.create_model("test_vrwkv6", drop_path_rate=0.3, depth=3, final_norm=False, shift_pixel=0)
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in model.layers] == pytest.approx([0.0, 0.15, 0.3])
    assert "ln1.weight" not in model.state_dict() and model.layers[1].att.shift is None
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 1000)
    assert timm.create_model("test_vrwkv6", with_cp=True).grad_checkpointing
    with pytest.raises(ValueError, match="num_heads \\* 64"):
        timm.create_model("test_vrwkv6", embed_dim=100)
    with pytest.raises(ValueError, match="num_heads \\* 64"):
        timm.create_model("test_vrwkv6", num_heads=3)
    with pytest.raises(TypeError, match="wkv_semantics"):
        timm.create_model("test_vrwkv6", wkv_semantics="paper")
    with pytest.raises(ValueError, match="init_mode"):
        timm.create_model("test_vrwkv6", init_mode="global")
    with pytest.raises(ValueError, match="q_shift_multihead"):
        timm.create_model("test_vrwkv6", shift_mode="q_shift")


def test_timm_api_odds_and_ends():
    model = timm.create_model("test_vrwkv6b")
    assert model.no_weight_decay() == set()
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 3 + 1  # stem (cls token, pos_embed, patch_embed), one per block, final norm + head
    assert any({"cls_token", "pos_embed"} <= set(names) for names in groups.values())
    assert {n for n, _ in model.named_parameters()} == {n for g in groups.values() for n in g}
    assert vrwkv.list_models("vrwkv6_*") == ["vrwkv6_base", "vrwkv6_small", "vrwkv6_tiny"]
