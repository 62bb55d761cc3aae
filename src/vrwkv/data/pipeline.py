"""Turn a data set of (PIL image, label) into reproducible training samples, and batch them.

Two properties the training engine relies on:

* **Per-sample seeded augmentation.** The random augmentation of sample ``i`` in epoch ``e`` is a function of
  ``(seed, e, i)`` only, not of worker count, process count or how many samples came before. So a run resumed in
  the middle of an epoch, or split over several DDP processes, sees exactly the same augmented images.
* **Bad images never crash a worker.** An unreadable file becomes a record ``(path, reason)`` in the batch's
  ``"bad"`` list. For training the sample is replaced by the next readable image (fixed batch size, which DDP
  and mixup need); for evaluation it is dropped. The engine then skips-and-counts or stops, as configured.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from vrwkv.data.image_folder import BadImageError

_MAX_CONSECUTIVE_BAD = 64


def read_replacing_bad(base: Any, index: int, replace_bad: bool,
                       describe: Callable[[int], str] | None = None) -> tuple[int, Any, list[tuple[str, str]]]:
    """``base[index]``, or, if it cannot be read and ``replace_bad``, the next readable sample.

    Returns ``(j, sample, bad)``: the index read, the sample (None if unreadable and not replaced) and the
    ``(path, reason)`` of every unreadable file met. Raises after 64 consecutive unreadable samples.
    """
    bad: list[tuple[str, str]] = []
    n = len(base)
    for attempt in range(_MAX_CONSECUTIVE_BAD):
        j = (index + attempt) % n
        try:
            return j, base[j], bad
        except BadImageError as e:
            bad.append((e.path, e.reason))
            if not replace_bad:
                return j, None, bad
    where = describe(index) if describe else f"sample {index}"
    raise RuntimeError(f"{_MAX_CONSECUTIVE_BAD} consecutive unreadable samples starting at {where}; "
                       "is the data set corrupt?")


@contextmanager
def sample_rng(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Seed python, numpy and torch RNGs from ``(seed, epoch, index)``; restore the previous states afterwards."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    s_py, s_np, s_torch = np.random.SeedSequence([seed, epoch, index]).generate_state(3)
    random.seed(int(s_py))
    np.random.seed(int(s_np))
    # the CPU generator only (transforms run on CPU): torch.manual_seed also seeds accelerators and is ~100x slower
    torch.default_generator.manual_seed(int(s_torch))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class TransformedDataset(torch.utils.data.Dataset):
    """Apply ``transform`` to ``base[i]`` under a per-sample seed, capturing unreadable images.

    Args:
        base: indexable data set returning ``(PIL image, int label)``; may raise :class:`BadImageError`.
        transform: PIL image → tensor.
        seed: run seed (combined with the epoch and the index).
        replace_bad: replace an unreadable sample by the next readable one (training) instead of dropping it.
        min_size: images whose shorter side is below this are reported as upscaled (they still work).

    Each item is ``(image tensor | None, label, bad: list[(path, reason)], small: list[path])``.
    """

    def __init__(self, base: Any, transform: Callable, seed: int = 0, replace_bad: bool = False,
                 min_size: int = 0):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.replace_bad = replace_bad
        self.min_size = min_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, list[tuple[str, str]], list[str]]:
        j, sample, bad = read_replacing_bad(self.base, index, self.replace_bad, self._describe)
        if sample is None:
            return None, -1, bad, []
        img, target = sample
        small = [self._describe(j)] if min(img.size) < self.min_size else []
        with sample_rng(self.seed, self.epoch, index):
            return self.transform(img), int(target), bad, small

    def _describe(self, index: int) -> str:
        describe = getattr(self.base, "describe", None)
        return describe(index) if describe else f"sample {index}"


def collate_samples(items: list[tuple]) -> dict[str, Any]:
    """Stack the readable samples; keep ``bad`` (path, reason) records and ``small`` paths as lists."""
    good = [it for it in items if it[0] is not None]
    if good:
        image = torch.stack([it[0] for it in good])
    else:  # a batch of only unreadable images: an empty batch the loop will skip
        image = torch.empty(0)
    return {
        "image": image,
        "target": torch.tensor([it[1] for it in good], dtype=torch.long),
        "bad": [b for it in items for b in it[2]],
        "small": [s for it in items for s in it[3]],
    }
