"""PatchEmbed: raster-order tokens, the strict size check and the official 'corner' padding."""
import pytest
import torch
import torch.nn.functional as F

from vrwkv.layers import PatchEmbed


def test_tokens_are_the_flattened_conv_output():
    torch.manual_seed(0)
    pe = PatchEmbed(patch_size=4, in_chans=3, embed_dim=5)
    x = torch.randn(2, 3, 8, 12)
    tokens, hw = pe(x)
    assert hw == (2, 3) and tokens.shape == (2, 6, 5)
    conv = pe.projection(x)  # [B, C, H, W]
    for h in range(2):
        for w in range(3):
            assert torch.equal(tokens[:, h * 3 + w], conv[:, :, h, w])


def test_size_not_divisible_raises_or_pads():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 10, 13)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        PatchEmbed(patch_size=4, embed_dim=5)(x)
    pe = PatchEmbed(patch_size=4, embed_dim=5, dynamic_img_pad=True)
    tokens, hw = pe(x)
    assert hw == (3, 4)
    padded = F.pad(x, (0, 3, 0, 2))  # zeros at the bottom (2 rows) and right (3 columns)
    assert torch.equal(tokens, pe.projection(padded).flatten(2).transpose(1, 2))
