"""Semantic segmentation as ``nn.Module``s: UperNet on a multi-scale VRWKV backbone, its loss and its metrics.

The official recipe (spec §6.3, mmseg 0.30): ``UPerHead`` (PPM pool scales 1, 2, 3, 6; FPN; 512 channels; dropout
0.1) on the 4 adapter maps, an auxiliary ``FCNHead`` (256 channels) on map 2 with loss weight 0.4, cross-entropy
with ignore index 255 on logits upsampled (bilinear) to the label size; mIoU from a confusion matrix; sliding-window
inference (mmseg ``slide`` mode). Module names follow mmseg (``decode_head.psp_modules.0.1.conv``,
``auxiliary_head.convs.0.bn``, ``conv_seg``...), so an official UperNet checkpoint loads as a whole. No loops over
data here: the engine drives the task.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


class ConvModule(nn.Module):
    """mmcv ``ConvModule``: conv (no bias) -> BatchNorm -> ReLU, keys ``conv.*`` / ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv kaiming_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _ClsSeg(nn.Module):
    """Shared tail of mmseg decode heads: ``Dropout2d`` then the 1x1 classifier ``conv_seg`` (init N(0, std²),
    mmseg's std 0.01 by default)."""

    def _init_cls(self, channels: int, num_classes: int, dropout: float, cls_init_std: float = 0.01) -> None:
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, cls_init_std)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(_ClsSeg):
    """UperNet decode head (Xiao et al., 2018): pyramid pooling on the last map, FPN top-down fusion, fusion conv.

    Args:
        in_channels: channels of the 4 input maps (strides 4..32).
        channels: width of the head (512 official).
        num_classes: output classes.
        pool_scales: PPM output sizes.
        dropout: ``Dropout2d`` before the classifier.
        cls_init_std: std of the classifier's initial weights.
    """

    def __init__(self, in_channels: list[int], channels: int, num_classes: int,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1, cls_init_std: float = 0.01):
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1)) for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self._init_cls(channels, num_classes, dropout, cls_init_std)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """4 maps ``[B, C_i, h/s, w/s]`` -> logits ``[B, K, h/4, w/4]``."""
        top = inputs[-1]
        psp = [top] + [_resize(m(top), top.shape[2:]) for m in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.bottleneck(torch.cat(psp, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_ClsSeg):
    """mmseg ``FCNHead`` (auxiliary head): ``num_convs`` 3x3 ConvModules on one input map, then the classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1,
                 cls_init_std: float = 0.01):
        super().__init__()
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)])
        self._init_cls(channels, num_classes, dropout, cls_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))


class Segmentor(nn.Module):
    """mmseg ``EncoderDecoder``: a multi-scale ``backbone`` (4 maps, ``out_channels``), ``decode_head`` (UperNet)
    and an optional ``auxiliary_head`` (FCN on map ``aux_index``).

    Args:
        backbone: returns 4 maps at strides 4, 8, 16, 32 (``VRWKVAdapter`` or ``SimpleFeaturePyramid``).
        num_classes: K.
        channels: UperNet width.
        aux_channels: auxiliary FCN width (0: no auxiliary head).
        aux_index: input map of the auxiliary head.
        dropout: dropout before both classifiers.
        size_divisor: inputs are zero-padded to multiples of this at inference (32 for the adapter).
        cls_init_std: std of both classifiers' initial weights. mmseg's 0.01 suits long runs at small lr; a short
            AdamW run from scratch at lr ~1e-3 can stall with it in a "foreground, but which class?" state: every
            class vector moves the same way and too little class-specific gradient reaches the features (on the
            digit scenes a model learnt no digit in 1800 steps at 0.01, and did at 0.1).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512, aux_channels: int = 256,
                 aux_index: int = 2, dropout: float = 0.1, size_divisor: int = 32, cls_init_std: float = 0.01):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not cls_init_std > 0:
            raise ValueError(f"cls_init_std must be > 0, got {cls_init_std}")
        out_channels = backbone.out_channels
        in_channels = list(out_channels) if isinstance(out_channels, (list, tuple)) else [out_channels] * 4
        self.backbone = backbone
        self.num_classes = num_classes
        self.aux_index = aux_index
        self.size_divisor = size_divisor
        self.decode_head = UPerHead(in_channels, channels, num_classes, dropout=dropout, cls_init_std=cls_init_std)
        self.auxiliary_head = (FCNHead(in_channels[aux_index], aux_channels, num_classes, dropout=dropout,
                                       cls_init_std=cls_init_std) if aux_channels > 0 else None)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Official layer-wise lr decay groups (spec §6.3): patch/pos embedding 0, block i -> i + 1, everything else
        (adapter, neck, heads) last."""
        return dict(stem=r"^backbone\.(?:backbone\.)?(?:pos_embed|patch_embed)",
                    blocks=r"^backbone\.(?:backbone\.)?layers\.(\d+)")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training forward: ``(logits [B, K, h/4, w/4], aux logits [B, K, h/16, w/16] or None)``."""
        maps = self.backbone(images)
        aux = self.auxiliary_head(maps[self.aux_index]) if self.auxiliary_head is not None else None
        return self.decode_head(maps), aux

    def encode_decode(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input size ``[B, K, h, w]`` for any ``h, w`` (padded to ``size_divisor`` inside)."""
        h, w = images.shape[-2:]
        d = self.size_divisor
        padded = F.pad(images, (0, (-w) % d, 0, (-h) % d))
        logits = _resize(self.decode_head(self.backbone(padded)), padded.shape[2:])
        return logits[:, :, :h, :w]

    @torch.no_grad()
    def inference(self, images: torch.Tensor, crop_size: int | None = None, stride: int | None = None) -> torch.Tensor:
        """Logits ``[B, K, h, w]``: whole image, or mmseg's ``slide`` mode with square ``crop_size`` windows every
        ``stride`` pixels (the last window is aligned to the border; overlapping logits are averaged)."""
        if crop_size is None:
            return self.encode_decode(images)
        stride = stride or crop_size
        if not 0 < stride <= crop_size:
            raise ValueError(f"slide stride must be in (0, crop_size={crop_size}], got {stride}")
        B, _, H, W = images.shape
        rows = max(H - crop_size + stride - 1, 0) // stride + 1
        cols = max(W - crop_size + stride - 1, 0) // stride + 1
        preds = images.new_zeros((B, self.num_classes, H, W))
        count = images.new_zeros((1, 1, H, W))
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride + crop_size, H), min(c * stride + crop_size, W)
                y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
                preds[:, :, y1:y2, x1:x2] += self.encode_decode(images[:, :, y1:y2, x1:x2])
                count[:, :, y1:y2, x1:x2] += 1
        return preds / count


# ------------------------------------------------------------------------------------------------ metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[K, K]`` counts (row = true class, column = predicted) over the pixels whose label is not ignored."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}, got values {t.min()}..{t.max()}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """mmseg's metrics from a confusion matrix: ``aAcc`` (pixel accuracy), ``mIoU`` and ``mAcc`` (means over the
    classes present in the labels, in percent), and per-class ``IoU`` (NaN for absent classes)."""
    cm = confusion.double()
    tp = cm.diag()
    label_area, pred_area = cm.sum(1), cm.sum(0)
    union = label_area + pred_area - tp
    iou = tp / union  # NaN where a class is absent from labels and predictions
    iou = torch.where(label_area > 0, iou, torch.full_like(iou, math.nan))  # mmseg: absent labels are NaN
    acc = tp / label_area
    total = float(cm.sum())
    return {"aAcc": 100.0 * float(tp.sum()) / max(total, 1.0), "mIoU": 100.0 * float(iou.nanmean()),
            "mAcc": 100.0 * float(acc.nanmean()), "IoU": (100.0 * iou).tolist()}


# ------------------------------------------------------------------------------------------------ task
@dataclass
class SegmentationConfig:
    """Loss and evaluation settings (official: aux weight 0.4, ignore 255; slide 512 / stride 341 on ADE20K)."""

    aux_weight: float = 0.4
    slide_crop: int | None = None  # sliding-window evaluation crop (None: whole image)
    slide_stride: int | None = None


class SegmentationTask(nn.Module):
    """Wraps a :class:`Segmentor` with the training loss and summable evaluation statistics.

    Batches are dicts with ``image [B, 3, h, w]`` and ``mask [B, h, w]`` (long, ``255`` = ignore).
    """

    stat_keys = ("count", "loss_sum", "pixels", "confusion")

    def __init__(self, model: Segmentor, cfg: SegmentationConfig | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg or SegmentationConfig()

    @staticmethod
    def _loss(logits: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = _resize(logits, mask.shape[-2:]).float()
        return F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction=reduction)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss", "loss_decode", "loss_aux"}`` of a training batch."""
        logits, aux = self.model(batch["image"])
        out = {"loss_decode": self._loss(logits, batch["mask"])}
        loss = out["loss_decode"]
        if aux is not None and self.cfg.aux_weight > 0:
            out["loss_aux"] = self._loss(aux, batch["mask"])
            loss = loss + self.cfg.aux_weight * out["loss_aux"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Summable statistics: the confusion matrix, the summed pixel CE and the counts."""
        model = model if model is not None else self.model
        mask = batch["mask"]
        logits = model.inference(batch["image"], self.cfg.slide_crop, self.cfg.slide_stride).float()
        if logits.shape[-2:] != mask.shape[-2:]:  # evaluation at the label's resolution, as mmseg
            logits = _resize(logits, mask.shape[-2:])
        num_classes = logits.shape[1]
        valid = (mask != IGNORE_INDEX).sum()
        return {
            "count": torch.tensor(float(mask.shape[0]), device=mask.device),
            "loss_sum": F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum"),
            "pixels": valid.double(),
            "confusion": confusion_matrix(logits.argmax(1), mask, num_classes).double(),
        }

    @staticmethod
    def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """``mIoU``, ``aAcc``, ``mAcc`` (percent), mean pixel ``loss`` and ``count`` from summed statistics."""
        confusion = sums["confusion"]
        out: dict[str, Any] = {"loss": float(sums["loss_sum"]) / max(float(sums["pixels"]), 1.0),
                               "count": int(sums["count"])}
        if confusion.ndim == 2:
            metrics = segmentation_metrics(confusion)
            out.update({k: metrics[k] for k in ("mIoU", "aAcc", "mAcc")})
        else:  # nothing was evaluated
            out.update({"mIoU": 0.0, "aAcc": 0.0, "mAcc": 0.0})
        return out


def layer_id_of(name: str, depth: int) -> int:
    """The official layer id of a Segmentor parameter for layer-wise lr decay (spec §6.3), for reference/tests."""
    if re.match(r"^backbone\.(?:backbone\.)?(?:pos_embed|patch_embed)", name):
        return 0
    m = re.match(r"^backbone\.(?:backbone\.)?layers\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1
