"""Parameters, MACs and FLOPs of a VRWKV / VRWKV6 model, per module type, counted analytically (no forward pass).

Conventions (batch 1, one image of ``img_size``):

* **MACs**: multiply-accumulates of the matmuls: every ``nn.Linear`` (``tokens · in · out``; the head sees one pooled
  vector), the patch-embedding ``nn.Conv2d`` (``H · W · out · in · k² / groups``), and VRWKV6's LoRA matmuls.
* **other ops**: what the official counter (mmcv ``get_model_complexity_info`` in the official
  ``get_flops_backbone.py``, spec §7) adds besides MACs: conv bias adds (``H · W · out``), norms (1 per element, 2 if
  affine), the average pool (1 per element), and the WKV operators, which the counter cannot see and the official
  script adds by hand:

  - Bi-WKV (V1), per layer: ``29 · T · C``;
  - WKV6 (V6), per layer: ``T · C · (32·10 + 64·2 + 7·head_size + 17) + T · (32·5 + 64)``; its ``T·C·(32·10 + 64·2)``
    part is the token-shift and decay LoRA matmuls (``x @ W1``, ``h @ W2``, ``x @ D1``, ``h @ D2``), reported here
    as MACs; the rest (the WKV6 recurrence, the LoRA activations, elementwise mixing) as other ops.

  The same Bi-WKV count is used for the causal ablation (``wkv_mode="causal"``): an upper bound, as it sums one side.
* **official "FLOPs"** = MACs + other ops: the number the official README reports as FLOPs (1.2G for VRWKV-T at 224).
* **FLOPs** = 2 · MACs + other ops: floating-point operations with a multiply-add counted as two (what
  ``torch.utils.flop_counter.FlopCounterMode`` reports for matmuls and convolutions).

Activations applied functionally (sigmoid, ReLU², SiLU), the token shifts, residual adds and the position embedding
are not counted, as in the official numbers. The classifier (average pool and head) is included when the model has
one (it adds < 0.02 % for the official sizes). ``T`` is the token count (``H·W`` patches plus VRWKV6's cls token).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from timm.layers import DropPath
from torch import nn

__all__ = ["ModuleCost", "FlopsReport", "count_flops", "format_report", "WKV_FORMULAS"]

#: The hand-added WKV terms of the official ``get_flops_backbone.py`` (spec §7), as printed in reports.
WKV_FORMULAS = {
    "Bi-WKV": "29·T·C per layer",
    "WKV6": "T·C·(32·10 + 64·2 + 7·head_size + 17) + T·(32·5 + 64) per layer, of which T·C·(32·10 + 64·2) = LoRA MACs",
}


@dataclass
class ModuleCost:
    """Totals for one module type: how many modules, their own parameters, MACs and other ops."""

    name: str
    count: int = 0
    params: int = 0
    macs: int = 0
    other_ops: int = 0


@dataclass
class FlopsReport:
    """Per-module-type costs of one forward pass of a single image, with the totals.

    Attributes:
        model: model class name.
        img_size: input (h, w).
        grid: patch grid (H, W).
        tokens: token count T seen by the blocks.
        rows: one :class:`ModuleCost` per module type, in order of first appearance.
        uncounted: names of modules of unknown types whose compute is not counted (their parameters are).
    """

    model: str
    img_size: tuple[int, int]
    grid: tuple[int, int]
    tokens: int
    rows: list[ModuleCost] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def other_ops(self) -> int:
        return sum(r.other_ops for r in self.rows)

    @property
    def official_flops(self) -> int:
        """MACs + other ops: the official README's "FLOPs" convention (mmcv counts a MAC as one FLOP)."""
        return self.macs + self.other_ops

    @property
    def flops(self) -> int:
        """2 · MACs + other ops (a multiply-add is two floating-point operations)."""
        return 2 * self.macs + self.other_ops

    def row(self, name: str) -> ModuleCost:
        """The row of a module type (e.g. ``"Linear"``); KeyError if the model has none."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no module type {name!r} in this report; have {[r.name for r in self.rows]}")


def count_flops(model: nn.Module, img_size: int | Sequence[int]) -> FlopsReport:
    """Count parameters, MACs and other ops of ``model`` for one image of ``img_size``, analytically.

    Nothing is run, so the model may live on the ``meta`` device (VRWKV-L's 335M parameters need no memory):
    ``count_flops(vrwkv.create_model("vrwkv_large", device="meta"), 384)``. See the module docstring for what is
    counted and how.

    Args:
        model: a :class:`~vrwkv.models.VRWKV` or :class:`~vrwkv.models.VRWKV6` (with or without a classifier).
        img_size: image side, or (h, w).

    Returns:
        a :class:`FlopsReport`.

    Raises:
        TypeError: ``model`` is not a VRWKV model.
        ValueError: ``img_size`` is not positive or does not fit the patch size.
    """
    from vrwkv.layers import SpatialMix
    from vrwkv.layers.spatial_mix_v6 import SpatialMixV6
    from vrwkv.models import VRWKV

    if not isinstance(model, VRWKV):
        raise TypeError(f"count_flops supports VRWKV / VRWKV6 models, got {type(model).__name__}")
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"img_size must be a positive int or (h, w), got {img_size!r}")
    H, W = model.patch_embed.feat_size(hw)  # raises a ValueError naming the problem for a bad size
    tokens = H * W + model.num_suffix_tokens
    report = FlopsReport(type(model).__name__, hw, (H, W), tokens)
    rows: dict[str, ModuleCost] = {}

    def add(name: str, params: int = 0, macs: int = 0, other_ops: int = 0, count: int = 1) -> None:
        row = rows.setdefault(name, ModuleCost(name))
        row.count += count
        row.params += params
        row.macs += macs
        row.other_ops += other_ops

    for name, module in model.named_modules():
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        # tokens a module sees: the blocks and the final norm see every token, the head one pooled vector
        n = 1 if name == "head" or name.startswith("head.") else tokens
        if isinstance(module, nn.Conv2d):
            out_hw = H * W  # the patch embedding is the only conv: one output position per patch
            k = module.kernel_size[0] * module.kernel_size[1]
            macs = out_hw * module.out_channels * module.in_channels // module.groups * k
            add("Conv2d", own_params, macs, out_hw * module.out_channels if module.bias is not None else 0)
        elif isinstance(module, nn.Linear):
            add("Linear", own_params, n * module.in_features * module.out_features)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            width = module.num_channels if isinstance(module, nn.GroupNorm) else _numel(module.normalized_shape)
            affine = module.affine if isinstance(module, nn.GroupNorm) else module.elementwise_affine
            add(type(module).__name__, own_params, 0, n * width * (2 if affine else 1))
        elif isinstance(module, SpatialMixV6):
            C, head_size = module.time_decay.shape[-1], module.time_faaaa.shape[-1]
            mix_rank, decay_rank = module.time_maa_w2.shape[1], module.time_decay_w1.shape[1]
            branches = module.time_maa_w2.shape[0]
            lora_macs = tokens * C * (2 * branches * mix_rank + 2 * decay_rank)  # W1, W2, D1, D2
            wkv_ops = tokens * C * (7 * head_size + 17) + tokens * (branches * mix_rank + decay_rank)
            add("SpatialMixV6 (WKV6 + LoRA)", own_params, lora_macs, wkv_ops)
        elif isinstance(module, SpatialMix):
            C = module.spatial_decay.numel()
            add("SpatialMix (Bi-WKV)", own_params, 0, 29 * tokens * C)
        else:
            if own_params:
                add(type(module).__name__, own_params)
            if not list(module.children()) and not isinstance(module, _NO_COMPUTE):
                report.uncounted.append(name)  # a leaf of unknown type: its compute is not counted
    if model.global_pool == "avg" and model.num_classes > 0:
        # the official GlobalAveragePooling neck (an AdaptiveAvgPool2d) counts one op per element of its input
        add("avg pool", 0, 0, H * W * model.embed_dim)
    report.rows = list(rows.values())
    return report


# leaf modules that do no counted compute: identities at inference, and the MLP head's Tanh (not counted by mmcv)
_NO_COMPUTE = (nn.Identity, nn.Dropout, DropPath, nn.Tanh)


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_report(report: FlopsReport, title: str | None = None) -> str:
    """A plain-text table of a :class:`FlopsReport` with clearly labelled totals and the counting formulas."""
    H, W = report.grid
    lines = [
        f"{title or report.model} at {report.img_size[0]}x{report.img_size[1]}: {H}x{W} patches, "
        f"T = {report.tokens} tokens, batch 1",
        f"{'module type':<28}{'count':>6}{'params':>14}{'MACs':>12}{'other ops':>12}",
    ]
    for r in report.rows:
        lines.append(f"{r.name:<28}{r.count:>6}{r.params:>14,}{_si(r.macs):>12}{_si(r.other_ops):>12}")
    lines += [
        f"{'total':<28}{'':>6}{report.params:>14,}{_si(report.macs):>12}{_si(report.other_ops):>12}",
        "",
        f"parameters:                        {report.params / 1e6:.2f}M",
        f"MACs (Linear, Conv, LoRA matmuls): {report.macs / 1e9:.3f}G",
        f"official \"FLOPs\" = MACs + other:   {report.official_flops / 1e9:.3f}G   "
        "(the official README's convention: mmcv counts one MAC as one FLOP)",
        f"FLOPs = 2·MACs + other:            {report.flops / 1e9:.3f}G",
        "other ops: conv bias adds, norms (1 per element, 2 if affine), avg pool (1 per element), and the WKV terms "
        "of the official get_flops_backbone.py:",
    ]
    if any(r.name.startswith("SpatialMix (") for r in report.rows):
        lines.append(f"  Bi-WKV: {WKV_FORMULAS['Bi-WKV']}")
    if any(r.name.startswith("SpatialMixV6") for r in report.rows):
        lines.append(f"  WKV6:   {WKV_FORMULAS['WKV6']}")
    if report.uncounted:
        lines.append(f"not counted (unknown module types): {', '.join(report.uncounted[:10])}")
    return "\n".join(lines)
