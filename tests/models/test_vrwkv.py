"""VRWKV model API in the style of timm's model tests, on the tiny registered test variants (64 px inputs)."""
import math

import pytest
import timm
import torch
from timm.models import group_parameters

import vrwkv
from conftest import DEVICE, perturb_, rel_err
from vrwkv.layers import q_shift
from vrwkv.models import VRWKV
from vrwkv.ops import bi_wkv

# test_vrwkv: VRWKV-T options (pre-norm, Linear head); test_vrwkv2: VRWKV-L options (post-norm, layer scale,
# key_norm, Tanh MLP head)
TEST_MODELS = ["test_vrwkv", "test_vrwkv2"]


def _perturbed(name: str, **kwargs) -> VRWKV:
    """A test model whose parameters are all non-trivial (the init has zero pos_embed, unit norms, zero biases)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(DEVICE)
    perturb_(model, 0.05)
    return model


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_and_grad_checkpointing(name):
    model = _perturbed(name, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    model.set_grad_checkpointing()
    out_cp = model(x)  # grad enabled: the blocks really run under torch.utils.checkpoint
    assert out_cp.requires_grad and torch.equal(out, out_cp)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_backward_reaches_every_parameter(name):
    model = _perturbed(name, num_classes=5, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 48, 80, device=DEVICE)  # non-square, pos_embed resized from 4x4 to 3x5
    model(x).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().max() == 0]
    assert not zero
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model.eval()  # no DropPath randomness, compare with a plain backward
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(False)
    model(x).square().sum().backward()
    assert all(torch.allclose(ref[n], p.grad, rtol=1e-5, atol=1e-7) for n, p in model.named_parameters())
    assert grads.keys() == ref.keys()


def test_features_only_and_intermediates(tmp_path):
    model = _perturbed("test_vrwkv2").eval()  # depth 3
    x = torch.randn(2, 3, 64, 96, device=DEVICE)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 3 and all(t.shape == (2, 64, 4, 6) for t in inter)
    assert torch.allclose(final, model.forward_features(x))
    normed = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True)
    assert torch.allclose(normed[0], final)
    assert torch.allclose(model.forward_intermediates(x, indices=1, stop_early=True)[1][0], inter[-1])

    torch.save(model.state_dict(), tmp_path / "w.pth")  # weights are loaded before the feature wrapper prunes
    feats = vrwkv.create_model("test_vrwkv2", features_only=True, checkpoint_path=tmp_path / "w.pth").to(DEVICE)
    assert feats.feature_info.channels() == [64, 64, 64] and feats.feature_info.reduction() == [16, 16, 16]
    outs = feats(x)
    assert len(outs) == 3 and all(torch.allclose(o, i) for o, i in zip(outs, inter))
    two = timm.create_model("test_vrwkv2", features_only=True, out_indices=(0, 1)).to(DEVICE)
    assert len(two.model.layers) == 2 and len(two(x)) == 2  # blocks after the last index are pruned


def test_forward_backbone_has_the_official_out_indices_semantics():
    model = _perturbed("test_vrwkv2", out_indices=(0, -1)).eval()
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    first, last = model.forward_backbone(x)
    inter = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert torch.equal(first, inter[0])  # earlier outputs are not normalised
    assert torch.allclose(last, model.forward_features(x).reshape(1, 4, 4, 64).permute(0, 3, 1, 2))


@pytest.mark.parametrize("name,pooled_dim", [("test_vrwkv", 64), ("test_vrwkv2", 96)])
def test_reset_classifier_and_pre_logits(name, pooled_dim):
    model = _perturbed(name).eval()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    tokens = model.forward_features(x)
    pre = model.forward_head(tokens, pre_logits=True)
    assert pre.shape == (2, pooled_dim) and model.head_hidden_size == pooled_dim
    assert torch.allclose(model.get_classifier()(pre), model(x), atol=1e-6)
    model.reset_classifier(0)
    assert model.get_classifier().__class__.__name__ == "Identity"
    assert torch.allclose(model(x), pre, atol=1e-6)
    if name == "test_vrwkv":
        assert torch.allclose(model(x), tokens.mean(1), atol=1e-6)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    w = model.get_classifier().weight
    assert w.std().item() < 0.03 and model.get_classifier().bias.abs().max() == 0


def test_dynamic_size_and_patch_errors():
    model = _perturbed("test_vrwkv", num_classes=4).eval()
    for h, w in [(32, 32), (48, 80), (96, 64)]:
        assert model(torch.randn(1, 3, h, w, device=DEVICE)).shape == (1, 4)
        assert model.forward_features(torch.randn(1, 3, h, w, device=DEVICE)).shape == (1, h * w // 256, 64)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        model(torch.randn(1, 3, 50, 64, device=DEVICE))
    padded = timm.create_model("test_vrwkv", dynamic_img_pad=True).to(DEVICE)
    assert padded.forward_features(torch.randn(1, 3, 50, 64, device=DEVICE)).shape == (1, 16, 64)
    rect = timm.create_model("test_vrwkv", img_size=(32, 64))
    assert rect.pos_embed.shape == (1, 8, 64)
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model("test_vrwkv", img_size=72)


@pytest.mark.parametrize(
    "name,count",
    [("vrwkv_tiny", 6_155_176), ("vrwkv_small", 23_820_136), ("vrwkv_base", 93_645_544), ("vrwkv_large", 334_881_768)],
)
def test_parameter_counts(name, count):
    """Spec §3.4 (README: 6.2M / 23.8M / 93.7M / 334.9M), built on the meta device."""
    model = vrwkv.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count


def test_official_size_configurations():
    sizes = {n: vrwkv.create_model(n, device="meta") for n in ("vrwkv_tiny", "vrwkv_small", "vrwkv_large")}
    t, s, l = sizes["vrwkv_tiny"], sizes["vrwkv_small"], sizes["vrwkv_large"]
    assert t.layers[0].gamma1 is None and not t.layers[0].post_norm
    assert s.layers[0].post_norm and s.layers[3].gamma1.shape == (384,)
    assert l.grid_size == (12, 12) and len(l.layers) == 24 and l.layers[5].att.key_norm is not None
    assert l.layers[5].ffn.key_norm.normalized_shape == (4096,)
    assert [type(m).__name__ for m in l.head] == ["Linear", "Tanh", "Linear"] and l.head[0].out_features == 3072
    assert l.pretrained_cfg["input_size"] == (3, 384, 384) and t.pretrained_cfg["url"].endswith("vrwkv_t_in1k_224.pth")


def test_init():
    """Official init: trunc-normal(0.02) Linears incl. head, zero biases, LayerNorm 1/0, zero pos_embed, fancy
    decay/bonus/mix values, layer scale = init_values, PyTorch-default patch conv."""
    torch.manual_seed(0)
    model = vrwkv.create_model("vrwkv_small", num_classes=10)
    assert model.pos_embed.abs().max() == 0
    qkv = model.layers[3].att.key.weight
    # truncation bounds are +-2 absolute (mmcls TruncNormalInit), not +-2 std: values beyond 2 std do occur
    assert abs(qkv.std().item() - 0.02) < 0.002 and qkv.abs().max() > 0.05
    assert abs(model.head.weight.std().item() - 0.02) < 0.004 and model.head.bias.abs().max() == 0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 12 * 2 + 2 and all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)
    assert torch.all(model.layers[7].gamma2 == 1.0)
    conv = model.patch_embed.projection.weight
    assert conv.abs().max() <= 1 / math.sqrt(3 * 16 * 16) and conv.std() > 0.5 / math.sqrt(3 * 16 * 16 * 3)
    C, L = 384, 12
    for layer in (0, 11):
        att = model.layers[layer].att
        r0 = layer / (L - 1)
        c = torch.tensor([0, 100, 383], dtype=torch.float64)
        decay = -5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * r0)
        assert torch.allclose(att.spatial_decay[[0, 100, 383]].double(), decay, atol=1e-5)
        r1 = 1 - layer / L
        assert abs(att.spatial_mix_r[0, 0, 200].item() - (200 / C) ** (0.5 * r1)) < 1e-6
        assert abs(model.layers[layer].ffn.spatial_mix_k[0, 0, 200].item() - (200 / C) ** r1) < 1e-6


def test_options_reach_the_layers():
    model = timm.create_model("test_vrwkv", drop_path_rate=0.3, shift_mode="none", wkv_mode="causal",
                              wkv_semantics="paper", init_mode="global", final_norm=False, depth=3)
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in model.layers] == pytest.approx([0.0, 0.15, 0.3])
    assert not any("spatial_mix" in k for k in model.state_dict()) and "ln1.weight" not in model.state_dict()
    att = model.layers[1].att
    assert (att.wkv_mode, att.wkv_semantics) == ("causal", "paper") and torch.all(att.spatial_decay == 0)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 1000)
    with pytest.raises(ValueError, match="shift_mode"):
        timm.create_model("test_vrwkv", shift_mode="double_shift")


def test_timm_api_odds_and_ends():
    model = timm.create_model("test_vrwkv2")
    assert model.no_weight_decay() == set()
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 3 + 1  # stem, one per block, final norm + head
    assert {n for n, _ in model.named_parameters()} == {n for g in groups.values() for n in g}
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        vrwkv.create_model("resnet50")
    assert vrwkv.list_models("vrwkv_*") == ["vrwkv_base", "vrwkv_large", "vrwkv_small", "vrwkv_tiny"]
    assert set(vrwkv.list_models()) <= set(timm.list_models())
    assert timm.create_model("test_vrwkv", with_cp=True).grad_checkpointing


def _reference_block(blk, x, hw):
    """A block in the plain formulas of the spec (the implementation before the fused lerp / addcmul / in-place
    paths): separate mixes ``x * mu + shift(x) * (1 - mu)``, ``square(relu(.))``, ``x + gamma * branch``."""
    att, ffn = blk.att, blk.ffn

    def mixes(m, t, names):
        tt = q_shift(t, hw)
        return [t * getattr(m, n) + tt * (1 - getattr(m, n)) for n in names]

    def spatial(t):
        xk, xv, xr = mixes(att, t, ["spatial_mix_k", "spatial_mix_v", "spatial_mix_r"])
        T = t.shape[1]
        y = bi_wkv(att.key(xk), att.value(xv), att.spatial_decay / T, att.spatial_first / T, att.wkv_semantics)
        y = att.key_norm(y) if att.key_norm is not None else y
        return att.output(torch.sigmoid(att.receptance(xr)) * y)

    def channel(t):
        xk, xr = mixes(ffn, t, ["spatial_mix_k", "spatial_mix_r"])
        k = torch.square(torch.relu(ffn.key(xk)))
        k = ffn.key_norm(k) if ffn.key_norm is not None else k
        return torch.sigmoid(ffn.receptance(xr)) * ffn.value(k)

    def scale(b, g):
        return b if g is None else b * g

    x = blk.ln0(x) if blk.ln0 is not None else x
    if blk.post_norm:
        x = x + scale(blk.ln1(spatial(x)), blk.gamma1)
        return x + scale(blk.ln2(channel(x)), blk.gamma2)
    x = x + scale(spatial(blk.ln1(x)), blk.gamma1)
    return x + scale(channel(blk.ln2(x)), blk.gamma2)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_fast_paths_match_the_plain_formulas(name):
    """Logits and every parameter gradient against the plain-formula blocks in float64, and the no-autograd path
    (in-place activations, gates and residuals) against the autograd path."""
    model = _perturbed(name, num_classes=5).double().eval()
    x = torch.randn(2, 3, 48, 64, device=DEVICE, dtype=torch.float64)
    out = model(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    tokens, hw = model._embed(x)
    for blk in model.layers:
        tokens = _reference_block(blk, tokens, hw)
    ref = model.forward_head(model.ln1(tokens))
    assert rel_err(out, ref) < 1e-12
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), g)
    assert all(rel_err(a, b) < 1e-11 for a, b in zip(grads, ref_grads))
    with torch.inference_mode():
        assert rel_err(model(x), out) < 1e-13
    with torch.no_grad():
        assert rel_err(model(x), out) < 1e-13


def test_resized_pos_embed_follows_pos_embed():
    """The resized embedding is computed at every call (nothing kept between forwards): it follows in-place updates
    of ``pos_embed`` (an optimiser step, load_state_dict), and is differentiable with autograd."""
    from vrwkv.layers import resize_pos_embed

    model = _perturbed("test_vrwkv").eval()
    fresh = lambda hw: resize_pos_embed(model.pos_embed, model.grid_size, hw, model.interpolate_mode)  # noqa: E731
    x = torch.randn(1, 3, 48, 32, device=DEVICE)
    with torch.inference_mode():
        first = model.forward_features(x)
    with torch.no_grad():
        model.pos_embed.add_(1.0)
        assert torch.equal(model.pos_embed_for((3, 2)), fresh((3, 2)))
        assert not torch.equal(model.forward_features(x), first)
    with_grad = model.pos_embed_for((3, 3))
    with_grad.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("init_values", [None, 0.7])
def test_inference_residuals_in_place_keep_the_input_and_hooked_outputs(init_values):
    """Without autograd a block adds its residuals into tensors it owns (the spatial mix's output, and the residual
    stream, into which the channel mix adds its rows chunk by chunk): the block's input and a hook's kept outputs stay
    as they were, and the result equals the autograd path's."""
    model = _perturbed("test_vrwkv", num_classes=5, init_values=init_values).eval()
    blk = model.layers[1]
    tokens = torch.randn(2, 12, model.embed_dim, device=DEVICE)
    expected = blk(tokens, (3, 4))  # autograd on: no in-place writes
    kept_input = tokens.clone()
    with torch.no_grad():
        out = blk(tokens, (3, 4))
        att_out = blk.att(blk.ln1(tokens), (3, 4)).clone()
        seen = []
        handles = [m.register_forward_hook(lambda m, a, o: seen.append((o, o.clone()))) for m in (blk.att, blk.ffn)]
        try:
            hooked = blk(tokens, (3, 4))
        finally:
            for h in handles:
                h.remove()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(hooked, out) and torch.equal(tokens, kept_input)
    assert len(seen) == 2 and all(torch.equal(kept, copy) for kept, copy in seen)  # not written into afterwards
    torch.testing.assert_close(seen[0][0], att_out, rtol=0, atol=0)


def test_channel_mix_add_to_is_the_residual_sum_and_refuses_autograd(monkeypatch):
    from vrwkv.layers import ChannelMix
    import vrwkv.layers.channel_mix as channel_mix

    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", 5)  # several chunks, the last one short
    torch.manual_seed(3)
    ffn = ChannelMix(16, 1, 4).to(DEVICE)
    perturb_(ffn, 0.1)
    x, residual, gamma = (torch.randn(2, 12, 16, device=DEVICE) for _ in range(3))
    gamma = gamma[0, 0]
    with torch.no_grad():
        branch = ffn(x, (3, 4))
        plain, scaled = residual.clone(), residual.clone()
        assert ffn.add_to(plain, x, (3, 4)) is plain
        ffn.add_to(scaled, x, (3, 4), gamma)
    assert torch.equal(plain, residual + branch)
    assert torch.equal(scaled, torch.addcmul(residual, branch, gamma))
    with pytest.raises(RuntimeError, match="without autograd"):
        ffn.add_to(residual.clone(), x, (3, 4))
    with torch.no_grad(), pytest.raises(ValueError, match="must match"):
        ffn.add_to(residual[:, :6], x, (3, 4))
