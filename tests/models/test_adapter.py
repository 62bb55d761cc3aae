"""VRWKV-Adapter and SimpleFeaturePyramid: output contract, wiring of the RWKV features, official key names and
checkpoint loading (mmseg layout, classification layout)."""
import pytest
import torch

from vrwkv.models.adapter import ADAPTER_CONFIGS, SimpleFeaturePyramid, VRWKVAdapter, create_vrwkv_adapter
from vrwkv.models.vrwkv import VRWKV

TINY = dict(embed_dim=32, depth=4, img_size=64, init_values=1.0, deform_num_heads=2, conv_inplane=8,
            interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]])


def _adapter(seed=0, **kw):
    torch.manual_seed(seed)
    return VRWKVAdapter(**{**TINY, **kw})


def test_adapter_outputs_four_strides_and_backprops():
    model = _adapter()
    x = torch.randn(2, 3, 64, 96)
    outs = model(x)
    assert model.out_channels == 32 and model.strides == (4, 8, 16, 32)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    sum(o.square().mean() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == [], no_grad
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))


@pytest.mark.parametrize("variant", ["segmentation", "detection"])
def test_adapter_adds_the_official_rwkv_features(variant):
    # injector gamma starts at 0, so the token stream is the plain backbone's; in eval mode (BN stats 0/1) each
    # output is (prior map + RWKV map) / sqrt(1 + eps): subtracting the no-feature variant isolates the RWKV map
    with_feat = _adapter(add_rwkv_feature=variant).double().eval()
    without = _adapter(add_rwkv_feature="none").double().eval()
    without.load_state_dict(with_feat.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    inter = VRWKV.forward_intermediates(with_feat, x, intermediates_only=True)  # block outputs, [1, C, 4, 4]
    feats = inter if variant == "segmentation" else [inter[-1]] * 4
    scale = (1 + 1e-5) ** -0.5
    for i, (a, b) in enumerate(zip(with_feat(x), without(x))):
        f = torch.nn.functional.interpolate(feats[i], scale_factor=(4.0, 2.0, 1.0, 0.5)[i], mode="bilinear",
                                            align_corners=False) if i != 2 else feats[i]
        assert torch.allclose(a - b, f * scale, atol=1e-10), i


def test_adapter_official_key_names():
    keys = set(_adapter().state_dict())
    for k in ["level_embed", "pos_embed", "patch_embed.projection.weight", "layers.0.ln0.weight",
              "layers.3.gamma2", "spm.stem.0.weight", "spm.stem.7.running_mean", "spm.conv4.1.num_batches_tracked",
              "spm.fc4.bias", "interactions.0.injector.gamma", "interactions.0.injector.attn.sampling_offsets.bias",
              "interactions.1.extractor.ffn.dwconv.dwconv.weight", "interactions.1.extractor.ffn_norm.weight",
              "interactions.3.extra_extractors.1.attn.value_proj.weight", "up.weight", "norm4.running_var"]:
        assert k in keys, k
    assert not any(k.startswith(("ln1.", "head.")) for k in keys)
    assert not any(k.startswith("interactions.2.extra_extractors") for k in keys)


def test_adapter_configs_match_the_spec_table():
    with torch.device("meta"):  # shapes only
        base = create_vrwkv_adapter("vrwkv_base")  # 12 heads, value width 384, extractor drop path 0.3
    assert base.interactions[0].injector.attn.value_proj.weight.shape == (384, 768)
    assert base.interactions[0].injector.attn.n_heads == 12 and base.interactions[0].extractor.drop_path.drop_prob == 0.3
    assert ADAPTER_CONFIGS["vrwkv_large"]["interaction_indexes"] == [[0, 5], [6, 11], [12, 17], [18, 23]]
    with pytest.raises(ValueError, match="cover blocks"):
        VRWKVAdapter(**{**TINY, "interaction_indexes": [[0, 1], [3, 3]]})
    with pytest.raises(ValueError, match="no adapter config"):
        create_vrwkv_adapter("vrwkv_huge")


def test_adapter_loads_an_mmseg_checkpoint(tmp_path):
    src = _adapter(seed=1)
    with torch.no_grad():  # non-default BN statistics and gammas must come through too
        src.norm2.running_mean.normal_()
        src.interactions[0].injector.gamma.normal_()
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    state["decode_head.conv_seg.weight"] = torch.randn(5, 16, 1, 1)
    state["auxiliary_head.conv_seg.bias"] = torch.randn(5)
    path = tmp_path / "upernet_vrwkv.pth"
    torch.save({"meta": {"iter": 160000, "CLASSES": ["a"]}, "state_dict": state}, path)
    dst = _adapter(seed=2)
    rest = dst.load_pretrained(path)
    assert set(rest) == {"decode_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"}
    assert torch.equal(rest["decode_head.conv_seg.weight"], state["decode_head.conv_seg.weight"])
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # a checkpoint of another size fails loudly
    torch.save({"state_dict": {k: v for k, v in state.items() if "level_embed" not in k}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys .*level_embed"):
        dst.load_pretrained(tmp_path / "bad.pth")


def test_adapter_loads_a_classification_checkpoint(tmp_path):
    torch.manual_seed(3)
    clf = VRWKV(embed_dim=32, depth=4, img_size=64, init_values=1.0, num_classes=7)
    state = {f"backbone.{k}": v for k, v in clf.state_dict().items() if not k.startswith("head.")}
    state["head.fc.weight"], state["head.fc.bias"] = clf.head.weight, clf.head.bias
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "cls.pth")
    adapter = _adapter(seed=4)
    spm_before = adapter.spm.fc1.weight.clone()
    rest = adapter.load_pretrained(tmp_path / "cls.pth")
    assert set(rest) == {"head.fc.weight", "head.fc.bias"}
    assert torch.equal(adapter.layers[2].att.key.weight, clf.layers[2].att.key.weight)
    assert torch.equal(adapter.pos_embed, clf.pos_embed) and torch.equal(adapter.spm.fc1.weight, spm_before)


def test_simple_feature_pyramid():
    torch.manual_seed(0)
    sfp = SimpleFeaturePyramid(VRWKV(embed_dim=32, depth=2, img_size=64, num_classes=0), out_channels=24)
    outs = sfp(torch.randn(2, 3, 64, 32))
    assert sfp.out_channels == 24
    assert [tuple(o.shape) for o in outs] == [(2, 24, 16, 8), (2, 24, 8, 4), (2, 24, 4, 2), (2, 24, 2, 1)]
    with pytest.raises(ValueError, match="stride-16"):
        SimpleFeaturePyramid(VRWKV(embed_dim=32, depth=1, img_size=64, patch_size=8))
