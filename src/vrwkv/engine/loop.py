"""The training loop shared by all tasks: epochs of optimizer steps, evaluation, checkpoints, resume, DDP.

A *task* is an ``nn.Module`` with ``.model`` (the network that is optimised, EMA'd and saved),
``forward(batch) -> {"loss": scalar, ...}`` for a training batch, ``evaluate_batch(batch, model) -> {name: sum}``
and ``summarize(sums) -> {metric: value}``. Batches are dicts from ``vrwkv.data.collate_samples``: tensors plus
the lists ``bad`` (unreadable images) and ``small`` (images upscaled to the crop).

What the loop guarantees:

* **Resume = uninterrupted run.** Checkpoints are taken after a complete optimizer step and hold the model,
  optimizer, scheduler, EMA, grad scaler, every process's RNG states and the position inside the epoch; the
  sampler resumes at that batch and augmentation is seeded per sample, so the continued run takes exactly the
  same steps (bit-exact on CPU in deterministic mode).
* **DDP = single process with the same global batch.** Each process takes an interleaved slice of every global
  batch; gradients are averaged by DDP, metrics are summed over processes before they are reported.
* **Failures are clean.** A non-finite loss stops the run before the bad update, with a message; the last
  checkpoint on disk is the last good one. Unreadable images are skipped and counted, or stop the run.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vrwkv.data.image_folder import BadImageError
from vrwkv.data.sampler import ShardedSampler
from vrwkv.engine.checkpoint import (CHECKPOINT_FORMAT, atomic_save, capture_rng_state, load_checkpoint,
                                     restore_rng_state)
from vrwkv.engine.config import OptimConfig, RunConfig, ScheduleConfig
from vrwkv.engine.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier
from vrwkv.engine.logging import RunLogger
from vrwkv.engine.optim import build_optimizer, build_scheduler

logger = logging.getLogger("vrwkv")

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before applying that step."""


