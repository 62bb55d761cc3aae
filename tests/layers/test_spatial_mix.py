"""SpatialMix: fancy/local/global init (spec §1.7), parameter layout, composition, and the WKV-mode ablations."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import perturb_, rel_err
from vrwkv.layers import SpatialMix, q_shift
from vrwkv.ops import bi_wkv
from vrwkv.ops.wkv.reference import naive_official_bi_wkv


def test_fancy_init_formulas():
    C, depth, layer = 12, 3, 1
    m = SpatialMix(C, layer, depth)
    r0, r1 = layer / (depth - 1), 1 - layer / depth
    c = torch.arange(C, dtype=torch.float64)
    decay = -5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * r0)
    assert torch.allclose(m.spatial_decay.double(), decay, atol=1e-6)
    assert m.spatial_decay[0].item() == -5 and abs(m.spatial_decay[-1].item() - 3) < 1e-6
    first = torch.tensor([math.log(0.3) + 0.5 * (((i + 1) % 3) - 1) for i in range(C)], dtype=torch.float64)
    assert torch.allclose(m.spatial_first.double(), first, atol=1e-6)
    x = c / C
    assert torch.allclose(m.spatial_mix_k.double().flatten(), x**r1, atol=1e-6)
    assert torch.allclose(m.spatial_mix_v.double().flatten(), x**r1 + 0.3 * r0, atol=1e-6)
    assert torch.allclose(m.spatial_mix_r.double().flatten(), x ** (0.5 * r1), atol=1e-6)
    assert m.spatial_mix_k.shape == (1, 1, C) and m.spatial_decay.shape == (C,)


def test_other_init_modes_and_layout():
    local, glob = SpatialMix(8, 0, 2, init_mode="local"), SpatialMix(8, 0, 2, init_mode="global")
    assert torch.all(local.spatial_decay == 1) and torch.all(local.spatial_mix_v == 1)
    assert torch.all(glob.spatial_first == 0) and torch.all(glob.spatial_mix_r == 0.5)
    names = [n for n, _ in SpatialMix(8, 0, 2, key_norm=True).named_parameters()]
    assert names == ["spatial_decay", "spatial_first", "spatial_mix_k", "spatial_mix_v", "spatial_mix_r",
                     "key.weight", "value.weight", "receptance.weight", "key_norm.weight", "key_norm.bias",
                     "output.weight"]
    no_shift = [n for n, _ in SpatialMix(8, 0, 2, shift_mode="none").named_parameters()]
    assert not any(n.startswith("spatial_mix") for n in no_shift)
    with pytest.raises(ValueError, match="wkv_semantics"):
        SpatialMix(8, 0, 2, wkv_semantics="kernel")
    with pytest.raises(ValueError, match="wkv_mode"):
        SpatialMix(8, 0, 2, wkv_mode="forward")
    with pytest.raises(ValueError, match="init_mode"):
        SpatialMix(8, 0, 2, init_mode="xavier")


def test_forward_is_the_spec_composition():
    """Shift-mix of the unshifted token, w/T and u/T, sigmoid receptance gate (spec §1.4), in float64."""
    torch.manual_seed(0)
    H, W, C = 5, 7, 8  # T = 35 > 32 tokens: the official semantics differ from the paper formula here
    m = SpatialMix(C, 1, 3, key_norm=True).double()
    perturb_(m)
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    xx = q_shift(x, (H, W))
    mix = lambda mu: x * mu + xx * (1 - mu)  # noqa: E731
    k, v = mix(m.spatial_mix_k) @ m.key.weight.T, mix(m.spatial_mix_v) @ m.value.weight.T
    r = torch.sigmoid(mix(m.spatial_mix_r) @ m.receptance.weight.T)
    y = naive_official_bi_wkv(k, v, m.spatial_decay / (H * W), m.spatial_first / (H * W))
    y = torch.nn.functional.layer_norm(y, (C,), m.key_norm.weight, m.key_norm.bias)
    expected = (r * y) @ m.output.weight.T
    assert rel_err(m(x, (H, W)), expected) < 1e-12
    m.wkv_semantics = "paper"
    assert rel_err(m(x, (H, W)), expected) > 1e-4  # the two semantics really differ at T = 35


@pytest.mark.parametrize("wkv_mode", ["causal", "bidirectional"])
def test_causal_mode_with_token_shift_sees_only_the_past(wkv_mode):
    """The paper's uni-directional ablation: with the 1-D token shift and causal WKV, output t ignores tokens > t."""
    torch.manual_seed(0)
    m = SpatialMix(8, 0, 2, shift_mode="token_shift", wkv_mode=wkv_mode).double()
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 8:] += 1.0
    y, y2 = m(x, (3, 4)), m(x2, (3, 4))
    past_change = rel_err(y2[:, :8], y[:, :8])
    assert (past_change < 1e-12) if wkv_mode == "causal" else (past_change > 1e-3)


