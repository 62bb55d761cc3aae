"""Process-group set-up for ``torchrun`` (gloo on CPU, nccl on CUDA) and the few collectives the engine uses."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``; only the main process writes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def default_device(local_rank: int = 0) -> torch.device:
    """The best available accelerator: CUDA (this process's local GPU), then MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group if launched by ``torchrun`` (``WORLD_SIZE > 1``), else run single-process.

    The backend follows the device: nccl for CUDA, gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device else default_device(local_rank)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_setup(device: str | None, threads: int | None) -> Iterator[DistInfo]:
    """One run's process state: the process group (if launched by torchrun) and the CPU thread count, both undone
    on exit. Callers pass the config the run actually uses (a resumed run's saved one): threads change rounding."""
    if threads is not None and threads < 1:
        raise ValueError(f"run.threads must be >= 1, got {threads}")
    info = init_distributed(device)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield info
        # (on a normal exit only) the ranks tear the group down together: a gloo process whose peer closed its
        # connections while its own threads still used them aborted ("terminate called without an active exception")
        if info.enabled:
            barrier()
    finally:
        torch.set_num_threads(previous)
        cleanup_distributed()


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor (any shape, e.g. a confusion matrix) over all processes (identity when single-process).
    Returns float64 CPU tensors of the input shapes."""
    keys = sorted(tensors)
    if not keys:
        return {}
    device = tensors[keys[0]].device
    shapes = [tensors[k].shape for k in keys]
    flat = torch.cat([tensors[k].detach().to(device=device, dtype=torch.float64).reshape(-1) for k in keys])
    if dist.is_available() and dist.is_initialized():
        if device.type == "mps":  # no float64 on MPS: reduce on CPU
            flat = flat.cpu()
        dist.all_reduce(flat)
    parts = flat.cpu().split([s.numel() for s in shapes])
    return {k: part.reshape(shape) for k, part, shape in zip(keys, parts, shapes)}


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (a list with one entry per rank)."""
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics). Without SyncBN (torch's is
    CUDA-only, so CPU runs go without) each process updates its own copy during training; evaluation must use the
    statistics that are saved, i.e. rank 0's."""
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
