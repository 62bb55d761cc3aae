"""resize_pos_embed: the official bicubic resize (no antialias, align_corners=False), non-square grids."""
import pytest
import torch
import torch.nn.functional as F

from vrwkv.layers import resize_pos_embed


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest", "nearest-exact", "area"])
def test_resize_matches_interpolate_on_the_grid(mode):
    """Up- and down-sampling, non-square, a single row: F.interpolate's values (no antialias, align_corners=False)
    to float64 rounding in float64, and in float32 within float32 rounding of F.interpolate in float64 (the
    separable modes compute in float64); ``area`` (not separable here) is F.interpolate itself."""
    torch.manual_seed(0)
    H0, W0, C = 4, 4, 3
    pos = torch.randn(1, H0 * W0, C, dtype=torch.float64)
    kwargs = {} if mode.startswith("nearest") or mode == "area" else {"align_corners": False}
    for H, W in [(6, 5), (2, 3), (1, 9), (16, 16)]:
        grid = torch.stack([pos[0, :, c].reshape(H0, W0) for c in range(C)])[None]  # [1, C, H0, W0]
        ref = F.interpolate(grid, size=(H, W), mode=mode, **kwargs)  # [1, C, H, W]
        ref = torch.stack([ref[0, c].flatten() for c in range(C)], -1)[None]  # [1, H*W, C]
        out = resize_pos_embed(pos, (H0, W0), (H, W), mode)
        assert out.dtype == torch.float64 and out.shape == (1, H * W, C) and out.is_contiguous()
        assert torch.allclose(out, ref, rtol=0, atol=1e-14)
        out32 = resize_pos_embed(pos.float(), (H0, W0), (H, W), mode)
        assert out32.dtype == torch.float32 and torch.allclose(out32.double(), ref, rtol=1e-7, atol=1e-7)
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos


def test_resize_is_differentiable_after_an_inference_mode_call():
    """The 1-D weights are kept between calls: made in inference mode first, they still serve autograd later."""
    pos = torch.randn(1, 9, 2, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        resize_pos_embed(pos, (3, 3), (5, 7))
    assert torch.autograd.gradcheck(lambda p: resize_pos_embed(p, (3, 3), (5, 7)), (pos,))


def test_resize_rejects_wrong_grid():
    with pytest.raises(ValueError, match="3x3 grid"):
        resize_pos_embed(torch.zeros(1, 16, 2), (3, 3), (4, 4))
