"""scikit-learn's handwritten digits as a bundled, download-free image classification data set.

``sklearn.datasets.load_digits`` ships 1797 real 8×8 grey-level scans of handwritten digits (UCI "optdigits",
43 writers). We scale the 0..16 grey levels to 0..255, upsample each digit bilinearly to ``img_size`` and repeat
it over 3 channels, so any RGB model can train on it. The train/val split is fixed (stratified, seed 0, 20 % held
out = 360 images) and does not depend on any run's seed.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

DIGITS_CLASSES = [str(i) for i in range(10)]
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified (train, val) indices into ``load_digits()`` (1437 / 360 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=_VAL_FRACTION, random_state=_SPLIT_SEED, stratify=labels)
    return np.sort(train_idx), np.sort(val_idx)


class DigitsDataset:
    """The bundled digits as PIL RGB images (``img_size`` × ``img_size``) with integer labels 0..9.

    Args:
        split: ``"train"`` (1437 images) or ``"val"`` (360 images, the fixed held-out split).
        img_size: side of the upsampled image in pixels (the raw scans are 8×8).
    """

    classes = DIGITS_CLASSES

    def __init__(self, split: Literal["train", "val"] = "train", img_size: int = 32):
        if split not in ("train", "val"):
            raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
        if img_size < 8:
            raise ValueError(f"digits img_size must be >= 8 (the scans are 8x8), got {img_size}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        idx = digits_split_indices()[0 if split == "train" else 1]
        grey = (digits.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)  # [N, 8, 8], 0..255
        self.split = split
        self.img_size = img_size
        self.targets = digits.target[idx].astype(np.int64).tolist()
        self.images = [
            Image.fromarray(g, mode="L").resize((img_size, img_size), Image.BILINEAR).convert("RGB") for g in grey
        ]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.targets[index]

    def describe(self, index: int) -> str:
        return f"digits/{self.split}/{index}"
