"""A sampler that shards an epoch over DDP ranks, reproduces the single-process batches and resumes mid-epoch."""
from __future__ import annotations

from typing import Iterator

import torch


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch order, split over ``num_replicas`` ranks so that global batches equal single-process ones.

    Training (``shuffle=True``): the epoch's permutation (seeded by ``seed + epoch``) is cut to a multiple of
    ``global_batch`` and rank ``r`` takes positions ``r, r + R, r + 2R, ...``. With per-rank batch
    ``global_batch / R``, the union of the ranks' k-th batches is the single-process k-th batch.
    Evaluation (``shuffle=False``): dataset order, every sample exactly once over all ranks (no padding).

    ``set_epoch(epoch, skip_batches)`` makes the next iteration start after ``skip_batches`` per-rank batches,
    which is how a run resumes in the middle of an epoch.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, global_batch: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        if shuffle and global_batch % num_replicas:
            raise ValueError(f"global batch {global_batch} is not divisible by the {num_replicas} processes")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.global_batch = global_batch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches * (self.global_batch // self.num_replicas)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
            order = order[: len(order) // self.global_batch * self.global_batch]
        else:
            order = list(range(self.num_samples))
        return order[self.rank:: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        if self.shuffle:
            per_rank = self.num_samples // self.global_batch * self.global_batch // self.num_replicas
        else:
            per_rank = len(range(self.rank, self.num_samples, self.num_replicas))
        return max(per_rank - self.skip, 0)
