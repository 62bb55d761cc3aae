"""Multi-scale deformable attention: grid_sample path vs a float64 loop over the kernel's bilinear sampling."""
import math

import pytest
import torch

from conftest import rel_err
from vrwkv.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference


def _inputs(N=2, M=2, D=3, Lq=5, P=3, shapes=((5, 7), (3, 2), (1, 1)), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    # locations partly outside [0, 1]: the zero padding and the border weights are exercised
    loc = torch.rand(N, Lq, M, len(shapes), P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    attn = torch.randn(N, Lq, M, len(shapes) * P, generator=g, dtype=dtype).softmax(-1)
    return value, list(shapes), loc, attn.view(N, Lq, M, len(shapes), P)


@pytest.mark.parametrize("shapes", [((5, 7), (3, 2), (1, 1)), ((4, 4),), ((6, 3), (2, 5))],
                         ids=["3lvl-odd", "1lvl", "2lvl"])
def test_ms_deform_attn_matches_loop_reference(shapes):
    value, shapes, loc, attn = _inputs(shapes=shapes)
    out = ms_deform_attn(value, shapes, loc, attn)
    ref = ms_deform_attn_reference(value, shapes, loc, attn)
    assert out.shape == (2, 5, 6)
    assert rel_err(out, ref) < 1e-12
    # float32 fast path, extreme values
    out32 = ms_deform_attn(value.float() * 1e4, shapes, loc.float(), attn.float())
    assert rel_err(out32, ref * 1e4) < 1e-5


def test_ms_deform_attn_exact_pixel_centres_read_the_pixel():
    # location ((j + 0.5) / W, (i + 0.5) / H) is the centre of pixel (i, j): bilinear weight 1 on it
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)
    loc = torch.tensor([(1.5 / 4, 2.5 / 3), (3.5 / 4, 0.5 / 3)], dtype=torch.float64).view(1, 2, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(3, 4)], loc, torch.ones(1, 2, 1, 1, 1, dtype=torch.float64))
    assert torch.allclose(out.flatten(), torch.tensor([2 * 4 + 1, 0 * 4 + 3], dtype=torch.float64), atol=1e-12)


def test_ms_deform_attn_gradcheck():
    value, shapes, loc, attn = _inputs(N=1, M=2, D=2, Lq=2, P=2, shapes=((3, 4), (2, 1)))
    loc = loc.clamp(0.05, 0.95)  # away from integer pixel coordinates where bilinear is not differentiable
    args = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, shapes, l, a), args)


def test_ms_deform_attn_rejects_bad_shapes():
    value, shapes, loc, attn = _inputs()
    with pytest.raises(ValueError, match="positions"):
        ms_deform_attn(value, [(5, 7), (3, 2)], loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, loc, attn[..., :1])


def test_msdeformattn_module_official_init_and_forward():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=8, n_levels=2, n_heads=4, n_points=3, ratio=0.5).double()
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    # head h points along angle 2*pi*h/4 -> (1,0), (0,1), (-1,0), (0,-1), at distances 1, 2, 3 on every level
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    for p in range(3):
        assert torch.allclose(bias[:, 1, p], dirs * (p + 1), atol=1e-6)
    assert m.attention_weights.weight.abs().sum() == 0 and m.value_proj.weight.shape == (4, 8)
    with torch.no_grad():  # non-trivial offsets and weights
        m.sampling_offsets.weight.normal_(0, 0.3)
        m.attention_weights.weight.normal_(0, 0.5)
    shapes = [(3, 5), (2, 2)]
    q = torch.randn(2, 4, 8, dtype=torch.float64)
    feat = torch.randn(2, 19, 8, dtype=torch.float64)
    ref_pts = torch.rand(1, 4, 1, 2, dtype=torch.float64)
    out = m(q, ref_pts, feat, shapes)
    # the same computation spelled out with the loop reference
    value = m.value_proj(feat).view(2, 19, 4, 1)
    off = m.sampling_offsets(q).view(2, 4, 4, 2, 3, 2)
    w = m.attention_weights(q).view(2, 4, 4, 6).softmax(-1).view(2, 4, 4, 2, 3)
    norm = torch.tensor([[5.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    loc = ref_pts[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    ref = m.output_proj(ms_deform_attn_reference(value, shapes, loc, w))
    assert rel_err(out, ref) < 1e-12
    with pytest.raises(ValueError, match="levels"):
        m(q, ref_pts, feat, [(3, 5)])
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
