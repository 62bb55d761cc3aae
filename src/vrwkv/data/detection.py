"""Object-detection / instance-segmentation data: bundled digit scenes, COCO folders, a COCO writer, batching.

* :class:`DigitDetectionScenes` (no download): scikit-learn's real handwritten digits (8x8 scans) upscaled and
  pasted, without overlap, at random places on a noisy background (the composition of
  :class:`vrwkv.data.segmentation.DigitScenes`); every digit is an instance with its exact mask (upscaled ink above
  the same threshold) and the tight box of that mask; categories ``"0".."9"``. Scene ``i`` of a split is a pure
  function of ``(split, i)``; val scenes use only held-out digits.
* :class:`COCODetection`: an images folder + a COCO ``instances_*.json`` (boxes, polygon / RLE masks, crowd and
  ``ignore`` flags); category ids map to contiguous labels ``1..K`` (torchvision's convention, 0 = background).
* :func:`export_coco`: writes any of these data sets as a COCO folder + json (so the COCO path is tested on a
  real stand-in of the format).
* :class:`DetectionSamples` / :func:`collate_detection`: seeded per-sample augmentation (flip), crowd / degenerate
  boxes removed from training targets (mmdet's and torchvision's practice), bad-image capture, padded batches.

Targets follow torchvision's detection models: ``boxes [N, 4]`` (x1, y1, x2, y2, float pixels), ``labels [N]``
(int64, 1..K), ``masks [N, h, w]`` (uint8), plus ``iscrowd [N]`` and ``image_id``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vrwkv.data.digits import blend_ink, ink_alpha, place_square
from vrwkv.data.image_folder import BadImageError, load_rgb
from vrwkv.data.pipeline import read_replacing_bad, sample_rng

DIGIT_CATEGORIES = [str(i) for i in range(10)]
_SCENES_SEED = 20240611
MASK_THRESHOLD = 0.4  # a pixel belongs to a digit where its upscaled ink (0..1) exceeds this (as DigitScenes)


# ------------------------------------------------------------------------------------------------ masks
def _rle_lib():
    from pycocotools import mask as mask_utils

    return mask_utils


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary ``[h, w]`` mask as compressed COCO RLE (``counts`` as a str, JSON-ready)."""
    rle = _rle_lib().encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed RLE with list counts, or compressed RLE) as a binary
    ``[height, width]`` uint8 mask.

    Raises:
        ValueError: not one of the COCO forms, or an RLE of another image size.
    """
    mu = _rle_lib()
    if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        polys = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if len(polys) != len(segmentation):
            raise ValueError("polygons must be lists of >= 3 (x, y) pairs")
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mu.merge(mu.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed (crowd annotations of COCO)
            rle = mu.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")
    return np.ascontiguousarray(mu.decode(rle), dtype=np.uint8)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight ``(x1, y1, x2, y2)`` of a binary mask's pixels (pixel ``(r, c)`` covers ``[c, c+1] x [r, r+1]``)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        raise ValueError("empty mask has no box")
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _target(boxes: list, labels: list, masks: list[np.ndarray], iscrowd: list, image_id: int,
            size: tuple[int, int]) -> dict[str, torch.Tensor]:
    h, w = size
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
        "iscrowd": torch.tensor(iscrowd, dtype=torch.uint8),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
    }


# ------------------------------------------------------------------------------------------------ bundled scenes
class DigitDetectionScenes:
    """Bundled instance-segmentation scenes of real handwritten digits (10 categories, ``"0"``..``"9"``).

    Args:
        split: ``"train"`` or ``"val"``.
        img_size: side of the square scenes.
        num_images: scenes in the split (default 1000 train / 200 val).
        max_digits: each scene holds 1..max_digits digits (fewer if no free place is found).
        side_range: digit side in pixels as fractions of ``img_size`` (inclusive).

    Each item is ``(image, target)``; :attr:`instances` keeps how every scene was composed (digit index into
    ``load_digits_arrays()``, label, top-left corner and side of the pasted square).
    """

    def __init__(self, split: Literal["train", "val"] = "train", img_size: int = 64, num_images: int | None = None,
                 max_digits: int = 4, side_range: tuple[float, float] = (0.25, 0.5)):
        from vrwkv.data.digits import digits_split_indices, load_digits_arrays

        if split not in ("train", "val"):
            raise ValueError(f"digit detection scenes split must be 'train' or 'val', got {split!r}")
        if img_size < 32:
            raise ValueError(f"digit detection scenes img_size must be >= 32, got {img_size}")
        if max_digits < 1:
            raise ValueError(f"max_digits must be >= 1, got {max_digits}")
        lo, hi = side_range
        if not 0 < lo <= hi <= 1 or round(lo * img_size) < 8:
            raise ValueError(f"side_range must satisfy 8/img_size <= lo <= hi <= 1, got {tuple(side_range)}")
        self.split, self.img_size, self.max_digits = split, img_size, max_digits
        self.side_range = (round(lo * img_size), round(hi * img_size))
        n = num_images if num_images is not None else (1000 if split == "train" else 200)
        images, labels = load_digits_arrays()
        self._ink, self._labels = images / 16.0, labels
        self._pool = digits_split_indices()[0 if split == "train" else 1]
        self.classes = list(DIGIT_CATEGORIES)
        self.category_ids = list(range(1, 11))  # COCO category id of label l is category_ids[l - 1]
        self.instances: list[list[dict[str, int]]] = []
        self.scenes = [self._scene(i) for i in range(n)]

    def _scene(self, index: int) -> tuple[Image.Image, dict[str, torch.Tensor]]:
        rng = np.random.default_rng([_SCENES_SEED, 0 if self.split == "train" else 1, index])
        S = self.img_size
        background = rng.uniform(0, 255, size=3)
        image = np.clip(background + rng.normal(0, 25, size=(S, S, 3)), 0, 255)  # noisy coloured background
        taken = np.zeros((S, S), dtype=bool)
        placed, boxes, labels, masks = [], [], [], []
        for _ in range(rng.integers(1, self.max_digits + 1)):
            k = int(self._pool[rng.integers(len(self._pool))])
            side = int(rng.integers(self.side_range[0], self.side_range[1] + 1))
            alpha = ink_alpha(self._ink[k], side)
            corner = place_square(rng, taken, side)  # squares do not overlap: every mask is the digit's whole ink
            if corner is None:
                continue
            y, x = corner
            colour = (background + 255 * 0.5 + rng.uniform(-60, 60, size=3)) % 255  # far from the background
            blend_ink(image, y, x, alpha, colour)
            mask = np.zeros((S, S), dtype=np.uint8)
            mask[y:y + side, x:x + side] = alpha > MASK_THRESHOLD
            if not mask.any():
                continue
            placed.append({"digit": k, "label": int(self._labels[k]) + 1, "x": x, "y": y, "side": side})
            boxes.append(mask_box(mask))
            labels.append(int(self._labels[k]) + 1)
            masks.append(mask)
        self.instances.append(placed)
        target = _target(boxes, labels, masks, [0] * len(labels), index + 1, (S, S))
        return Image.fromarray(image.round().astype(np.uint8)), target

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[Image.Image, dict[str, torch.Tensor]]:
        image, target = self.scenes[index]
        return image, {k: v.clone() for k, v in target.items()}

    def describe(self, index: int) -> str:
        return f"digit_detection_scenes/{self.split}/{index}"

    def image_info(self, index: int) -> dict[str, Any]:
        return {"id": index + 1, "file_name": f"{self.split}_{index:05d}.png", "height": self.img_size,
                "width": self.img_size}

    def coco_dict(self) -> dict[str, Any]:
        """The ground truth as a COCO instances dict (compressed-RLE masks), for evaluation and export."""
        images, annotations = [], []
        for i in range(len(self)):
            images.append(self.image_info(i))
            t = self.scenes[i][1]
            for box, label, mask in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"].numpy()):
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": self.category_ids[label - 1], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": float(mask.sum()), "segmentation": encode_mask(mask), "iscrowd": 0})
        categories = [{"id": c, "name": n, "supercategory": "digit"} for c, n in zip(self.category_ids, self.classes)]
        return {"images": images, "annotations": annotations, "categories": categories}


# ------------------------------------------------------------------------------------------------ COCO folders
class COCODetection:
    """A COCO-format split: an images folder and an ``instances`` json.

    Category ids (any integers) map to labels ``1..K`` in increasing id order. Annotations with ``iscrowd`` or
    ``ignore`` set are kept as crowd regions (ignored by COCO evaluation, dropped from training targets); an
    annotation without ``segmentation`` gets its box as mask.

    Args:
        images_dir: folder holding every ``file_name`` of the json's images.
        annotation_file: the COCO instances json.

    Raises:
        ValueError: missing / invalid json, missing keys, unknown image or category ids, malformed boxes, duplicate
            ids, or image files that do not exist (the first few are named).
    """

    def __init__(self, images_dir: str | Path, annotation_file: str | Path):
        self.images_dir, self.annotation_file = Path(images_dir), Path(annotation_file)
        if not self.annotation_file.is_file():
            raise ValueError(f"COCO annotation file {self.annotation_file} does not exist")
        if not self.images_dir.is_dir():
            raise ValueError(f"COCO images folder {self.images_dir} does not exist")
        try:
            data = json.loads(self.annotation_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.annotation_file} is not valid JSON ({e})") from None
        where = str(self.annotation_file)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
            raise ValueError(f"{where} must be a COCO instances json: a mapping with lists 'images', 'annotations' "
                             f"and 'categories'")
        try:
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            self.category_ids = [int(c["id"]) for c in categories]
            self.classes = [str(c.get("name", c["id"])) for c in categories]
            images = [{**im, "id": int(im["id"]), "file_name": str(im["file_name"]), "height": int(im["height"]),
                       "width": int(im["width"])} for im in data["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: every category needs an integer 'id' and every image 'id', 'file_name', "
                             f"'height' and 'width' ({type(e).__name__}: {e})") from None
        if not categories:
            raise ValueError(f"{where} has no categories")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"{where} has duplicate category ids")
        ids = [im["id"] for im in images]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where} has duplicate image ids")
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.images = images
        index_of = {im["id"]: i for i, im in enumerate(images)}
        self.annotations: list[list[dict[str, Any]]] = [[] for _ in images]
        annotations, seen = [], set()
        for n, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann or "bbox" not in ann:
                raise ValueError(f"{where}: annotation #{n} needs 'image_id', 'category_id' and 'bbox'")
            if ann["image_id"] not in index_of:
                raise ValueError(f"{where}: annotation #{n} refers to unknown image id {ann['image_id']!r}")
            if ann["category_id"] not in self.label_of:
                raise ValueError(f"{where}: annotation #{n} refers to unknown category id {ann['category_id']!r}")
            bbox = ann["bbox"]
            if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)
                    or bbox[2] < 0 or bbox[3] < 0):
                raise ValueError(f"{where}: annotation #{n} has bbox {bbox!r}; expected [x, y, w, h] with w, h >= 0")
            ann_id = ann.get("id", n + 1)
            if ann_id in seen:
                raise ValueError(f"{where} has duplicate annotation id {ann_id!r}")
            seen.add(ann_id)
            crowd = int(bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0)))
            area = ann.get("area", bbox[2] * bbox[3])
            ann = {**ann, "id": ann_id, "iscrowd": crowd, "area": float(area)}
            annotations.append(ann)
            self.annotations[index_of[ann["image_id"]]].append(ann)
        self._coco = {"images": images, "annotations": annotations, "categories": categories}
        missing = [im["file_name"] for im in images if not (self.images_dir / im["file_name"]).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) of {where} are missing from {self.images_dir}, e.g. "
                             f"{', '.join(missing[:3])}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, dict[str, torch.Tensor]]:
        info = self.images[index]
        path = self.images_dir / info["file_name"]
        image = load_rgb(path)
        h, w = info["height"], info["width"]
        if image.size != (w, h):
            raise BadImageError(path, f"size {image.size} differs from the json's (width {w}, height {h})")
        boxes, labels, masks, crowd = [], [], [], []
        for ann in self.annotations[index]:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            seg = ann.get("segmentation")
            try:
                if seg is None or seg == []:
                    mask = np.zeros((h, w), dtype=np.uint8)
                    mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
                else:
                    mask = decode_segmentation(seg, h, w)
            except (ValueError, TypeError) as e:
                raise BadImageError(path, f"annotation {ann['id']}: bad segmentation ({e})") from None
            boxes.append((x1, y1, x2, y2))
            labels.append(self.label_of[ann["category_id"]])
            masks.append(mask)
            crowd.append(ann["iscrowd"])
        return image, _target(boxes, labels, masks, crowd, info["id"], (h, w))

    def describe(self, index: int) -> str:
        return str(self.images_dir / self.images[index]["file_name"])

    def image_info(self, index: int) -> dict[str, Any]:
        return self.images[index]

    def coco_dict(self) -> dict[str, Any]:
        """The ground truth as read (``ignore`` folded into ``iscrowd``, missing ``area`` = box area)."""
        return self._coco


def export_coco(dataset: Any, images_dir: str | Path, annotation_file: str | Path) -> Path:
    """Write a detection data set (e.g. :class:`DigitDetectionScenes`) as PNG files + a COCO instances json.

    Returns:
        The json path.
    """
    images_dir, annotation_file = Path(images_dir), Path(annotation_file)
    images_dir.mkdir(parents=True, exist_ok=True)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        image, _ = dataset[i]
        image.save(images_dir / dataset.image_info(i)["file_name"])
    annotation_file.write_text(json.dumps(dataset.coco_dict()))
    return annotation_file


# ------------------------------------------------------------------------------------------------ samples / batches
class DetectionSamples(torch.utils.data.Dataset):
    """``base[i]`` as ``(image [3, h, w] float 0..1, target)`` under the seed ``(seed, epoch, i)``.

    Training (``train=True``) flips horizontally with probability ``hflip`` and drops crowd and degenerate (< 1
    pixel wide or high) instances from the target, as mmdet does; resizing and normalisation happen in the model
    (torchvision's ``GeneralizedRCNNTransform``). Unreadable samples are captured as ``(path, reason)``, replaced
    by the next readable one if ``replace_bad``.

    Items: ``(image | None, target | None, bad, small)`` (``small`` is always empty).
    """

    def __init__(self, base: Any, train: bool, hflip: float = 0.0, seed: int = 0, replace_bad: bool = False):
        self.base, self.train, self.hflip, self.seed, self.replace_bad = base, train, hflip, seed, replace_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def _transform(self, image: Image.Image, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        img = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if not self.train:
            return img, target
        boxes = target["boxes"]
        keep = (target["iscrowd"] == 0) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        target = {k: (v[keep] if v.ndim else v) for k, v in target.items()}
        if random.random() < self.hflip:
            w = img.shape[-1]
            img, boxes = img.flip(-1), target["boxes"]
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            target["masks"] = target["masks"].flip(-1)
        return img, target

    def __getitem__(self, index: int) -> tuple[Any, Any, list, list]:
        _, sample, bad = read_replacing_bad(self.base, index, self.replace_bad)
        if sample is None:
            return None, None, bad, []
        with sample_rng(self.seed, self.epoch, index):
            img, target = self._transform(*sample)
        return img, target, bad, []


def collate_detection(items: list[tuple]) -> dict[str, Any]:
    """Pad images to ``image [B, 3, H, W]`` (zeros) with their ``sizes [B, 2]`` (h, w); ``targets`` stay a list of
    dicts (torchvision's format); ``bad`` / ``small`` records as lists."""
    good = [it for it in items if it[0] is not None]
    if good:
        H, W = max(it[0].shape[1] for it in good), max(it[0].shape[2] for it in good)
        image = torch.zeros((len(good), 3, H, W))
        for b, it in enumerate(good):
            image[b, :, :it[0].shape[1], :it[0].shape[2]] = it[0]
        sizes = torch.tensor([list(it[0].shape[1:]) for it in good], dtype=torch.int64)
    else:
        image, sizes = torch.empty(0), torch.empty((0, 2), dtype=torch.int64)
    return {"image": image, "sizes": sizes, "targets": [it[1] for it in good],
            "bad": [b for it in items for b in it[2]], "small": [s for it in items for s in it[3]]}