def test_inference_path_channel_slices_and_gradients_match_the_formula():
    """The no-autograd path (gate in place), the WKV of a channel slice, and the gradients of every input and
    parameter against the plain formula (old implementation: three separate mixes and projections), float64."""
    torch.manual_seed(2)
    H, W, C = 3, 5, 8
    m = SpatialMix(C, 1, 3, key_norm=True).double()
    perturb_(m)
    x = torch.randn(2, H * W, C, dtype=torch.float64, requires_grad=True)
    out = m(x, (H, W))
    with torch.inference_mode():
        assert rel_err(m(x.detach(), (H, W)), out) < 1e-14
        k, v, _ = m.project(m.token_mix(x.detach(), (H, W)))
        full = m.wkv(k, v, H * W)
        part = m.wkv(k[..., 2:5].contiguous(), v[..., 2:5].contiguous(), H * W, slice(2, 5))
        assert rel_err(part, full[..., 2:5]) < 1e-14
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)

    def formula(x):
        xx = q_shift(x, (H, W))
        mix = lambda mu: x * mu + xx * (1 - mu)  # noqa: E731
        k, v = m.key(mix(m.spatial_mix_k)), m.value(mix(m.spatial_mix_v))
        y = bi_wkv(k, v, m.spatial_decay / (H * W), m.spatial_first / (H * W), semantics="official")
        return m.output(torch.sigmoid(m.receptance(mix(m.spatial_mix_r))) * m.key_norm(y))

    ref = torch.autograd.grad(formula(x), [x, *m.parameters()], g)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, ref))


def _perturbed(m: SpatialMix) -> SpatialMix:
    perturb_(m)
    return m


def _token_major_formula(m: SpatialMix, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The spatial mix written plainly token-major (Linears on [B, T, C], contiguous k, v for the op)."""
    xx = q_shift(x, hw)
    mix = lambda mu: x * mu + xx * (1 - mu)  # noqa: E731
    k, v = m.key(mix(m.spatial_mix_k)), m.value(mix(m.spatial_mix_v))
    T = x.shape[1]
    y = bi_wkv(k, v, m.spatial_decay / T, m.spatial_first / T, semantics=m.wkv_semantics)
    if m.key_norm is not None:
        y = m.key_norm(y)
    return m.output(torch.sigmoid(m.receptance(mix(m.spatial_mix_r))) * y)


@pytest.mark.parametrize("semantics", ["official", "paper"])
@pytest.mark.parametrize("key_norm", [False, True])
def test_forward_and_gradients_match_the_token_major_formula(key_norm, semantics):
    """The channel-major forward (no key_norm) and the token-major one (key_norm): outputs with and without
    autograd and the gradients of the input and of every parameter against the plain formula, float64, an odd grid
    of more than 32 tokens (the official semantics' chunks), batch 3."""
    torch.manual_seed(3)
    H, W, C = 5, 7, 6
    m = _perturbed(SpatialMix(C, 1, 3, key_norm=key_norm, wkv_semantics=semantics).double())
    assert m.channel_major is not key_norm
    x = torch.randn(3, H * W, C, dtype=torch.float64, requires_grad=True)
    out, ref = m(x, (H, W)), _token_major_formula(m, x, (H, W))
    assert out.shape == (3, H * W, C) and out.is_contiguous()
    assert rel_err(out, ref) < 1e-12
    with torch.no_grad():
        assert rel_err(m(x, (H, W)), ref) < 1e-12
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    expected = torch.autograd.grad(ref, [x, *m.parameters()], g)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, expected))


