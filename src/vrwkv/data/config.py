"""Data settings of an image-classification run (one section of the experiment config)."""
from __future__ import annotations

from dataclasses import dataclass

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented (defaults: the official ImageNet recipe, spec §3.2).

    ``dataset`` is ``"digits"`` (bundled, no download) or the root of an ImageNet-layout folder tree.
    ``batch_size`` is the global batch of one forward/backward pass summed over all processes; the optimizer
    batch is ``batch_size × run.accum_steps``.
    """

    dataset: str = "digits"
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224
    batch_size: int = 1024
    workers: int = 8
    on_bad_image: str = "error"  # "skip": replace/drop unreadable images and report them; "error": stop
    # train-time augmentation (timm.data.create_transform)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    interpolation: str = "bicubic"
    # eval: resize to img_size / crop_pct, center crop img_size (224 / 0.875 = 256 as in the official test pipeline)
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
