"""Image classification as an ``nn.Module``: a model, its training loss (label smoothing, mixup/cutmix) and its
metrics (loss, top-1, top-5). No loops here: the engine drives it.

The official recipe (spec §3.1): soft-target cross-entropy with label smoothing 0.1 (target
``(1 − ε)·onehot + ε/K``), on top of batch mixup (α 0.8) / cutmix (α 1.0), one of the two per batch, for S/B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ClassificationConfig:
    """Loss and batch-mixing settings (official: smoothing 0.1; mixup 0.8 + cutmix 1.0 for S/B, none for T)."""

    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha, 0 = off
    cutmix: float = 0.0  # cutmix alpha, 0 = off
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on


class ClassificationTask(nn.Module):
    """Wraps a classifier ``model`` (images ``[B, 3, H, W]`` → logits ``[B, K]``) with loss and metrics.

    Args:
        model: any classifier, e.g. ``vrwkv.create_model("vrwkv_tiny", num_classes=K)`` or a timm model.
        num_classes: K.
        cfg: loss / mixing settings.
    """

    def __init__(self, model: nn.Module, num_classes: int, cfg: ClassificationConfig | None = None):
        super().__init__()
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        cfg = cfg or ClassificationConfig()
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        self.model = model
        self.num_classes = num_classes
        self.cfg = cfg
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            # mixup builds the smoothed soft targets itself
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch",
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)
            self.train_loss: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One training step's forward: ``{"loss": scalar}`` for ``batch = {"image", "target"}``."""
        images, targets = batch["image"], batch["target"]
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup/cutmix needs an even per-process batch, got {images.shape[0]}")
            images, targets = self.mixup(images, targets)
        logits = self.model(images)
        return {"loss": self.train_loss(logits, targets)}

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Summable statistics of one batch: ``loss_sum``, ``top1``, ``top5`` (correct counts), ``count``."""
        model = model if model is not None else self.model
        images, targets = batch["image"], batch["target"]
        logits = model(images).float()
        loss_sum = nn.functional.cross_entropy(logits, targets, reduction="sum")
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices  # [B, k]
        hit = topk.eq(targets[:, None])
        return {
            "loss_sum": loss_sum,
            "top1": hit[:, 0].sum().float(),
            "top5": hit.any(dim=-1).sum().float(),
            "count": torch.tensor(float(targets.numel()), device=logits.device),
        }

    @staticmethod
    def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Turn summed statistics (possibly over processes) into ``loss``, ``top1`` and ``top5`` (percent)."""
        n = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss_sum"]) / n, "top1": 100.0 * float(sums["top1"]) / n,
                "top5": 100.0 * float(sums["top5"]) / n, "count": int(sums["count"])}