def test_channel_major_float32_block_path_matches_token_major():
    """float32 runs the block-matrix op, which reads channel-major k, v through other strides (and at T = 4095 the
    official kernel chunks span several blocks): same result as token-major inputs, with and without autograd."""
    torch.manual_seed(4)
    H, W, C = 63, 65, 8
    m = _perturbed(SpatialMix(C, 2, 4))
    x = torch.randn(2, H * W, C, requires_grad=True)
    ref = _token_major_formula(m, x, (H, W))
    assert rel_err(m(x, (H, W)), ref) < 1e-5
    with torch.inference_mode():
        assert rel_err(m(x.detach(), (H, W)), ref) < 1e-5


def test_token_major_where_channel_major_does_not_apply():
    assert not SpatialMix(8, 0, 2, key_norm=True).channel_major
    assert not SpatialMix(8, 0, 2, wkv_mode="causal").channel_major
    assert SpatialMix(8, 0, 2, shift_mode="none").channel_major


class _OpLog(TorchDispatchMode):
    """Records every aten op with its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("y_storage", ["bct", "cbt"])
def test_channel_major_stages_never_copy(grad, y_storage):
    """The channel-major gate and output projection run without a layout copy whatever the channel-major storage
    of the WKV result ([B, C, T] or [C, B, T]); in the backward, the input gradients reach the stack of the
    token-mix gradients token-major (the mm backward keeps the input layout: no transposing copies)."""
    torch.manual_seed(5)
    B, T, C = 3, 10, 8
    m = _perturbed(SpatialMix(C, 1, 3))
    xkvr = torch.randn(3, B, T, C, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        k, v, r = m.project_channel_major(xkvr)
        assert k.shape == (B, C, T) and k.stride() == (T, B * T, 1)
        y = torch.randn(B, C, T) if y_storage == "bct" else torch.randn(C, B, T).transpose(0, 1)
        y = y + 0 * (k + v)  # k, v feed it, as they feed the WKV
        ref = ((torch.sigmoid(r) * y).transpose(1, 2) @ m.output.weight.t()).detach()
        with _OpLog() as log:
            out = m.gate_output_channel_major(r, y)
        assert rel_err(out, ref) < 1e-6
        copies = [f for f, _ in log.calls if f in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default,
                                                      torch.ops.aten._to_copy.default)]
        assert not copies
        if grad:
            with _OpLog() as log:
                out.backward(torch.randn_like(out))
            stacked = [a for f, a in log.calls if f in (torch.ops.aten.stack.default, torch.ops.aten.cat.default)]
            assert stacked and all(t.is_contiguous() for a in stacked for t in a[0])
            assert xkvr.grad.shape == xkvr.shape


def test_gated_output_keeps_r_and_y_only_and_matches_the_formula():
    """The training gate + output projection: float64 values and gradients equal ``(sigmoid(r) * y)^T W^T``, gradcheck,
    and autograd keeps r, y, W (not sigmoid(r) nor the gate)."""
    from vrwkv.layers.spatial_mix import gated_output_channel_major

    g = torch.Generator().manual_seed(0)
    B, C, T, C_out = 2, 5, 7, 4
    r = torch.randn(C, B, T, generator=g, dtype=torch.float64).transpose(0, 1).requires_grad_()  # [B, C, T] view
    y = torch.randn(B, C, T, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(C_out, C, generator=g, dtype=torch.float64).requires_grad_()
    out = gated_output_channel_major(r, y, weight)
    plain = (torch.sigmoid(r) * y).transpose(1, 2) @ weight.t()
    assert out.shape == (B, T, C_out) and rel_err(out, plain) < 1e-14
    grad = torch.randn(B, T, C_out, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (r, y, weight), grad), torch.autograd.grad(plain, (r, y, weight), grad)):
        assert rel_err(a, b) < 1e-12
    assert torch.autograd.gradcheck(gated_output_channel_major, (r, y, weight))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_output_channel_major(r, y, weight)
    assert len(saved) == 3 and saved[0] is r and saved[1] is y


def test_token_major_inference_predicate(fused_cpu_scan, monkeypatch):
    """Token-major k, v, r into the fused scan's token-major kernel exactly in inference on CPU float32/float64 with
    the fused scans on and the channel-major path otherwise applying (not for key_norm, the causal WKV, autograd,
    half precision, the scans off, or the module flag off)."""
    from vrwkv.layers import spatial_mix
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    m, x = SpatialMix(8, 0, 2), torch.randn(1, 6, 8)
    assert not m.token_major_inference(x)  # autograd on: the training path
    with torch.no_grad():
        assert m.token_major_inference(x) and m.token_major_inference(x.double())
        assert SpatialMix(8, 0, 2, shift_mode="none").token_major_inference(x)
        assert not m.token_major_inference(x.bfloat16())
        assert not SpatialMix(8, 0, 2, key_norm=True).token_major_inference(x)
        assert not SpatialMix(8, 0, 2, wkv_mode="causal").token_major_inference(x)
        with numba_scans(False):
            assert not m.token_major_inference(x)
        monkeypatch.setattr(spatial_mix, "token_major_fused_inference", False)
        assert not m.token_major_inference(x)


def _paths(m, x, hw):
    """m(x, hw) without autograd: numba on token-major, numba on channel-major (the module flag off), numba off."""
    from vrwkv.layers import spatial_mix
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    out = {}
    with torch.inference_mode():
        with numba_scans():
            assert m.token_major_inference(x) if hasattr(m, "token_major_inference") else True
            out["token_major"] = m(x, hw) if hw is not None else m(x)
            spatial_mix.token_major_fused_inference = False
            try:
                out["channel_major"] = m(x, hw) if hw is not None else m(x)
            finally:
                spatial_mix.token_major_fused_inference = True
        with numba_scans(False):
            out["no_numba"] = m(x, hw) if hw is not None else m(x)
    return out


@pytest.mark.parametrize("semantics", ["official", "paper"])
@pytest.mark.parametrize("shift_mode, C", [("q_shift", 20), ("q_shift", 22), ("none", 22)])
def test_token_major_inference_matches_the_channel_major_path(semantics, shift_mode, C):
    """The fused token-major inference path against the channel-major one and the block path (numba off) in float32
    (matmul orders differ: within float32 rounding), and against the plain formula in float64; odd grid, batch 3."""
    torch.manual_seed(6)
    H, W = 7, 9  # T = 63: odd, more than one official kernel chunk
    m = _perturbed(SpatialMix(C, 1, 3, shift_mode=shift_mode, wkv_semantics=semantics)).eval()
    x = torch.randn(3, H * W, C)
    out = _paths(m, x, (H, W))
    assert out["token_major"].shape == (3, H * W, C) and out["token_major"].is_contiguous()
    assert rel_err(out["token_major"], out["channel_major"]) < 2e-6
    assert rel_err(out["token_major"], out["no_numba"]) < 1e-5
    m64, x64 = m.double(), x.double()
    out64 = _paths(m64, x64, (H, W))
    if m.shift is not None:
        with torch.inference_mode():
            assert rel_err(out64["token_major"], _token_major_formula(m64, x64, (H, W))) < 1e-12
    assert rel_err(out64["token_major"], out64["no_numba"]) < 1e-12


def test_token_major_inference_of_the_model(fused_cpu_scan):
    """VRWKV-T features in inference: the token-major path against the channel-major one and numba off."""
    import vrwkv

    torch.manual_seed(0)
    model = vrwkv.create_model("vrwkv_tiny", num_classes=0).eval()
    x = torch.randn(2, 3, 112, 112)
    out = _paths(model, x, None)
    assert rel_err(out["token_major"], out["channel_major"]) < 1e-5
    assert rel_err(out["token_major"], out["no_numba"]) < 1e-5


def test_training_with_the_fused_scans_stays_channel_major(fused_cpu_scan, monkeypatch):
    """With autograd the forward and the gradients do not depend on the inference flag: the channel-major path."""
    from vrwkv.layers import spatial_mix

    torch.manual_seed(7)
    m = _perturbed(SpatialMix(12, 1, 3))
    x = torch.randn(2, 35, 12, requires_grad=True)
    results = []
    for flag in (True, False):
        monkeypatch.setattr(spatial_mix, "token_major_fused_inference", flag)
        assert not m.token_major_inference(x)
        out = m(x, (5, 7))
        results.append((out, torch.autograd.grad(out.square().sum(), [x, *m.parameters()])))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a, b) and all(torch.equal(g, h) for g, h in zip(grads_a, grads_b))
