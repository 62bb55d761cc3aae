"""Masked-autoencoder pre-training as an ``nn.Module``: the model's masked-patch reconstruction loss for training,
and a reproducible validation loss. No loops here: the engine drives it (same protocol as
``vrwkv.tasks.classification``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class MAEConfig:
    """Masking settings (official: mask ratio 0.75). ``norm_pix_loss`` is a model option (``model.kwargs``)."""

    mask_ratio: float = 0.75
    eval_seed: int = 0  # seed of the validation masks: every evaluation masks the same patches


class MAETask(nn.Module):
    """Wraps a :class:`~vrwkv.models.mae.MaskedAutoencoderVRWKV` (``model(images, mask_ratio, generator) ->
    (loss, pred, mask)``) for the training engine. Labels in the batch are ignored.

    Args:
        model: the masked autoencoder.
        cfg: masking settings.
    """

    #: the statistics :meth:`evaluate_batch` returns (an engine process without data reports zeros for them)
    stat_keys: tuple[str, ...] = ("count", "loss_sum")

    def __init__(self, model: nn.Module, cfg: MAEConfig | None = None):
        super().__init__()
        cfg = cfg or MAEConfig()
        if not 0.0 <= cfg.mask_ratio < 1.0:
            raise ValueError(f"task.mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
        self.model = model
        self.cfg = cfg

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One training step's forward: ``{"loss": scalar}`` with fresh random masks (global RNG, so a resumed run
        draws the same masks)."""
        loss, _, _ = self.model(batch["image"], mask_ratio=self.cfg.mask_ratio)
        return {"loss": loss}

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Summable statistics: ``loss_sum`` (per-image masked-patch loss, summed) and ``count``.

        The masks come from a generator seeded with ``eval_seed``, so two checkpoints are compared on the same
        masks (the i-th image of every batch gets the same mask) and the global RNG is untouched. Under DDP each
        process has its own batches, so the value is comparable between runs with the same number of processes.
        """
        model = model if model is not None else self.model
        images = batch["image"]
        generator = torch.Generator(device=images.device).manual_seed(self.cfg.eval_seed)
        loss, _, _ = model(images, mask_ratio=self.cfg.mask_ratio, generator=generator)
        # every image has the same number of masked patches, so the batch mean times B is the per-image sum
        n = images.shape[0]
        return {"loss_sum": loss.float() * n, "count": torch.tensor(float(n), device=images.device)}

    @staticmethod
    def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """``loss`` (mean masked-patch loss per image) and ``count`` from summed statistics."""
        n = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss_sum"]) / n, "count": int(sums["count"])}

