"""Multi-scale feature maps from a VRWKV backbone for dense prediction (spec §6.2).

Two necks, both returning 4 maps ``[B, C, H/s, W/s]`` at strides ``s = 4, 8, 16, 32`` and exposing
``out_channels`` (torchvision's backbone contract) and ``strides``:

* :class:`VRWKVAdapter`: the official VRWKV-Adapter (ViT-Adapter design, Chen et al., arXiv:2205.08534): a
  convolutional Spatial Prior Module, injector / extractor interactions through multi-scale deformable attention
  around groups of VRWKV blocks, ConvFFN, ``up`` deconvolution and BatchNorms ``norm1..4``. It *is* a
  :class:`~vrwkv.models.vrwkv.VRWKV` (same block keys), so its state dict has the official detection /
  segmentation ``backbone.*`` names and official checkpoints load (:meth:`VRWKVAdapter.load_pretrained`).
* :class:`SimpleFeaturePyramid`: ViTDet's plain pyramid (Li et al., arXiv:2203.16527) on the last map of any
  VRWKV (deconvolutions x4 / x2, identity, max-pool), a lighter alternative without official weights.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from torch import nn

from vrwkv.layers.linear import calls_hooks
from vrwkv.layers.ms_deform_attn import MSDeformAttn
from vrwkv.layers.pos_embed import resize_pos_embed
from vrwkv.models._checkpoint import pos_embed_grid, read_checkpoint
from vrwkv.models.vrwkv import VRWKV

__all__ = ["ADAPTER_CONFIGS", "SimpleFeaturePyramid", "VRWKVAdapter", "create_vrwkv_adapter",
           "split_dense_state_dict"]

_logger = logging.getLogger(__name__)

_AdapterNorm = partial(nn.LayerNorm, eps=1e-6)
STRIDES = (4, 8, 16, 32)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Convolutional stem giving the adapter its local detail: c1 (1/4) as a map, c2..c4 (1/8..1/32) as tokens.

    Keys as the official ``spm.*``: ``stem.{0,1,3,4,6,7}``, ``conv2.{0,1}``, ``conv3.{0,1}``, ``conv4.{0,1}``,
    ``fc1..fc4`` (1x1 projections to ``embed_dim``). BatchNorm stands for the official SyncBN (identical on one
    process; ``nn.SyncBatchNorm.convert_sync_batchnorm`` restores it under DDP).
    """

    def __init__(self, inplanes: int = 64, embed_dim: int = 384):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, h, w]`` -> c1 ``[B, D, h/4, w/4]`` and tokens c2, c3, c4 ``[B, h/s * w/s, D]``."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]
        return (self.fc1(c1), *tokens)  # type: ignore[return-value]


class DWConv(nn.Module):
    """3x3 depthwise conv applied separately to the three levels of the adapter's token sequence."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``x [B, 4HW + HW + HW/4, C]`` (levels 1/8, 1/16, 1/32 of a 1/16 grid ``hw``) -> same shape."""
        H, W = hw
        B, _, C = x.shape
        outs, start = [], 0
        for h, w in ((2 * H, 2 * W), (H, W), (H // 2, W // 2)):
            level = x[:, start:start + h * w].transpose(1, 2).reshape(B, C, h, w)  # [B, C, h, w]
            outs.append(self.dwconv(level).flatten(2).transpose(1, 2))
            start += h * w
        return torch.cat(outs, dim=1)


class ConvFFN(nn.Module):
    """Linear -> depthwise 3x3 conv per level -> GELU -> Linear (the extractor's FFN)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), hw)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """Backbone tokens attend to the spatial-prior tokens: ``x + gamma * MSDeformAttn(LN(x), LN(c))``."""

    def __init__(self, dim: int, num_heads: int, n_points: int, n_levels: int, deform_ratio: float,
                 init_values: float = 0.0):
        super().__init__()
        self.query_norm = _AdapterNorm(dim)
        self.feat_norm = _AdapterNorm(dim)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, feat: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        attn = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes)
        return query + self.gamma * attn


class Extractor(nn.Module):
    """Spatial-prior tokens attend to the backbone tokens, then a residual ConvFFN."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, with_cffn: bool = True,
                 cffn_ratio: float = 0.25, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.query_norm = _AdapterNorm(dim)
        self.feat_norm = _AdapterNorm(dim)
        self.attn = MSDeformAttn(dim, 1, num_heads, n_points, deform_ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = _AdapterNorm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, feat: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], hw: tuple[int, int]) -> torch.Tensor:
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes)
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), hw))
        return query


