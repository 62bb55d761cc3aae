"""shift_mix / shift_mix_linear: the plain formula's values and gradients with a leaner autograd graph."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err, saved_bytes
from vrwkv.layers import make_shift
from vrwkv.layers.shift_mix import shift_mix, shift_mix_linear

pytestmark = pytest.mark.usefixtures("one_thread")

# (mode, suffix tokens): Q-Shift, VRWKV6's per-head Q-Shift with a trailing cls token, the 1-D token shift
SHIFTS = [("q_shift", 0), ("q_shift_multihead", 1), ("token_shift", 0)]
H, W = 3, 5  # odd grid


def _inputs(C: int, suffix: int, n: int, outs: tuple[int, ...] = (), scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(2, H * W + suffix, C, dtype=torch.float64, generator=g)
    mix = torch.rand(n, 1, 1, C, dtype=torch.float64, generator=g) * 1.6 - 0.3  # also outside [0, 1]
    weights = [torch.randn(o, C, dtype=torch.float64, generator=g) for o in outs]
    return [t.requires_grad_() for t in (x, mix, *weights)]


def _reference(x, mix, shift, weights=()):
    """The plain formula through autograd: ``x * mu + shift(x) * (1 - mu)`` per mix, then the Linears."""
    xx = shift(x, (H, W))
    mixes = [x * m + xx * (1 - m) for m in mix.unbind(0)]
    return [F.linear(m, w) for m, w in zip(mixes, weights)] if weights else torch.stack(mixes)


@pytest.mark.parametrize("mode,suffix", SHIFTS)
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_shift_mix_matches_the_formula(mode, suffix, scale):
    """Values and all gradients (x, mu) against autograd through the formula, float64 (also with 1e30-sized x)."""
    shift = make_shift(mode, head_size=8, num_suffix_tokens=suffix)
    x, mix = _inputs(16, suffix, 3, scale=scale)
    out, ref = shift_mix(x, (H, W), shift, mix), _reference(x, mix, shift)
    assert out.shape == (3, 2, H * W + suffix, 16) and rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, mix), g), torch.autograd.grad(ref, (x, mix), g)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("mode,suffix", SHIFTS)
@pytest.mark.parametrize("channel_major", [False, True])
def test_shift_mix_linear_matches_the_formula(mode, suffix, channel_major):
    """Projections of two mixes of different widths (odd C = 13, outputs 29 and 13), token-major or channel-major
    (consumed through a transposed view, as the spatial mix does, so their gradients arrive non-contiguous): values
    and the gradients of x, mu and both weights against autograd through the formula, float64."""
    shift = make_shift(mode, head_size=13, num_suffix_tokens=suffix)
    x, mix, *weights = _inputs(13, suffix, 2, outs=(29, 13), seed=1)
    outs = shift_mix_linear(x, (H, W), shift, mix, weights, channel_major=channel_major)
    refs = _reference(x, mix, shift, weights)
    if channel_major:
        assert [o.shape for o in outs] == [(29, 2, H * W + suffix), (13, 2, H * W + suffix)]
        outs = [o.permute(1, 2, 0) for o in outs]  # [B, T, out] views
    assert [o.shape[-1] for o in outs] == [29, 13]
    assert all(rel_err(o, r) < 1e-12 for o, r in zip(outs, refs))
    gs = [torch.randn_like(o) for o in outs]
    inputs = (x, mix, *weights)
    for a, b in zip(torch.autograd.grad(outs, inputs, gs), torch.autograd.grad(refs, inputs, gs)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("mode,suffix", SHIFTS)
@pytest.mark.parametrize("channel_major", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_shift_mix_linear_with_its_norm_matches_the_formula(mode, suffix, channel_major, affine):
    """``norm=`` (a LayerNorm over C applied first): values and the gradients of x, mu, the norm's weight and bias
    and both weights against autograd through ``F.layer_norm`` and the formula, float64; without affine parameters
    too."""
    shift = make_shift(mode, head_size=13, num_suffix_tokens=suffix)
    x, mix, *weights = _inputs(13, suffix, 2, outs=(29, 13), seed=7)
    g = torch.Generator().manual_seed(8)
    norm_w, norm_b = ((torch.rand(13, dtype=torch.float64, generator=g) + 0.5).requires_grad_(),
                      torch.randn(13, dtype=torch.float64, generator=g).requires_grad_()) if affine else (None, None)
    outs = shift_mix_linear(x, (H, W), shift, mix, weights, channel_major=channel_major, norm=(norm_w, norm_b, 1e-5))
    refs = _reference(F.layer_norm(x, (13,), norm_w, norm_b, 1e-5), mix, shift, weights)
    if channel_major:
        outs = [o.permute(1, 2, 0) for o in outs]  # [B, T, out] views
    assert all(rel_err(o, r) < 1e-12 for o, r in zip(outs, refs))
    gs = [torch.randn_like(o) for o in outs]
    inputs = (x, mix, *weights, *((norm_w, norm_b) if affine else ()))
    for a, b in zip(torch.autograd.grad(outs, inputs, gs), torch.autograd.grad(refs, inputs, gs)):
        assert rel_err(a, b) < 1e-12
    with torch.no_grad():  # without autograd: the same values
        plain = shift_mix_linear(x, (H, W), shift, mix, weights, channel_major=channel_major,
                                 norm=(norm_w, norm_b, 1e-5))
    assert all(rel_err(p.permute(1, 2, 0) if channel_major else p, r) < 1e-12 for p, r in zip(plain, refs))


def test_norm_gradcheck_and_frozen_norm():
    """gradcheck with the norm, and a frozen norm (its parameters without gradients) or a frozen x."""
    shift = make_shift("q_shift", shift_pixel=1)
    x, mix, w1 = _inputs(8, 0, 1, outs=(5,), seed=9)
    norm_w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    norm_b = torch.randn(8, dtype=torch.float64).requires_grad_()
    f = lambda x, m, a, nw, nb: shift_mix_linear(x, (H, W), shift, m, (a,), True, norm=(nw, nb, 1e-5))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, mix, w1, norm_w, norm_b))
    for frozen in ("norm", "x"):
        nw, nb = (norm_w.detach(), norm_b.detach()) if frozen == "norm" else (norm_w, norm_b)
        xx = x.detach() if frozen == "x" else x
        (out,) = shift_mix_linear(xx, (H, W), shift, mix, (w1,), norm=(nw, nb, 1e-5))
        (ref,) = _reference(F.layer_norm(xx, (8,), nw, nb, 1e-5), mix, shift, (w1,))
        inputs = [t for t in (xx, mix, w1, nw, nb) if t.requires_grad]
        for a, b in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
            assert rel_err(a, b) < 1e-12


def test_any_differentiable_shift():
    """A shift that is not one of the library's (here not even linear): gradients through its vector-Jacobian
    product, equal to autograd through the formula, float64."""
    shift = lambda x, hw: torch.roll(x, 2, 1).tanh() * hw[0]  # noqa: E731
    x, mix, w = _inputs(8, 0, 1, outs=(4,), seed=6)
    for out, ref in [(shift_mix(x, (H, W), shift, mix), _reference(x, mix, shift)),
                     (shift_mix_linear(x, (H, W), shift, mix, (w,))[0], _reference(x, mix, shift, (w,))[0])]:
        assert rel_err(out, ref) < 1e-12
        inputs = (x, mix, w) if out.shape[-1] == 4 else (x, mix)
        for a, b in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
            assert rel_err(a, b) < 1e-12


def test_gradcheck():
    shift = make_shift("q_shift", shift_pixel=1)
    x, mix, w1, w2 = _inputs(8, 0, 2, outs=(5, 3), seed=2)
    assert torch.autograd.gradcheck(lambda x, m: shift_mix(x, (H, W), shift, m), (x, mix))
    for channel_major in (False, True):
        f = lambda x, m, a, b: shift_mix_linear(x, (H, W), shift, m, (a, b), channel_major)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, mix, w1, w2))


def test_partial_requires_grad():
    """Frozen weights, or a constant x: only the gradients asked for, equal to the formula's."""
    shift = make_shift("q_shift")
    x, mix, w = _inputs(8, 0, 1, outs=(6,), seed=3)
    (out,) = shift_mix_linear(x, (H, W), shift, mix, (w.detach(),))
    (ref,) = _reference(x, mix, shift, (w.detach(),))
    for a, b in zip(torch.autograd.grad(out.sum(), (x, mix)), torch.autograd.grad(ref.sum(), (x, mix))):
        assert rel_err(a, b) < 1e-12
    (out,) = shift_mix_linear(x.detach(), (H, W), shift, mix, (w,))
    (ref,) = _reference(x.detach(), mix, shift, (w,))
    for a, b in zip(torch.autograd.grad(out.sum(), (mix, w)), torch.autograd.grad(ref.sum(), (mix, w))):
        assert rel_err(a, b) < 1e-12


