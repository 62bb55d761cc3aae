"""ImageNet-layout image folders (``root/<split>/<class>/<image>``) with robust, explicit image decoding.

Every image is returned as 8-bit RGB whatever it is stored as: grey-level, palette, CMYK, 16-bit or float
images are rescaled to 0..255, and transparent images (RGBA, LA, palette with transparency) are composited on
white. An image that cannot be decoded raises :class:`BadImageError`, which names the file; the data pipeline
turns it into a skipped sample or a clean error, as the user chose (``on_bad_image``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class BadImageError(ValueError):
    """An image file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB, rescaling high-bit-depth data and compositing transparency on white."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif mode == "F":  # float images are either 0..1 or 0..255
            scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        else:  # mode "I": 32-bit ints, in practice 16-bit data (older Pillow opens 16-bit PNGs as "I")
            scale = 255.0 / 65535.0 if arr.size and arr.max() > 255 else 1.0
        arr = np.nan_to_num(arr * scale).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB.

    Raises:
        BadImageError: the file is missing, truncated, not an image, or has an empty size.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                raise BadImageError(path, f"empty image ({img.width}x{img.height})")
            return to_rgb(img).copy()
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"cannot be decoded ({type(e).__name__}: {e})") from None


def _is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMG_EXTENSIONS


class ImageFolderDataset:
    """One split of an ImageNet-style folder tree: ``root/<split>/<class name>/**/<image>``.

    Class indices are the sorted class-folder names of the train split; pass ``classes`` (the train split's list)
    when building the val split so both agree. Images are decoded lazily by ``__getitem__``.

    Args:
        root: data set root containing the split folders.
        split: split folder name (``"train"``, ``"val"``).
        classes: class names in index order; default: the sorted sub-folders of this split.
        on_bad_image: ``"error"`` raises on an empty class folder; ``"skip"`` warns and keeps the class (with no
            images) so indices stay aligned.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", classes: list[str] | None = None,
                 on_bad_image: Literal["skip", "error"] = "error"):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist (expected {Path(root)}/{split}/<class>/<image>)")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise ValueError(f"image folder {self.root} has no class sub-folders (expected one folder per class)")
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{self.root} has class folders not in the training classes: {unknown[:5]}")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        self.empty_classes: list[str] = []
        for name in self.classes:
            folder = self.root / name
            files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image_file(p)) if folder.is_dir() else []
            if not files and name in found:
                self.empty_classes.append(name)
            self.samples.extend((str(p), self.class_to_idx[name]) for p in files)
        if self.empty_classes:
            msg = (f"{len(self.empty_classes)} empty class folder(s) in {self.root}: "
                   + ", ".join(str(self.root / c) for c in self.empty_classes[:5]))
            if on_bad_image == "error":
                raise ValueError(msg + " (use --on-bad-image skip to train without them)")
            warnings.warn(msg + "; kept as classes with no images", stacklevel=2)
        if not self.samples:
            raise ValueError(f"image folder {self.root} contains no image files ({', '.join(IMG_EXTENSIONS)})")
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return load_rgb(path), target

    def describe(self, index: int) -> str:
        return self.samples[index][0]
