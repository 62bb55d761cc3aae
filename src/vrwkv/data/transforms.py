"""Train / eval image transforms, assembled from ``timm.data.create_transform``."""
from __future__ import annotations

from typing import Callable

from vrwkv.data.config import DataConfig


def build_transform(cfg: DataConfig, is_training: bool) -> Callable:
    """PIL RGB image → normalised float tensor ``[3, img_size, img_size]``.

    Training: RandomResizedCrop (``scale``, ``ratio``) → flip → RandAugment (``auto_augment``) → colour jitter →
    normalise → RandomErasing (``re_prob``). Eval: resize the short side to ``img_size / crop_pct`` → center crop.
    Images smaller than the crop are upscaled by the resize.
    """
    from timm.data import create_transform

    if is_training:
        return create_transform(
            cfg.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment or None,
            interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std), re_prob=cfg.re_prob,
            re_mode=cfg.re_mode)
    return create_transform(cfg.img_size, is_training=False, interpolation=cfg.interpolation,
                            mean=tuple(cfg.mean), std=tuple(cfg.std), crop_pct=cfg.crop_pct)
