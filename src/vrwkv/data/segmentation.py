"""Semantic-segmentation data: bundled digit scenes, ADE20K-layout folders, joint image/mask transforms, batching.

* :class:`DigitScenes` (no download): scikit-learn's real handwritten digits (8x8 scans) upscaled and written in
  dark ink at random, non-overlapping places on a light noisy background, with exact per-pixel labels (class =
  digit + 1, 0 = background). Scene ``i`` of a split is a pure function of ``(split, i)``; train scenes use only the
  digits of the classification train split and val scenes only the held-out ones
  (``vrwkv.data.digits.digits_split_indices``).
* :class:`ADE20KFolder`: ``images/{training,validation}/*.jpg`` + ``annotations/.../*.png`` with mmseg's
  ``reduce_zero_label`` (label 0 = "other" becomes 255 = ignore, the others shift down by one).
* :class:`SegmentationSamples`: per-sample seeded augmentation (same guarantees as
  :class:`vrwkv.data.pipeline.TransformedDataset`: exact resume, DDP-independent) and bad-image capture.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vrwkv.data.digits import blend_ink, ink_alpha, place_square
from vrwkv.data.image_folder import BadImageError, load_rgb
from vrwkv.data.pipeline import read_replacing_bad, sample_rng

IGNORE_INDEX = 255
DIGIT_SCENE_CLASSES = ["background"] + [f"digit {i}" for i in range(10)]
_SCENES_SEED = 20240302
_MASK_THRESHOLD = 0.4  # a pixel belongs to a digit where its upscaled ink intensity (0..1) exceeds this


class DigitScenes:
    """Bundled segmentation scenes of real handwritten digits (11 classes: background + digits 0-9).

    Dark ink on light paper, whatever the colours: one contrast polarity, as in the digits classification data.
    With a random polarity per channel (ink lighter than the paper in some channels, darker in others: the first
    version of these scenes) a small network learnt where the digits are long before it learnt which digit
    (val mIoU ~10 % after 30 epochs). Digits do not overlap, so every labelled digit is whole.

    Args:
        split: ``"train"`` or ``"val"``.
        img_size: side of the square scenes.
        num_images: scenes in the split (default 1000 train / 200 val).
        max_digits: each scene draws 1..max_digits digits (fewer if no free place is found).

    Attributes:
        boxes: per scene, the ``(x, y, side, class)`` square of every digit pasted (disjoint squares).
    """

    classes = DIGIT_SCENE_CLASSES

    def __init__(self, split: Literal["train", "val"] = "train", img_size: int = 64, num_images: int | None = None,
                 max_digits: int = 3):
        from vrwkv.data.digits import digits_split_indices, load_digits_arrays

        if split not in ("train", "val"):
            raise ValueError(f"digit scenes split must be 'train' or 'val', got {split!r}")
        if img_size < 32:
            raise ValueError(f"digit scenes img_size must be >= 32, got {img_size}")
        if max_digits < 1:
            raise ValueError(f"max_digits must be >= 1, got {max_digits}")
        self.split, self.img_size, self.max_digits = split, img_size, max_digits
        n = num_images if num_images is not None else (1000 if split == "train" else 200)
        images, labels = load_digits_arrays()
        pool = digits_split_indices()[0 if split == "train" else 1]
        self._ink, self._labels, self._pool = images / 16.0, labels, pool
        made = [self._scene(i) for i in range(n)]
        self.scenes = [(image, mask) for image, mask, _ in made]
        self.boxes = [boxes for _, _, boxes in made]

    def _scene(self, index: int) -> tuple[Image.Image, Image.Image, list[tuple[int, int, int, int]]]:
        rng = np.random.default_rng([_SCENES_SEED, 0 if self.split == "train" else 1, index])
        S = self.img_size
        background = rng.uniform(140, 255, size=3)  # light paper of any tint
        image = np.clip(background + rng.normal(0, 25, size=(S, S, 3)), 0, 255)  # noisy
        mask = np.zeros((S, S), dtype=np.uint8)
        occupied = np.zeros((S, S), dtype=bool)
        boxes = []
        for _ in range(rng.integers(1, self.max_digits + 1)):
            k = self._pool[rng.integers(len(self._pool))]
            side = int(rng.integers(S // 4, S // 2 + 1))
            colour = rng.uniform(0, 100, size=3)  # dark ink of any tint
            corner = place_square(rng, occupied, side)
            if corner is None:
                continue
            y, x = corner
            alpha = ink_alpha(self._ink[k], side)
            blend_ink(image, y, x, alpha, colour)
            mask[y:y + side, x:x + side][alpha > _MASK_THRESHOLD] = self._labels[k] + 1
            boxes.append((x, y, side, int(self._labels[k]) + 1))
        return Image.fromarray(image.round().astype(np.uint8)), Image.fromarray(mask), boxes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image]:
        return self.scenes[index]

    def describe(self, index: int) -> str:
        return f"digit_scenes/{self.split}/{index}"


class ADE20KFolder:
    """An ADE20K-layout folder: ``root/images/<split>/*.jpg`` with ``root/annotations/<split>/<stem>.png``.

    Args:
        root: data set root.
        split: ``"training"`` or ``"validation"`` (any sub-folder name works).
        reduce_zero_label: mmseg's ADE20K setting: label 0 -> 255 (ignored), k -> k - 1.
        num_classes: classes after reduction (150 for ADE20K).
    """

    def __init__(self, root: str | Path, split: str = "training", reduce_zero_label: bool = True,
                 num_classes: int = 150):
        root = Path(root)
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise ValueError(f"{d} does not exist (expected an ADE20K layout: images/{split}, "
                                 f"annotations/{split})")
        self.images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.images:
            raise ValueError(f"no .jpg/.png images in {img_dir}")
        self.annotations = [ann_dir / f"{p.stem}.png" for p in self.images]
        missing = [str(a) for a in self.annotations if not a.is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) have no annotation, e.g. {missing[0]}")
        self.reduce_zero_label = reduce_zero_label
        self.classes = [f"class {i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image]:
        image = load_rgb(self.images[index])
        try:
            with Image.open(self.annotations[index]) as ann:
                label = np.asarray(ann.convert("L") if ann.mode not in ("L", "P") else ann, dtype=np.int64)
        except (OSError, ValueError) as e:
            raise BadImageError(self.annotations[index], f"unreadable annotation ({e})") from None
        if label.shape != (image.height, image.width):
            raise BadImageError(self.annotations[index], f"annotation size {label.shape[::-1]} differs from the "
                                                         f"image's {image.size}")
        if self.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX + 1, label) - 1  # 0 -> 255, k -> k - 1
        if label.max() >= len(self.classes) and label.max() != IGNORE_INDEX:
            bad = sorted(set(np.unique(label).tolist()) - set(range(len(self.classes))) - {IGNORE_INDEX})
            raise BadImageError(self.annotations[index], f"labels {bad[:5]} outside 0..{len(self.classes) - 1}")
        return image, Image.fromarray(label.astype(np.uint8))

    def describe(self, index: int) -> str:
        return str(self.images[index])


class SegmentationTransform:
    """Joint image/mask transform (mmseg's pipeline, reduced): random rescale (ratio range of ``img_size`` on the
    short side), random crop ``crop_size`` padded with 0 / ignore, horizontal flip; then normalisation.
    Evaluation rescales the short side to ``img_size`` (the mask keeps its size: the task resizes the logits)."""

    def __init__(self, train: bool, img_size: int, crop_size: int, ratio_range: tuple[float, float] = (0.5, 2.0),
                 hflip: float = 0.5, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        self.train, self.img_size, self.crop_size = train, img_size, crop_size
        self.ratio_range, self.hflip = ratio_range, hflip
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = random.uniform(*self.ratio_range) if self.train else 1.0
        short = max(1, round(self.img_size * ratio))
        scale = short / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
            if self.train:
                mask = mask.resize(size, Image.NEAREST)
        img = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, h, w]
        lbl = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())  # [h, w]
        if self.train:
            c = self.crop_size
            pad_h, pad_w = max(c - img.shape[1], 0), max(c - img.shape[2], 0)
            img = (img - self.mean) / self.std
            img = torch.nn.functional.pad(img, (0, pad_w, 0, pad_h), value=0.0)
            lbl = torch.nn.functional.pad(lbl, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
            y = random.randint(0, img.shape[1] - c)
            x = random.randint(0, img.shape[2] - c)
            img, lbl = img[:, y:y + c, x:x + c], lbl[y:y + c, x:x + c]
            if random.random() < self.hflip:
                img, lbl = img.flip(-1), lbl.flip(-1)
            return img.contiguous(), lbl.contiguous()
        return (img - self.mean) / self.std, lbl


class SegmentationSamples(torch.utils.data.Dataset):
    """``base[i]`` (image, mask) through ``transform`` under the seed ``(seed, epoch, i)``; unreadable samples are
    captured as ``(path, reason)`` (replaced by the next readable one if ``replace_bad``, else dropped).

    Items: ``(image [3, h, w] | None, mask [h, w] | None, bad, small)`` (``small`` is always empty here).
    """

    def __init__(self, base: Any, transform: SegmentationTransform, seed: int = 0, replace_bad: bool = False):
        self.base, self.transform, self.seed, self.replace_bad = base, transform, seed, replace_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None, list, list]:
        _, sample, bad = read_replacing_bad(self.base, index, self.replace_bad)
        if sample is None:
            return None, None, bad, []
        with sample_rng(self.seed, self.epoch, index):
            img, lbl = self.transform(*sample)
        return img, lbl, bad, []


def collate_segmentation(items: list[tuple]) -> dict[str, Any]:
    """Stack images ``[B, 3, h, w]`` and masks ``[B, h, w]``; keep ``bad`` / ``small`` records as lists."""
    good = [it for it in items if it[0] is not None]
    shapes = {tuple(it[1].shape) for it in good}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch masks of different sizes {sorted(shapes)[:3]}; evaluate with batch size 1 "
                         f"or images of one size")
    return {
        "image": torch.stack([it[0] for it in good]) if good else torch.empty(0),
        "mask": torch.stack([it[1] for it in good]) if good else torch.empty(0, dtype=torch.long),
        "bad": [b for it in items for b in it[2]],
        "small": [s for it in items for s in it[3]],
    }