def test_keeps_only_x_for_the_backward():
    """The point of the functions: autograd keeps x (and the tiny mu) only; through the formula it keeps shift(x), x
    and the mixes."""
    shift = make_shift("q_shift")
    x, mix, w1, w2 = (t.float() for t in _inputs(16, 0, 2, outs=(64, 16), seed=4))
    unit, small = x.numel() * 4, mix.numel() * 4
    saved, _ = saved_bytes(lambda: shift_mix(x, (H, W), shift, mix))
    assert saved == unit + small
    saved, _ = saved_bytes(lambda: shift_mix_linear(x, (H, W), shift, mix, (w1, w2)), (w1, w2))
    assert saved == unit + small
    plain, _ = saved_bytes(lambda: [F.linear(m, w) for m, w in zip(torch.lerp(shift(x, (H, W)), x, mix), (w1, w2))],
                            (w1, w2))
    assert plain >= 4 * unit  # shift(x), x, the two mixes
    # with its norm: x and the norm's statistics (mean, 1/std per token), not the normalised tokens too
    norm = torch.nn.LayerNorm(16)
    stats = 2 * x.numel() // 16 * 4
    saved, _ = saved_bytes(lambda: shift_mix_linear(x, (H, W), shift, mix, (w1, w2), norm=(norm.weight, norm.bias,
                                                                                           norm.eps)),
                            (w1, w2, norm.weight, norm.bias))
    assert saved == unit + small + stats


