"""VRWKV6: Vision-RWKV with RWKV-6 attention (data-dependent token-shift mixing and decay, multi-head Bi-WKV6, gate),
from the official code (``classification/mmcls_custom/models/backbones/vrwkv6.py`` of OpenGVLab/Vision-RWKV;
re-implemented from the spec in shared/spec/official-vrwkv.md §4). State-dict names are the official backbone's, so
official checkpoints load after stripping ``backbone.`` (the V1 loader and converter are reused as they are).

Contents, in timm's order: ``VRWKV6`` (the V1 model with V6 mixers, heads and an optional trailing cls token), cfgs,
the builder, and the registered sizes ``vrwkv6_tiny|small|base`` plus the tiny ``test_vrwkv6*`` variants.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs
from torch import nn

from vrwkv.layers import ChannelMix
from vrwkv.layers.spatial_mix_v6 import SpatialMixV6
from vrwkv.models._registry import register_model
from vrwkv.models.vrwkv import VRWKV, _cfg, _create_vrwkv
from vrwkv.ops.wkv6.api import HEAD_SIZE

__all__ = ["VRWKV6"]


class VRWKV6(VRWKV):
    """VRWKV6 backbone with a pooled classifier; the model API, blocks, options and checkpoint handling of
    :class:`~vrwkv.models.vrwkv.VRWKV`, with RWKV-6 spatial mixing and Q-Shift inside each head of 64 channels.

    Args:
        embed_dim: channels C, a multiple of 64.
        num_heads: heads H (``C = H * 64``); default ``embed_dim // 64``.
        depth: number of blocks.
        hidden_rate: FFN width multiplier.
        shift_pixel: Q-Shift distance (0: no shift).
        channel_gamma: fraction of each head's channels per Q-Shift direction (<= 1/4).
        with_cls_token: append a learned ``cls_token`` [1, 1, C] *after* the patch tokens (after the position
            embedding); the shifts pass it through unchanged. Average pooling and feature maps use the patch
            tokens only; ``forward_features`` and ``NLC`` intermediates keep it as the last token.
        output_cls_token: :meth:`forward_backbone` returns ``[map, cls]`` per output block (needs ``with_cls_token``),
            as the official backbone does.
        key_norm: LayerNorm on the WKV output (before ``ln_x``) and on the FFN hidden activations.
        init_mode: ``"fancy"`` only (the official V6 init, spec §4.4).
        shift_mode: ``"q_shift_multihead"`` only; accepted so that official configs can be passed as they are.
        head_size: 64 only (the official ``HEAD_SIZE``); accepted for the same reason.
        **kwargs: every other argument of :class:`~vrwkv.models.vrwkv.VRWKV` (``img_size``, ``patch_size``,
            ``in_chans``, ``num_classes``, ``global_pool``, ``drop_rate``, ``head_drop_rate``, ``drop_path_rate``,
            ``init_values``, ``post_norm``, ``final_norm``, ``out_indices``, ``with_cp``, ``interpolate_mode``,
            ``dynamic_img_pad``, ``device``, ``dtype``).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int | None = None,
        depth: int = 12,
        hidden_rate: int = 4,
        shift_pixel: int = 1,
        channel_gamma: float = 0.25,
        key_norm: bool = False,
        init_mode: str = "fancy",
        with_cls_token: bool = False,
        output_cls_token: bool = False,
        shift_mode: str = "q_shift_multihead",
        head_size: int = HEAD_SIZE,
        **kwargs: Any,
    ):
        if shift_mode != "q_shift_multihead" or head_size != HEAD_SIZE:
            raise ValueError(f"VRWKV6 uses shift_mode='q_shift_multihead' and head_size={HEAD_SIZE}; "
                             f"got {shift_mode!r} and {head_size}")
        num_heads = embed_dim // HEAD_SIZE if num_heads is None else num_heads
        if num_heads < 1 or embed_dim != num_heads * HEAD_SIZE:
            raise ValueError(f"VRWKV6 needs embed_dim = num_heads * {HEAD_SIZE}; got embed_dim {embed_dim}, "
                             f"num_heads {num_heads}")
        if output_cls_token and not with_cls_token:
            raise ValueError("output_cls_token=True needs with_cls_token=True")
        for name in ("wkv_mode", "wkv_semantics", "spatial_mix_layer", "channel_mix_layer"):
            if name in kwargs:
                raise TypeError(f"VRWKV6 does not take {name!r} (its mixers are fixed: Bi-WKV6, q_shift_multihead)")
        num_suffix_tokens = int(with_cls_token)
        super().__init__(
            embed_dim=embed_dim,
            depth=depth,
            spatial_mix_layer=partial(
                SpatialMixV6, depth=depth, num_heads=num_heads, shift_pixel=shift_pixel, channel_gamma=channel_gamma,
                key_norm=key_norm, num_suffix_tokens=num_suffix_tokens, init_mode=init_mode,
            ),
            channel_mix_layer=partial(
                ChannelMix, depth=depth, hidden_rate=hidden_rate, shift_mode="q_shift_multihead",
                shift_pixel=shift_pixel, channel_gamma=channel_gamma, init_mode=init_mode, key_norm=key_norm,
                shift_head_size=HEAD_SIZE, num_suffix_tokens=num_suffix_tokens,
            ),
            **kwargs,
        )  # fmt: skip
        self.num_heads = num_heads
        self.num_suffix_tokens = num_suffix_tokens
        self.output_cls_token = output_cls_token
        dd = {"device": self.pos_embed.device, "dtype": self.pos_embed.dtype}
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if with_cls_token else None

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> patch tokens with position embedding (and dropout), then the cls token appended last."""
        x, hw = super()._embed(x)
        if self.cls_token is not None:
            x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)  # [B, H*W + 1, C]
        return x, hw

    def _backbone_output(self, x: torch.Tensor, hw: tuple[int, int]) -> Any:
        """The map ``[B, C, H, W]``, or ``[map, cls [B, C]]`` with ``output_cls_token`` (official format)."""
        patch_map = self._to_map(x, hw)
        return [patch_map, x[:, -1]] if self.output_cls_token else patch_map

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^ln1", (99999,))])  # fmt: skip


# -------------------------------------------------------------------------------------------------- cfgs
_HF = "https://huggingface.co/OpenGVLab/Vision-RWKV/resolve/main/"

# File names follow the V1 naming of the official HuggingFace repo; like the V1 URLs they could not be checked from
# the machine this was written on (no internet). Local files load with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    "vrwkv6_tiny.in1k": _cfg(url=_HF + "vrwkv6_t_in1k_224.pth"),
    "vrwkv6_small.in1k": _cfg(url=_HF + "vrwkv6_s_in1k_224.pth"),
    "vrwkv6_base.in1k": _cfg(url=_HF + "vrwkv6_b_in1k_224.pth"),
    "test_vrwkv6.untrained": _cfg(input_size=(3, 64, 64)),
    "test_vrwkv6b.untrained": _cfg(input_size=(3, 64, 64)),
})


def _create_vrwkv6(variant: str, pretrained: bool = False, **kwargs: Any) -> VRWKV6:
    return _create_vrwkv(variant, pretrained, model_cls=VRWKV6, **kwargs)


# ---------------------------------------------------------------------------------------- registered sizes
@register_model
def vrwkv6_tiny(pretrained: bool = False, **kwargs: Any) -> VRWKV6:
    """VRWKV6-T: 192 x 12, 3 heads, pre-norm, no layer scale (7.6M params). Official recipe: drop_path_rate 0."""
    model_args = dict(embed_dim=192, num_heads=3, depth=12, patch_size=16, img_size=224)
    return _create_vrwkv6("vrwkv6_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv6_small(pretrained: bool = False, **kwargs: Any) -> VRWKV6:
    """VRWKV6-S: 384 x 12, 6 heads, res-post-norm, layer scale 1e-5 (27.7M params). Official recipe: drop_path 0.3."""
    model_args = dict(embed_dim=384, num_heads=6, depth=12, patch_size=16, img_size=224, post_norm=True,
                      init_values=1e-5)  # fmt: skip
    return _create_vrwkv6("vrwkv6_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv6_base(pretrained: bool = False, **kwargs: Any) -> VRWKV6:
    """VRWKV6-B: 768 x 12, 12 heads, res-post-norm, layer scale 1e-5 (104.9M params). Official recipe: drop_path 0.5."""
    model_args = dict(embed_dim=768, num_heads=12, depth=12, patch_size=16, img_size=224, post_norm=True,
                      init_values=1e-5)  # fmt: skip
    return _create_vrwkv6("vrwkv6_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vrwkv6(pretrained: bool = False, **kwargs: Any) -> VRWKV6:
    """Tiny test variant (128 x 2, 2 heads, 4x4 grid at 64 px), VRWKV6-T options."""
    model_args = dict(embed_dim=128, num_heads=2, depth=2, patch_size=16, img_size=64)
    return _create_vrwkv6("test_vrwkv6", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vrwkv6b(pretrained: bool = False, **kwargs: Any) -> VRWKV6:
    """Tiny test variant with the other options: post-norm, layer scale, key_norm, a cls token, 1 head."""
    model_args = dict(embed_dim=64, num_heads=1, depth=3, patch_size=16, img_size=64, post_norm=True,
                      init_values=1e-5, key_norm=True, with_cls_token=True)  # fmt: skip
    return _create_vrwkv6("test_vrwkv6b", pretrained=pretrained, **dict(model_args, **kwargs))
