"""scikit-learn's handwritten digits as a bundled, download-free image classification data set.

``sklearn.datasets.load_digits`` ships 1797 real 8×8 grey-level scans of handwritten digits (UCI "optdigits",
43 writers). We scale the 0..16 grey levels to 0..255, upsample each digit bilinearly to ``img_size`` and repeat
it over 3 channels, so any RGB model can train on it. The train/val split is fixed (stratified: 20 % of each
class, seed 0, 359 held-out images) and does not depend on any run's seed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

DIGITS_CLASSES = [str(i) for i in range(10)]
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as ``(images [N, 8, 8] float 0..16, labels [N] int)``.

    Reads the CSV that scikit-learn ships (what ``sklearn.datasets.load_digits`` reads) without importing
    scikit-learn, whose import alone takes seconds; falls back to ``load_digits`` if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")  # [1797, 65]: 64 pixels then the label
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified (train, val) indices: 20 % of every class (seed 0) is held out (1438 / 359 images)."""
    _, labels = load_digits_arrays()
    rng = np.random.RandomState(_SPLIT_SEED)
    val = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.extend(members[: int(round(_VAL_FRACTION * len(members)))])
    val = np.sort(np.array(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


class DigitsDataset:
    """The bundled digits as PIL RGB images (``img_size`` × ``img_size``) with integer labels 0..9.

    Args:
        split: ``"train"`` (1438 images) or ``"val"`` (359 images, the fixed held-out split).
        img_size: side of the upsampled image in pixels (the raw scans are 8×8).
    """

    classes = DIGITS_CLASSES

    def __init__(self, split: Literal["train", "val"] = "train", img_size: int = 32):
        if split not in ("train", "val"):
            raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
        if img_size < 8:
            raise ValueError(f"digits img_size must be >= 8 (the scans are 8x8), got {img_size}")
        images, labels = load_digits_arrays()
        idx = digits_split_indices()[0 if split == "train" else 1]
        grey = (images[idx] * (255.0 / 16.0)).round().astype(np.uint8)  # [N, 8, 8], 0..255
        self.split = split
        self.img_size = img_size
        self.targets = labels[idx].tolist()
        self.images = [
            Image.fromarray(g, mode="L").resize((img_size, img_size), Image.BILINEAR).convert("RGB") for g in grey
        ]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.targets[index]

    def describe(self, index: int) -> str:
        return f"digits/{self.split}/{index}"


# Composing digit scenes (the bundled segmentation and detection data sets)

_PLACEMENT_TRIES = 20  # random positions tried for a digit before it is left out (the scene is full)


def place_square(rng: np.random.Generator, occupied: np.ndarray, side: int) -> tuple[int, int] | None:
    """A random top-left corner ``(y, x)`` of a ``side`` square that overlaps no occupied pixel, marked occupied; None
    after ``_PLACEMENT_TRIES`` tries (the scene is full). ``occupied``: [S, S] bool."""
    S = occupied.shape[0]
    for _ in range(_PLACEMENT_TRIES):
        y, x = (int(v) for v in rng.integers(0, S - side + 1, size=2))
        if not occupied[y:y + side, x:x + side].any():
            occupied[y:y + side, x:x + side] = True
            return y, x
    return None


def ink_alpha(ink: np.ndarray, side: int) -> np.ndarray:
    """A digit's ink ([8, 8] in [0, 1]) resized to ``[side, side]`` (bilinear), in [0, 1]: the blending weight."""
    resized = Image.fromarray((ink * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float64) / 255.0


def blend_ink(image: np.ndarray, y: int, x: int, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Paint ink of ``colour`` with weights ``alpha`` [side, side] into ``image`` [S, S, 3] at (y, x), in place."""
    side = alpha.shape[0]
    patch = image[y:y + side, x:x + side]
    image[y:y + side, x:x + side] = patch * (1 - alpha[..., None]) + colour * alpha[..., None]
