"""resize_pos_embed: the official bicubic resize (no antialias, align_corners=False), non-square grids."""
import pytest
import torch
import torch.nn.functional as F

from vrwkv.layers import resize_pos_embed


def test_resize_matches_interpolate_on_the_grid():
    torch.manual_seed(0)
    H0, W0, C = 4, 4, 3
    pos = torch.randn(1, H0 * W0, C, dtype=torch.float64)
    for H, W in [(6, 5), (2, 3)]:  # up- and down-sampling, non-square
        out = resize_pos_embed(pos, (H0, W0), (H, W))
        grid = torch.stack([pos[0, :, c].reshape(H0, W0) for c in range(C)])[None]  # [1, C, H0, W0]
        ref = F.interpolate(grid, size=(H, W), mode="bicubic", align_corners=False, antialias=False)
        assert out.dtype == torch.float64 and out.shape == (1, H * W, C)
        for c in range(C):
            assert torch.equal(out[0, :, c], ref[0, c].flatten())
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos


def test_resize_rejects_wrong_grid():
    with pytest.raises(ValueError, match="3x3 grid"):
        resize_pos_embed(torch.zeros(1, 16, 2), (3, 3), (4, 4))