@pytest.mark.parametrize("channel_major", [False, True])
def test_autocast_matches_autograd_through_autocast(channel_major):
    """Under CPU bfloat16 autocast the projections come out in bfloat16 as F.linear's do, and the gradients (in the
    inputs' float32) agree with autograd through autocast's casts up to bfloat16 rounding."""
    shift = make_shift("q_shift")
    x, mix, w1, w2 = (t.detach().float().requires_grad_() for t in _inputs(16, 0, 2, outs=(64, 16), seed=5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = shift_mix_linear(x, (H, W), shift, mix, (w1, w2), channel_major)
        refs = [F.linear(m, w) for m, w in zip(torch.lerp(shift(x, (H, W)), x, mix), (w1, w2))]
        refs = [r.permute(2, 0, 1) for r in refs] if channel_major else refs
    assert all(o.dtype == torch.bfloat16 for o in outs)
    # token-major: the very ops of the formula; channel-major: the same products, summed in another order
    assert all(rel_err(o, r) < 1e-2 if channel_major else torch.equal(o, r) for o, r in zip(outs, refs))
    gs = [torch.randn_like(o) for o in outs]
    inputs = (x, mix, w1, w2)
    grads, ref_grads = torch.autograd.grad(outs, inputs, gs), torch.autograd.grad(refs, inputs, gs)
    assert all(a.dtype == torch.float32 and rel_err(a, b) < 2e-2 for a, b in zip(grads, ref_grads))


def test_bad_arguments_raise():
    shift = make_shift("q_shift")
    x, mix, w = _inputs(8, 0, 2, outs=(4,))
    with pytest.raises(ValueError, match="mix must be"):
        shift_mix(x, (H, W), shift, mix[:, 0])
    with pytest.raises(ValueError, match="2 mixes but 1 weights"):
        shift_mix_linear(x, (H, W), shift, mix, (w,))
    with pytest.raises(ValueError, match="weights must be"):
        shift_mix_linear(x, (H, W), shift, mix, (w, w.t()))


@pytest.mark.parametrize("channel_major", [False, True])
def test_inference_projects_each_mix_from_one_buffer(channel_major):
    """Without autograd the mixes are written one at a time into one buffer and projected: equal to projecting the
    stacked mixes (float64)."""
    shift = make_shift("q_shift")
    x, mix, *weights = _inputs(12, 0, 3, outs=(7, 12, 5), seed=3)
    with torch.no_grad():
        outs = shift_mix_linear(x, (H, W), shift, mix, weights, channel_major=channel_major)
    refs = _reference(x, mix, shift, weights)
    if channel_major:
        outs = [o.permute(1, 2, 0) for o in outs]
    assert all(rel_err(o, r) < 1e-14 for o, r in zip(outs, refs))


def test_inference_mixes_into_the_callers_buffer():
    """mix_buffer: the mixes go into the caller's buffer (it holds the last mix afterwards, for the caller to reuse),
    same projections; a buffer of another shape or dtype is refused."""
    shift = make_shift("q_shift")
    x, mix, *weights = _inputs(12, 0, 3, outs=(12, 12, 12), seed=4)
    buffer = torch.empty_like(x)
    with torch.no_grad():
        outs = shift_mix_linear(x, (H, W), shift, mix, weights, mix_buffer=buffer)
        assert all(torch.equal(o, r) for o, r in zip(outs, shift_mix_linear(x, (H, W), shift, mix, weights)))
        assert rel_err(buffer, torch.lerp(shift(x, (H, W)), x, mix[2])) < 1e-14
        with pytest.raises(ValueError, match="mix_buffer must be contiguous"):
            shift_mix_linear(x, (H, W), shift, mix, weights, mix_buffer=buffer[:, 1:])
        with pytest.raises(ValueError, match="mix_buffer must be contiguous"):
            shift_mix_linear(x, (H, W), shift, mix, weights, mix_buffer=buffer.float())
