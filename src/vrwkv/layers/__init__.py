"""Building blocks of the Vision-RWKV models (no model-level code here)."""
from vrwkv.layers.channel_mix import ChannelMix
from vrwkv.layers.linear import Linear
from vrwkv.layers.patch_embed import PatchEmbed
from vrwkv.layers.pos_embed import resize_pos_embed
from vrwkv.layers.q_shift import SHIFT_MODES, make_shift, q_shift, token_shift
from vrwkv.layers.rwkv_init import INIT_MODES, depth_ratios
from vrwkv.layers.spatial_mix import WKV_MODES, WKV_SEMANTICS, SpatialMix

__all__ = [
    "ChannelMix",
    "INIT_MODES",
    "Linear",
    "PatchEmbed",
    "SHIFT_MODES",
    "SpatialMix",
    "WKV_MODES",
    "WKV_SEMANTICS",
    "depth_ratios",
    "make_shift",
    "q_shift",
    "resize_pos_embed",
    "token_shift",
]
