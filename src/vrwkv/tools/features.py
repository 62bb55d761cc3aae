"""Pooled embeddings of every image of a folder, written with the file list (safetensors or npz).

The embedding of an image is the official classifier's neck output: the mean over the patch tokens of
``model.forward_features`` (final-normed tokens; VRWKV6's cls token is left out), ``[C]`` per image. Images are
preprocessed like the model's evaluation pipeline (resize the short side to ``img_size / crop_pct``, centre crop,
normalise with the pretrained config's mean/std).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = ["list_images", "eval_transform", "pooled_features", "extract_features", "save_features", "load_features",
           "FeatureResult", "FORMATS"]

_logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "npz")


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursive, hidden files skipped), sorted by path.

    Raises:
        ValueError: ``folder`` is not a directory or holds no image file.
    """
    from vrwkv.data.image_folder import IMG_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    files = sorted(
        str(p) for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    if not files:
        raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root}")
    return files


def eval_transform(model: nn.Module, img_size: int | None = None) -> Callable:
    """The model's evaluation preprocessing (PIL RGB -> ``[3, h, w]`` float) from its pretrained config: resize the
    short side to ``size / crop_pct``, centre crop, normalise. ``img_size`` defaults to the model's own input size."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if img_size is None:  # the size the model was built for (its pretrained cfg does not follow an img_size override)
        h, w = (g * model.patch_size for g in model.grid_size)
        size = (3, h, w)
    else:
        size = img_size
    return create_transform(size, is_training=False, interpolation=cfg["interpolation"], mean=cfg["mean"],
                            std=cfg["std"], crop_pct=cfg["crop_pct"])


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, h, w]`` -> embeddings ``[B, C]``: the mean of the final-normed patch tokens."""
    tokens = model.forward_features(images)  # [B, T, C], patch tokens first
    num_patches = tokens.shape[1] - getattr(model, "num_suffix_tokens", 0)
    return tokens[:, :num_patches].mean(dim=1)


class _ImageFiles(torch.utils.data.Dataset):
    """Decoded, transformed images; a file that cannot be decoded yields ``None`` and the reason (not an error)."""

    def __init__(self, files: list[str], transform: Callable):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        from vrwkv.data import BadImageError, load_rgb

        try:
            return self.transform(load_rgb(self.files[i])), i, ""
        except BadImageError as e:
            return None, i, e.reason


def _collate(items: list[tuple[torch.Tensor | None, int, str]]) -> tuple[torch.Tensor | None, list[int], list]:
    good = [(x, i) for x, i, _ in items if x is not None]
    bad = [(i, reason) for x, i, reason in items if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


@dataclass
class FeatureResult:
    """Embeddings ``features [N, C]`` (float32, CPU) of ``files`` (same order), and the skipped ``bad`` files
    as ``(path, reason)``."""

    features: torch.Tensor
    files: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)


@torch.no_grad()
def extract_features(model: nn.Module, files: list[str], transform: Callable, batch_size: int = 32,
                     on_bad_image: Literal["skip", "error"] = "skip", workers: int = 0,
                     progress: bool = True) -> FeatureResult:
    """Pooled embeddings of image files, in batches, with a tqdm progress bar.

    Args:
        model: a VRWKV / VRWKV6 model (eval mode is set here); inputs go to its device.
        files: image paths.
        transform: PIL RGB image -> ``[3, S, S]`` tensor (e.g. :func:`eval_transform`).
        batch_size: images per forward pass.
        on_bad_image: ``"skip"`` leaves undecodable files out (listed in ``bad``); ``"error"`` raises on the first.
        workers: DataLoader worker processes that decode images.
        progress: show the progress bar (on stderr).

    Raises:
        vrwkv.data.BadImageError: a file cannot be decoded and ``on_bad_image="error"`` (the message names it).
        ValueError: bad arguments, or every file was bad.
    """
    from tqdm import tqdm

    from vrwkv.data import BadImageError

    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not files:
        raise ValueError("no image files given")
    param = next(model.parameters())
    model.eval()
    loader = torch.utils.data.DataLoader(_ImageFiles(files, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate)
    chunks, kept, bad = [], [], []
    with tqdm(total=len(files), desc="features", unit="img", disable=not progress) as bar:
        for images, indices, failed in loader:
            for i, reason in failed:
                if on_bad_image == "error":
                    raise BadImageError(files[i], reason)
                _logger.warning("skipping bad image %s: %s", files[i], reason)
                bad.append((files[i], reason))
            if images is not None:
                feats = pooled_features(model, images.to(device=param.device, dtype=param.dtype))
                chunks.append(feats.float().cpu())
                kept.extend(files[i] for i in indices)
            bar.update(len(indices) + len(failed))
    if not chunks:
        raise ValueError(f"none of the {len(files)} files could be decoded")
    return FeatureResult(torch.cat(chunks), kept, bad)


def save_features(result: FeatureResult, path: str | os.PathLike, fmt: str | None = None,
                  root: str | os.PathLike | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write embeddings and their file list.

    * safetensors: tensor ``features`` [N, C]; metadata ``files`` (JSON list), ``bad_files`` (JSON list of
      [path, reason]) and the given ``metadata``;
    * npz: arrays ``features`` [N, C], ``files`` [N] (str), ``bad_files`` [M, 2] (str), and one array per
      metadata entry.

    Args:
        result: from :func:`extract_features`.
        path: output file; the parent folder must exist.
        fmt: ``"safetensors"`` or ``"npz"``; default from the suffix of ``path`` (``.npz`` -> npz, else safetensors).
        root: store file paths relative to this folder.
        metadata: extra string entries (model name, image size, ...).

    Returns:
        the written path.
    """
    path = Path(path)
    fmt = fmt or ("npz" if path.suffix.lower() == ".npz" else "safetensors")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")

    def rel(p: str) -> str:
        return os.path.relpath(p, root) if root is not None else p

    files = [rel(f) for f in result.files]
    bad = [[rel(f), reason] for f, reason in result.bad]
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({"features": result.features.contiguous()}, str(path),
                  metadata={**meta, "files": json.dumps(files), "bad_files": json.dumps(bad)})
    else:
        arrays = {k: np.array(v) for k, v in meta.items()}
        np.savez(path, features=result.features.numpy(), files=np.array(files, dtype=str),
                 bad_files=np.array(bad, dtype=str).reshape(-1, 2), **arrays)
        if path.suffix.lower() != ".npz":  # np.savez appends .npz to other names
            path = path.with_name(path.name + ".npz")
    return path


def load_features(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """Read a file written by :func:`save_features`: ``(features [N, C], files, metadata)``."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            meta = {k: str(data[k]) for k in data.files if k not in ("features", "files", "bad_files")}
            return torch.from_numpy(data["features"]), [str(f) for f in data["files"]], meta
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        feats = f.get_tensor("features")
    return feats, json.loads(meta.pop("files")), meta