@dataclass
class LoopState:
    """Position of the run: ``epoch`` (0-based, current), ``step`` (optimizer updates done), ``batch_in_epoch``
    (per-process batches already consumed in the current epoch)."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    bad_images: int = 0
    small_images: int = 0


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` ("auto", "none", "bf16", "fp16") on ``device`` (None = full precision)."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"run.amp must be auto, none, bf16 or fp16, got {amp!r}")


def move_to(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers (what we save)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_loader(dataset: Any, sampler: torch.utils.data.Sampler, batch_size: int, workers: int,
                collate_fn: Callable, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", drop_last=False,
        generator=torch.Generator(),  # keep the global RNG untouched (exact resume)
        persistent_workers=False)


@torch.no_grad()
def evaluate_dataset(task: nn.Module, dataset: Any, *, batch_size: int, workers: int, collate_fn: Callable,
                     device: torch.device, model: nn.Module | None = None, amp_dtype: torch.dtype | None = None,
                     channels_last: bool = False, check_batch: Callable[[dict], None] | None = None,
                     dist: DistInfo | None = None, progress: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Evaluate ``task`` (with ``model``, default ``task.model``) on ``dataset``, sharded over processes.

    Returns ``(metrics, timing)``: ``task.summarize`` of the statistics summed over all processes, and
    ``{"images", "forward_s", "total_s"}`` (forward time is synchronised model time; total includes data loading).
    """
    dist = dist or DistInfo(device=device)
    model = model if model is not None else task.model
    was_training = model.training
    model.eval()
    sampler = ShardedSampler(len(dataset), dist.world_size, dist.rank, shuffle=False)
    loader = make_loader(dataset, sampler, batch_size, workers, collate_fn, device)
    if progress and dist.is_main:
        from tqdm import tqdm

        loader = tqdm(loader, unit="batch", desc="eval", dynamic_ncols=True, leave=False)
    sums: dict[str, torch.Tensor] = {}
    forward_s, t0 = 0.0, time.perf_counter()
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    for batch in loader:
        if check_batch is not None:
            check_batch(batch)
        if batch["image"].numel() == 0:
            continue
        batch = move_to(batch, device, channels_last)
        _synchronize(device)
        t1 = time.perf_counter()
        with autocast():
            stats = task.evaluate_batch(batch, model=model)
        _synchronize(device)
        forward_s += time.perf_counter() - t1
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v.detach().double()
    total_s = time.perf_counter() - t0
    if not sums:  # no readable image on this process
        zero = torch.zeros((), dtype=torch.float64, device=device)
        keys = getattr(task, "stat_keys", ("count", "loss_sum", "top1", "top5"))  # what evaluate_batch returns
        sums = {k: zero.clone() for k in keys}
    model.train(was_training)
    reduced = all_reduce_sum(sums)
    return task.summarize(reduced), {"images": float(reduced["count"]), "forward_s": forward_s, "total_s": total_s}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Trainer:
    """Fit a task on a training set, evaluating on a validation set, with checkpoints in ``run_dir``.

    Args:
        task: the task module (see module docstring); already on ``dist.device``.
        train_set / val_set: map-style data sets with ``set_epoch`` (``vrwkv.data.TransformedDataset``).
        batch_size: global batch per forward/backward pass (summed over processes).
        workers: DataLoader worker processes per process.
        collate_fn: batch builder (``vrwkv.data.collate_samples``).
        optim / schedule / run: engine config sections.
        run_dir: output folder (checkpoints, CSV, TensorBoard).
        config: plain-data config stored in every checkpoint (for resume / eval / predict).
        metric: name of the ``summarize`` metric that selects ``best.pt``.
        maximize: whether a higher ``metric`` is better (top-1) or a lower one (a reconstruction loss).
        channels_last: feed 4-D inputs in channels-last memory format (match a channels-last model).
        on_bad_image: ``"skip"`` (count and report) or ``"error"`` (stop with the file name).
        dist: process placement (single-process CPU by default).
    """

    def __init__(self, task: nn.Module, train_set: Any, val_set: Any, *, batch_size: int, workers: int,
                 collate_fn: Callable, optim: OptimConfig, schedule: ScheduleConfig, run: RunConfig,
                 run_dir: str | Path, config: dict[str, Any], metric: str = "top1", on_bad_image: str = "error",
                 channels_last: bool = False, dist: DistInfo | None = None, maximize: bool = True):
        self.dist = dist or DistInfo()
        if batch_size % self.dist.world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {self.dist.world_size} processes")
        if run.accum_steps < 1:
            raise ValueError(f"run.accum_steps must be >= 1, got {run.accum_steps}")
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.task, self.train_set, self.val_set = task, train_set, val_set
        self.batch_size, self.workers, self.collate_fn = batch_size, workers, collate_fn
        self.optim_cfg, self.schedule_cfg, self.run_cfg = optim, schedule, run
        self.run_dir = Path(run_dir)
        self.config = config
        self.metric = metric
        self.maximize = maximize
        self.on_bad_image = on_bad_image
        self.channels_last = channels_last
        self.device = self.dist.device
        self.model = task.model
        self.per_rank_batch = batch_size // self.dist.world_size
        self.sampler = ShardedSampler(len(train_set), self.dist.world_size, self.dist.rank, shuffle=True,
                                      seed=run.seed, global_batch=batch_size * run.accum_steps)
        self.batches_per_epoch = len(self.sampler) // self.per_rank_batch
        self.updates_per_epoch = self.batches_per_epoch // run.accum_steps
        if self.updates_per_epoch < 1:
            raise ValueError(f"the training set has {len(train_set)} samples, fewer than one optimizer batch of "
                             f"{batch_size * run.accum_steps}; lower data.batch_size or run.accum_steps")
        self.optimizer = build_optimizer(self.model, optim)
        self.scheduler = build_scheduler(self.optimizer, schedule, optim.lr, self.updates_per_epoch)
        self.amp_dtype = resolve_amp(run.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if run.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=run.ema_decay, use_warmup=run.ema_warmup)
        self.ddp_task: nn.Module = task
        if self.dist.enabled:
            self.ddp_task = nn.parallel.DistributedDataParallel(
                task, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.state = LoopState()
        self.seen_bad: set[str] = set()
        self.seen_small: set[str] = set()
        self.logger: RunLogger | None = None
        self.resumed_metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "loop": vars(self.state).copy(),
            "config": self.config,
        }

    def save(self, name: str = LAST_CHECKPOINT, metrics: dict[str, float] | None = None) -> None:
        """Collective: gathers every process's RNG state, then the main process writes ``run_dir/name``."""
        rng = all_gather_objects(capture_rng_state())
        if self.dist.is_main:
            ckpt = self.state_dict()
            ckpt["rng"] = rng
            ckpt["metrics"] = metrics or {}
            atomic_save(ckpt, self.run_dir / name)
        barrier()

    def load(self, path: str | Path) -> None:
        """Restore everything needed to continue exactly where ``path`` was written."""
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a training checkpoint of this library (format {ckpt.get('format')!r})")
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                logger.warning("checkpoint has no EMA weights; EMA restarts from the current weights")
                self.ema.set(self.model)
            else:
                self.ema.load_state_dict(ckpt["ema"])
        self.state = LoopState(**ckpt["loop"])
        self.resumed_metrics = dict(ckpt.get("metrics") or {})
        rng = ckpt["rng"]
        if len(rng) != self.dist.world_size:
            logger.warning(f"checkpoint was written by {len(rng)} processes, resuming with "
                           f"{self.dist.world_size}: RNG streams (drop-path, mixup) will differ")
        restore_rng_state(rng[self.dist.rank % len(rng)])
        self.scheduler.step_update(self.state.step)

    # ---------------------------------------------------------------- data
    def _loader(self, dataset: Any, sampler: torch.utils.data.Sampler, batch_size: int):
        return make_loader(dataset, sampler, batch_size, self.workers, self.collate_fn, self.device)

    def _check_batch(self, batch: dict[str, Any]) -> None:
        """Apply the bad-image policy to a batch's ``bad`` records; count upscaled small images."""
        for path, reason in batch.get("bad", []):
            if self.on_bad_image == "error":
                raise BadImageError(path, reason + " (use --on-bad-image skip to skip such files)")
            if path not in self.seen_bad:
                self.seen_bad.add(path)
                self.state.bad_images += 1
                logger.warning(f"skipping bad image {path}: {reason}")
        for path in batch.get("small", []):
            if path not in self.seen_small:
                self.seen_small.add(path)
                self.state.small_images += 1
                if self.state.small_images <= 5:
                    logger.warning(f"image {path} is smaller than the crop; it is upscaled")

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Metrics on the validation set, summed over all processes."""
        metrics, _ = evaluate_dataset(self.task, self.val_set, model=model, batch_size=self.per_rank_batch,
                                      workers=self.workers, collate_fn=self.collate_fn, device=self.device,
                                      amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                                      check_batch=self._check_batch, dist=self.dist)
        return metrics

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---------------------------------------------------------------- training
    def fit(self, resume_from: str | Path | None = None) -> dict[str, float]:
        """Train until ``schedule.epochs`` (or ``run.max_steps``); returns the last evaluation's metrics."""
        run, total_epochs = self.run_cfg, self.schedule_cfg.epochs
        if resume_from is not None:
            self.load(resume_from)
            logger.info(f"resumed from {resume_from} at epoch {self.state.epoch + 1}, step {self.state.step}")
        else:
            self.scheduler.step_update(0)
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=run.tensorboard,
                                resume_step=self.state.step if resume_from is not None else None)
        last_metrics: dict[str, float] = dict(self.resumed_metrics)
        if self.state.epoch >= total_epochs or self._reached_max_steps():
            logger.info(f"the run is already complete (epoch {self.state.epoch}/{total_epochs}, step "
                        f"{self.state.step}); raise schedule.epochs or run.max_steps to train further")
        try:
            while self.state.epoch < total_epochs and not self._reached_max_steps():
                train_metrics = self._train_epoch()
                if self.state.batch_in_epoch < self.batches_per_epoch:  # stopped by max_steps mid-epoch
                    position = round(self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch, 4)
                    last_metrics = self._end_of_period(position, train_metrics, evaluate=True)
                    break
                epoch = self.state.epoch + 1
                self.state.epoch, self.state.batch_in_epoch = epoch, 0
                evaluate = epoch % run.eval_every == 0 or epoch == total_epochs or self._reached_max_steps()
                last_metrics = self._end_of_period(epoch, train_metrics, evaluate)
        finally:
            self.logger.close()
        if self.state.bad_images:
            logger.warning(f"{self.state.bad_images} unreadable image(s) were skipped (listed above)")
        if self.state.small_images:
            logger.info(f"{self.state.small_images} image(s) smaller than the crop were upscaled")
        return last_metrics

    def _end_of_period(self, epoch: float, train_metrics: dict[str, float], evaluate: bool) -> dict[str, float]:
        """Evaluate (optionally), log the epoch row, save ``last.pt`` and, on a new best, ``best.pt``."""
        metrics = dict(train_metrics)
        if evaluate:
            metrics.update({f"val_{k}": v for k, v in self.evaluate().items() if k != "count"})
            if self.ema is not None:
                metrics.update({f"ema_val_{k}": v for k, v in self.evaluate(self.ema.module).items() if k != "count"})
        metrics["bad_images"] = float(self.state.bad_images)
        is_best = False
        if f"val_{self.metric}" in metrics:
            value = metrics[f"val_{self.metric}"]
            best = self.state.best_metric
            is_best = best is None or (value > best if self.maximize else value < best)
            if is_best:
                self.state.best_metric = value
        self.logger.log_epoch(epoch, self.state.step, metrics, self.schedule_cfg.epochs)
        self.save(LAST_CHECKPOINT, metrics)
        if is_best:
            self.save(BEST_CHECKPOINT, metrics)
        return metrics

    def _reached_max_steps(self) -> bool:
        return self.run_cfg.max_steps is not None and self.state.step >= self.run_cfg.max_steps

    def _train_epoch(self) -> dict[str, float]:
        run, accum = self.run_cfg, self.run_cfg.accum_steps
        epoch = self.state.epoch
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip_batches=self.state.batch_in_epoch)
        loader = self._loader(self.train_set, self.sampler, self.per_rank_batch)
        self.task.train()
        progress = None
        if self.dist.is_main and run.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.batches_per_epoch, initial=self.state.batch_in_epoch, unit="batch",
                            desc=f"epoch {epoch + 1}/{self.schedule_cfg.epochs}", dynamic_ncols=True, leave=False)
        loss_sum, loss_count, images, t0 = 0.0, 0, 0, time.perf_counter()
        window_loss, window_n, window_t0, window_images = 0.0, 0, time.perf_counter(), 0
        for batch in loader:
            if self.state.batch_in_epoch >= self.batches_per_epoch:
                break
            self._check_batch(batch)
            batch = move_to(batch, self.device, self.channels_last)
            final_micro = (self.state.batch_in_epoch + 1) % accum == 0
            sync = final_micro or not self.dist.enabled
            with (nullcontext() if sync else self.ddp_task.no_sync()):
                with self._autocast():
                    loss = self.ddp_task(batch)["loss"]
                flags = all_reduce_sum({"loss": loss.detach().float(),
                                        "nonfinite": (~torch.isfinite(loss.detach())).float()})
                if flags["nonfinite"] > 0:
                    raise NonFiniteLossError(
                        f"the training loss is {loss.item()} at epoch {epoch + 1}, step {self.state.step + 1}; "
                        f"stopped before applying it. Last good checkpoint: "
                        f"{self._last_checkpoint_description()}. Try a lower optim.lr or optim.clip_grad.")
                self.scaler.scale(loss / accum).backward()
            step_loss = float(flags["loss"]) / self.dist.world_size
            n_images = batch["image"].shape[0] * self.dist.world_size
            loss_sum, loss_count, images = loss_sum + step_loss, loss_count + 1, images + n_images
            window_loss, window_n, window_images = window_loss + step_loss, window_n + 1, window_images + n_images
            self.state.batch_in_epoch += 1
            if final_micro:
                self._optimizer_step()
                if self.dist.is_main and self.state.step % max(run.log_every, 1) == 0:
                    dt = time.perf_counter() - window_t0
                    self.logger.log_step(self.state.step, {"loss": window_loss / window_n, "lr": self._lr(),
                                                           "img_per_s": window_images / max(dt, 1e-9)})
                    window_loss, window_n, window_t0, window_images = 0.0, 0, time.perf_counter(), 0
                if run.ckpt_every and self.state.step % run.ckpt_every == 0 \
                        and self.state.batch_in_epoch < self.batches_per_epoch:
                    self.save(LAST_CHECKPOINT)
            if progress is not None:
                elapsed = time.perf_counter() - t0
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self._lr():.2e}",
                                     img_s=f"{images / max(elapsed, 1e-9):.0f}", refresh=False)
                progress.update(1)
            if self._reached_max_steps() and final_micro:
                break
        if progress is not None:
            progress.close()
        elapsed = time.perf_counter() - t0
        return {"train_loss": loss_sum / max(loss_count, 1), "lr": self._lr(),
                "train_img_per_s": images / max(elapsed, 1e-9), "epoch_time_s": elapsed}

    def _optimizer_step(self) -> None:
        clip = self.optim_cfg.clip_grad
        if clip is not None and clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(self.state.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _last_checkpoint_description(self) -> str:
        path = self.run_dir / LAST_CHECKPOINT
        return str(path) if path.exists() else "none written yet"


