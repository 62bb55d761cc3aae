"""Effective receptive field (ERF): how strongly each input pixel moves the centre output token.

For a batch of real images x (normalised as the model expects), the ERF map is

    erf[h, w] = mean over images of  sum over colour channels  | d s / d x[c, h, w] |,
    s = sum_c relu(f_centre[c]),

where ``f_centre`` is the centre patch token of ``model.forward_features(x)`` (grid position (H // 2, W // 2), after
the final norm). Taking the ReLU of the features before summing follows RepLKNet's ERF script (Ding et al., CVPR
2022), which the Vision-RWKV paper's ERF figure follows; a plain sum would be useless after a LayerNorm with unit
gain, whose outputs sum to a constant. The map has the input's resolution.

Images are random crops of scikit-learn's bundled photos (``china.jpg``, ``flower.jpg``) or the images of a folder.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sample_photos", "folder_images", "normalize_images", "erf_map", "erf_area_ratios", "plot_erf"]

_logger = logging.getLogger(__name__)

#: scikit-learn's bundled photos (427 x 640 RGB), used when no image folder is given.
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")


def sample_photos(num_images: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random square crops of scikit-learn's two bundled photos, resized to ``size``.

    Crops alternate between the photos; each has a random side between half and all of the photo's short side and a
    random position, and is resized with antialiasing.

    Args:
        num_images: number of crops (>= 1).
        size: output side in pixels.
        seed: seed of the crop positions and sides.

    Returns:
        float images ``[num_images, 3, size, size]`` in [0, 1].
    """
    from sklearn.datasets import load_sample_image

    if num_images < 1 or size < 1:
        raise ValueError(f"num_images and size must be >= 1, got {num_images} and {size}")
    photos = [torch.from_numpy(np.array(load_sample_image(n))).permute(2, 0, 1) for n in SAMPLE_PHOTOS]  # [3, h, w]
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(num_images):
        photo = photos[i % len(photos)]
        h, w = photo.shape[1:]
        side = int(torch.randint(min(h, w) // 2, min(h, w) + 1, (), generator=gen))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        crops.append(_resize(photo[:, top : top + side, left : left + side], size))
    return torch.stack(crops)


def folder_images(folder: str | Path, size: int, max_images: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The images of a folder (recursive, sorted), short side resized to ``size`` and centre-cropped.

    Files that are not decodable images are skipped with a warning naming them.

    Args:
        folder: image folder.
        size: output side in pixels.
        max_images: use at most this many images (the first ones in sorted order).

    Returns:
        images ``[N, 3, size, size]`` in [0, 1], and the files used.

    Raises:
        ValueError: the folder does not exist or holds no decodable image.
    """
    from vrwkv.data import BadImageError, load_rgb
    from vrwkv.tools.features import list_images

    files = list_images(folder)
    if max_images is not None:
        files = files[:max_images]
    images, used = [], []
    for f in files:
        try:
            img = torch.from_numpy(np.array(load_rgb(f))).permute(2, 0, 1)  # [3, h, w] uint8
        except BadImageError as e:
            _logger.warning("skipping %s", e)
            continue
        h, w = img.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images.append(_resize(img[:, top : top + side, left : left + side], size))
        used.append(f)
    if not images:
        raise ValueError(f"no decodable image in {folder}")
    return torch.stack(images), used


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[3, h, w]`` -> float ``[3, size, size]`` in [0, 1] (antialiased bilinear)."""
    x = img[None].float().div(255)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def normalize_images(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Normalise [0, 1] images with the mean/std of the model's pretrained config (ImageNet's by default)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=images.dtype, device=images.device)
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=images.dtype, device=images.device)
    return (images - mean[:, None, None]) / std[:, None, None]


def erf_map(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The effective receptive field of the centre output token (see the module docstring), averaged over images.

    Args:
        model: a VRWKV / VRWKV6 model (anything with ``forward_features`` returning tokens ``[B, T, C]`` whose first
            ``H * W`` are the patch tokens in raster order, and a ``patch_embed.feat_size``).
        images: normalised images ``[N, 3, h, w]`` on the model's device.
        batch_size: images per forward/backward pass.

    Returns:
        ``[h, w]`` float64 map (on the CPU), >= 0.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, 3, h, w], got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    H, W = model.patch_embed.feat_size(tuple(images.shape[-2:]))
    centre = (H // 2) * W + W // 2  # raster index of the centre patch token
    was_training = model.training
    model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for batch in images.split(batch_size):
            x = batch.detach().clone().requires_grad_(True)
            feats = model.forward_features(x)  # [B, T, C]
            # images of a batch are independent, so one backward of the sum gives every image's own gradient
            score = torch.relu(feats[:, centre]).sum()
            (grad,) = torch.autograd.grad(score, x)
            total += grad.abs().sum(dim=(0, 1)).double().cpu()  # summed over images and colour channels
    finally:
        model.train(was_training)
    return total / images.shape[0]


def erf_area_ratios(erf: torch.Tensor, patch_size: int, thresholds: Sequence[float] = (0.2, 0.3, 0.5, 0.99)
                    ) -> dict[float, float]:
    """RepLKNet's ERF size: for each threshold t, the area (as a fraction of the image) of the smallest square
    centred on the centre token that holds a fraction t of the map's total.

    Args:
        erf: map ``[h, w]``.
        patch_size: patch side (the square is centred on the centre patch token's pixels).
        thresholds: fractions in (0, 1].

    Returns:
        ``{t: area ratio}``; a larger ratio means a wider effective receptive field.
    """
    h, w = erf.shape
    H, W = math.ceil(h / patch_size), math.ceil(w / patch_size)
    cy, cx = (H // 2) * patch_size + patch_size // 2, (W // 2) * patch_size + patch_size // 2
    total = erf.sum().item()
    out = {}
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
        for r in range(max(h, w) + 1):
            window = erf[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
            if window.sum().item() >= t * total * (1 - 1e-9):
                out[t] = window.numel() / (h * w)
                break
    return out


def plot_erf(maps: Mapping[str, torch.Tensor], path: str | Path, title: str | None = None,
             patch_size: int | None = None) -> Path:
    """Draw ERF maps side by side as heat maps to a PNG (matplotlib, no pyplot: no global backend state).

    Each map is shown relative to its own maximum on a log scale (1e-4 ... 1), so the near and far field are both
    visible; with ``patch_size`` each panel's title also gives the 50 % / 99 % area ratios.

    Returns:
        the written path.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("plot_erf needs at least one map")
    n = len(maps)
    fig = Figure(figsize=(3.6 * n + 0.8, 3.8))
    axes = fig.subplots(1, n, squeeze=False)
    image = None
    for ax, (label, erf) in zip(axes[0], maps.items()):
        rel = (erf / erf.max().clamp_min(1e-30)).clamp_min(1e-4).numpy()
        image = ax.imshow(rel, cmap="magma", norm=LogNorm(vmin=1e-4, vmax=1.0))
        sub = label
        if patch_size is not None:
            ratios = erf_area_ratios(erf, patch_size, (0.5, 0.99))
            sub += f"\n50%: {ratios[0.5]:.1%} of the image, 99%: {ratios[0.99]:.1%}"
        ax.set_title(sub, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="|d centre token / d pixel| (relative to max)")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
