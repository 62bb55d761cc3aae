"""Multi-scale deformable attention (Deformable DETR, Zhu et al., arXiv:2010.04159), as used by the VRWKV-Adapter.

Pure PyTorch with ``F.grid_sample``: the semantics of the official fallback ``ms_deform_attn_core_pytorch`` and of
its CUDA kernel (bilinear sampling at ``loc * size - 0.5``, zeros outside the map), so no extension is compiled.
The module keeps the official parameter names and init (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``), with ViT-Adapter's ``ratio`` (value width = ``ratio * d_model``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_reference"]


def _check_shapes(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> None:
    if value.ndim != 4 or sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"expected value [N, S, M, D] and sampling_locations [N, Lq, M, L, P, 2], got "
                         f"{tuple(value.shape)} and {tuple(sampling_locations.shape)}")
    N, S, M, _ = value.shape
    if sum(h * w for h, w in spatial_shapes) != S:
        raise ValueError(f"spatial_shapes {spatial_shapes} hold {sum(h * w for h, w in spatial_shapes)} positions, "
                         f"value has {S}")
    if sampling_locations.shape[3] != len(spatial_shapes):
        raise ValueError(f"sampling_locations has {sampling_locations.shape[3]} levels, spatial_shapes "
                         f"{len(spatial_shapes)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} must be sampling_locations' shape "
                         f"without the last dim, {tuple(sampling_locations.shape[:-1])}")
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M:
        raise ValueError("value and sampling_locations disagree on batch or heads")


def ms_deform_attn(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of bilinear samples of multi-level value maps (``ms_deform_attn_core_pytorch``).

    Args:
        value: ``[N, S, M, D]`` values of all levels, flattened level after level (raster order), per head.
        spatial_shapes: ``(H_l, W_l)`` of each level, ``sum(H_l * W_l) == S``.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` (x, y) in [0, 1] of each level (0 and 1 are the outer edges
            of the map; points outside read zeros).
        attention_weights: ``[N, Lq, M, L, P]`` (softmax-normalised over L x P by the caller).

    Returns:
        ``[N, Lq, M * D]``.
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1], align_corners=False
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)  # [N*M, D, H, W]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # [N, Lq, M*D]


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Float64 loop over every query, head, level and point of the same function (the CUDA kernel's
    ``ms_deform_attn_im2col_bilinear``: corners of ``(x * W - 0.5, y * H - 0.5)``, zeros outside). Slow; tests only."""
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    value, loc, attn = (t.detach().double().cpu() for t in (value, sampling_locations, attention_weights))
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lv, (h, w) in enumerate(spatial_shapes):
                    for p in range(P):
                        x = float(loc[n, q, m, lv, p, 0]) * w - 0.5
                        y = float(loc[n, q, m, lv, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(D, dtype=torch.float64)
                        for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    sample += wy * wx * value[n, starts[lv] + yy * w + xx, m]
                        out[n, q, m] += attn[n, q, m, lv, p] * sample
    return out.reshape(N, Lq, M * D)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (official ``MSDeformAttn`` with ViT-Adapter's ``ratio``).

    Each query attends to ``n_points`` locations per head and level around its reference point; offsets and
    weights are linear functions of the query.

    Args:
        d_model: query / output channels.
        n_levels: number of value levels.
        n_heads: attention heads (``d_model * ratio`` must be divisible by it).
        n_points: sampling points per head and level.
        ratio: value width as a fraction of ``d_model`` (0.5 for the B/L adapters).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        value_dim = int(d_model * ratio)
        if d_model % n_heads or value_dim % n_heads:
            raise ValueError(f"d_model {d_model} (value width {value_dim}) must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.ratio = d_model, n_levels, n_heads, n_points, ratio
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2, **dd)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points, **dd)
        self.value_proj = nn.Linear(d_model, value_dim, **dd)
        self.output_proj = nn.Linear(value_dim, d_model, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: zero offset weights with a bias pointing head h along angle 2*pi*h/heads (scaled to the
        unit square's border) at distances 1..n_points; zero attention logits; xavier value/output projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)  # [heads, levels, points, 2]
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``query`` to the multi-level ``input_flatten``.

        Args:
            query: ``[N, Lq, d_model]``.
            reference_points: ``[N or 1, Lq, L or 1, 2]`` normalised (x, y) in [0, 1] per query (and level).
            input_flatten: ``[N, S, d_model]``, the levels of ``spatial_shapes`` flattened one after another.
            spatial_shapes: ``(H_l, W_l)`` per level.
            padding_mask: ``[N, S]``, True where the input is padding (its value is zeroed).

        Returns:
            ``[N, Lq, d_model]``.
        """
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"this module attends to {self.n_levels} levels, got spatial_shapes {spatial_shapes}")
        if reference_points.shape[-1] != 2:
            raise ValueError(f"reference_points must end in (x, y), got shape {tuple(reference_points.shape)}")
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, -1)  # [N, S, M, D]
        offsets = self.sampling_offsets(query).view(N, Lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(N, Lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(N, Lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))