class InteractionBlock(nn.Module):
    """Injector, a group of backbone blocks (run by the adapter), extractor (+ 2 extra extractors at the end)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, init_values: float,
                 with_cffn: bool, cffn_ratio: float, drop_path: float, extra_extractor: bool):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, 3, deform_ratio, init_values)
        make_extractor = partial(Extractor, dim, num_heads, n_points, deform_ratio, with_cffn=with_cffn,
                                 cffn_ratio=cffn_ratio, drop_path=drop_path)
        self.extractor = make_extractor()
        self.extra_extractors = nn.Sequential(*[make_extractor() for _ in range(2)]) if extra_extractor else None


def _reference_points(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Pixel centres of each level in [0, 1] as (x, y): ``[1, sum(H*W), 1, 2]`` (ViT-Adapter's helper)."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device) / h,
                                torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device) / w, indexing="ij")
        refs.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    return torch.cat(refs, 0)[None, :, None]


def _init_adapter_weights(m: nn.Module) -> None:
    """ViT-Adapter init of new parts: trunc-normal(0.02) Linear, N(0, sqrt(2/fan_out)) convs, norms 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class VRWKVAdapter(VRWKV):
    """The official VRWKV-Adapter: VRWKV blocks plus spatial prior and deformable-attention interactions.

    Args:
        interaction_indexes: ``[first, last]`` block of each interaction (4 groups officially).
        conv_inplane: width of the Spatial Prior Module (64).
        deform_num_heads: heads of every deformable attention.
        n_points: sampling points per head and level.
        deform_ratio: value width / embed dim in the deformable attentions.
        init_values_inject: init of the injectors' gamma (0: the adapter starts as the plain backbone).
        with_cffn: ConvFFN in the extractors.
        cffn_ratio: ConvFFN hidden width / embed dim.
        use_extra_extractor: two extra extractors in the last interaction.
        add_rwkv_feature: add backbone maps to the outputs: ``"segmentation"`` adds the tokens after interaction
            k to output k, ``"detection"`` adds the final tokens to every output (the two official copies), or
            ``"none"``.
        **kwargs: :class:`~vrwkv.models.vrwkv.VRWKV` arguments (``embed_dim``, ``depth``, ``post_norm``, ...);
            ``drop_path_rate`` also sets the extractors' (constant) DropPath. The classifier and the final norm
            are always off, as in the official code.
    """

    def __init__(self, interaction_indexes: list[list[int]] | tuple = ((0, 2), (3, 5), (6, 8), (9, 11)),
                 conv_inplane: int = 64, deform_num_heads: int = 6, n_points: int = 4, deform_ratio: float = 1.0,
                 init_values_inject: float = 0.0, with_cffn: bool = True, cffn_ratio: float = 0.25,
                 use_extra_extractor: bool = True,
                 add_rwkv_feature: Literal["segmentation", "detection", "none"] = "segmentation", **kwargs: Any):
        for key in ("num_classes", "final_norm", "spatial_mix_layer", "channel_mix_layer"):
            if kwargs.get(key) not in (None, 0, False):
                raise ValueError(f"VRWKVAdapter does not take {key}={kwargs[key]!r}")
        kwargs.pop("num_classes", None)
        kwargs.pop("final_norm", None)
        super().__init__(num_classes=0, final_norm=False, **kwargs)
        if add_rwkv_feature not in ("segmentation", "detection", "none"):
            raise ValueError(f"add_rwkv_feature must be 'segmentation', 'detection' or 'none', got {add_rwkv_feature!r}")
        self.interaction_indexes = [list(map(int, ix)) for ix in interaction_indexes]
        flat = [i for a, b in self.interaction_indexes for i in range(a, b + 1)]
        if flat != list(range(self.depth)):
            raise ValueError(f"interaction_indexes {self.interaction_indexes} must cover blocks 0..{self.depth - 1} "
                             f"in order, each exactly once")
        D = self.embed_dim
        self.add_rwkv_feature = add_rwkv_feature
        self.out_channels = D
        self.strides = STRIDES
        drop_path_rate = float(kwargs.get("drop_path_rate", 0.0))
        self.level_embed = nn.Parameter(torch.zeros(3, D))
        self.spm = SpatialPriorModule(conv_inplane, D)
        self.interactions = nn.Sequential(*[
            InteractionBlock(D, deform_num_heads, n_points, deform_ratio, init_values_inject, with_cffn, cffn_ratio,
                             drop_path_rate, use_extra_extractor and i == len(self.interaction_indexes) - 1)
            for i in range(len(self.interaction_indexes))
        ])  # fmt: skip
        self.up = nn.ConvTranspose2d(D, D, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(D) for _ in range(4))
        for part in (self.up, self.spm, self.interactions):
            part.apply(_init_adapter_weights)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``[B, 3, h, w]`` (sides multiples of 32) -> ``[f1, f2, f3, f4]``, ``[B, D, h/s, w/s]``."""
        if x.ndim != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"VRWKVAdapter needs images [B, 3, h, w] with h, w multiples of 32, got {tuple(x.shape)}")
        B = x.shape[0]
        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)
        x, (H, W) = self._embed(x)
        prior_shapes = [(2 * H, 2 * W), (H, W), (H // 2, W // 2)]
        ref_inject = _reference_points([(H, W)], x.dtype, x.device)  # queries: the 1/16 tokens
        ref_extract = _reference_points(prior_shapes, x.dtype, x.device)  # queries: the prior tokens
        outs = []
        for (first, last), inter in zip(self.interaction_indexes, self.interactions):
            x = inter.injector(x, ref_inject, c, prior_shapes)
            with self._workspace(x):  # (the blocks share buffers: VRWKV._workspace)
                private = not calls_hooks(inter.injector)  # (whether the next block may write into x)
                for blk in self.layers[first:last + 1]:
                    x, private = self._block(blk, x, (H, W), private), not calls_hooks(blk)
            for extractor in [inter.extractor, *(inter.extra_extractors or [])]:
                c = extractor(c, ref_extract, x, [(H, W)], (H, W))
            outs.append(self._to_map(x, (H, W)))
        n2, n3 = 4 * H * W, H * W
        c2 = c[:, :n2].transpose(1, 2).reshape(B, -1, 2 * H, 2 * W)  # [B, D, 2H, 2W]
        c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(B, -1, H, W)
        c4 = c[:, n2 + n3:].transpose(1, 2).reshape(B, -1, H // 2, W // 2)
        c1 = self.up(c2) + c1
        maps = [c1, c2, c3, c4]
        if self.add_rwkv_feature != "none":
            feats = outs if self.add_rwkv_feature == "segmentation" else [outs[-1]] * 4
            for i, scale in enumerate((4.0, 2.0, 1.0, 0.5)):
                f = feats[i] if scale == 1.0 else F.interpolate(feats[i], scale_factor=scale, mode="bilinear",
                                                                align_corners=False)
                maps[i] = maps[i] + f
        return [norm(m) for norm, m in zip((self.norm1, self.norm2, self.norm3, self.norm4), maps)]

    def forward_backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # the adapter's outputs
        return tuple(self(x))

    def load_pretrained(self, checkpoint_path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
        """Load the backbone of an official (or our) detection / segmentation checkpoint, or a classification one.

        ``backbone.*`` keys (all keys if there is no such prefix) go to this module; ``pos_embed`` is resized to its
        grid. A file without adapter keys (``spm.*``) is treated as a pre-trained classifier, as the official
        ``init_weights``: ``head.*`` and the final ``ln1.*`` are ignored and the adapter keeps its init. Otherwise
        the keys must match exactly.

        Returns:
            The file's other entries (e.g. ``decode_head.*``, ``auxiliary_head.*``, ``neck.*``), keys unchanged.

        Raises:
            ValueError: listing missing / unexpected keys and shape mismatches.
        """
        ckpt = read_checkpoint(checkpoint_path, use_ema=use_ema)
        backbone, rest = split_dense_state_dict(ckpt.state_dict)
        pos = backbone.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            src = pos_embed_grid(pos.shape[1], ckpt.metadata, self.grid_size)
            if src != tuple(self.grid_size):
                backbone["pos_embed"] = resize_pos_embed(pos, src, self.grid_size, self.interpolate_mode)
        own = self.state_dict()
        is_classifier = not any(k.startswith("spm.") for k in backbone)
        if is_classifier:
            backbone = {k: v for k, v in backbone.items() if not k.startswith(("head.", "ln1."))}
            missing = [k for k in own if k not in backbone and _is_vrwkv_key(k)]
        else:
            missing = [k for k in own if k not in backbone]
        unexpected = [k for k in backbone if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in backbone.items() if k in own and v.shape != own[k].shape]  # fmt: skip
        if missing or unexpected or mismatched:
            def listed(title: str, items: list[str]) -> str:
                return f"\n  {title} ({len(items)}): {', '.join(items[:10])}" if items else ""

            raise ValueError(f"{checkpoint_path} does not fit this VRWKVAdapter (embed_dim {self.embed_dim}, depth "
                             f"{self.depth}):" + listed("missing keys", missing)
                             + listed("unexpected keys", unexpected) + listed("shape mismatches", mismatched))
        self.load_state_dict(backbone, strict=not is_classifier)
        _logger.info("loaded %d backbone tensors from %s (%s)", len(backbone), checkpoint_path,
                     "classifier" if is_classifier else "dense-prediction checkpoint")
        return rest


def _is_vrwkv_key(key: str) -> bool:
    return key.startswith(("pos_embed", "patch_embed.", "layers."))


def split_dense_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an mmdet / mmseg state dict into the backbone's entries (``backbone.`` stripped; every entry if no
    key has that prefix) and the rest (``decode_head.*``, ``neck.*``, ... unchanged). ``module.`` is stripped."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    if not any(k.startswith("backbone.") for k in state_dict):
        return dict(state_dict), {}
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
    return backbone, rest


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on the last (final-normed) map of a VRWKV backbone.

    Stride 16 -> 4: ``ConvT(2,2) -> LN -> GELU -> ConvT(2,2)``; -> 8: ``ConvT(2,2)``; 16: identity; -> 32:
    ``MaxPool(2)``; then per level ``Conv1x1 -> LN -> Conv3x3 -> LN`` to ``out_channels``.

    Args:
        backbone: a :class:`~vrwkv.models.vrwkv.VRWKV` (or VRWKV6) with patch size 16; its classifier is unused.
        out_channels: channels of every output map.
    """

    def __init__(self, backbone: VRWKV, out_channels: int = 256):
        super().__init__()
        if backbone.patch_size != 16:
            raise ValueError(f"SimpleFeaturePyramid expects a stride-16 backbone, got patch size {backbone.patch_size}")
        self.backbone = backbone
        D = backbone.embed_dim
        self.out_channels = out_channels
        self.strides = STRIDES
        scales = [
            nn.Sequential(nn.ConvTranspose2d(D, D // 2, 2, 2), LayerNorm2d(D // 2), nn.GELU(),
                          nn.ConvTranspose2d(D // 2, D // 4, 2, 2)),
            nn.ConvTranspose2d(D, D // 2, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ]
        dims = (D // 4, D // 2, D, D)
        self.stages = nn.ModuleList(
            nn.Sequential(scale, nn.Conv2d(d, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for scale, d in zip(scales, dims)
        )  # fmt: skip
        self.stages.apply(_init_adapter_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``[B, 3, h, w]`` (multiples of 32) -> 4 maps ``[B, out_channels, h/s, w/s]``, s = 4, 8, 16, 32."""
        if x.ndim != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"SimpleFeaturePyramid needs images [B, 3, h, w] with h, w multiples of 32, got "
                             f"{tuple(x.shape)}")
        last = self.backbone.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
        return [stage(last) for stage in self.stages]


# Official VRWKV-Adapter settings (spec §6.2), keyed by backbone size; the test entry is a tiny model for tests.
ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {
    "vrwkv_tiny": dict(embed_dim=192, depth=12, img_size=224, post_norm=False, key_norm=False, init_values=1.0,
                       drop_path_rate=0.1, deform_num_heads=6, deform_ratio=1.0,
                       interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]]),
    "vrwkv_small": dict(embed_dim=384, depth=12, img_size=224, post_norm=True, key_norm=False, init_values=1e-5,
                        drop_path_rate=0.2, deform_num_heads=6, deform_ratio=1.0,
                        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]]),
    "vrwkv_base": dict(embed_dim=768, depth=12, img_size=224, post_norm=True, key_norm=False, init_values=1e-5,
                       drop_path_rate=0.3, deform_num_heads=12, deform_ratio=0.5,
                       interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]]),
    "vrwkv_large": dict(embed_dim=1024, depth=24, img_size=192, post_norm=True, key_norm=True, init_values=1e-5,
                        drop_path_rate=0.4, deform_num_heads=16, deform_ratio=0.5,
                        interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]]),
    "test_vrwkv": dict(embed_dim=32, depth=4, img_size=64, init_values=1.0, deform_num_heads=2, conv_inplane=8,
                       interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]]),
}


def create_vrwkv_adapter(size: str, **kwargs: Any) -> VRWKVAdapter:
    """The official VRWKV-Adapter for backbone ``size`` (a key of :data:`ADAPTER_CONFIGS`), ``kwargs`` overriding.

    E.g. ``create_vrwkv_adapter("vrwkv_small", add_rwkv_feature="detection")`` for the Mask R-CNN variant.
    """
    if size not in ADAPTER_CONFIGS:
        raise ValueError(f"no adapter config for {size!r}; known: {', '.join(ADAPTER_CONFIGS)}")
    return VRWKVAdapter(**{**ADAPTER_CONFIGS[size], **kwargs})
