"""Masked-autoencoder pre-training end to end: build the run from a preset, pre-train, draw reconstructions.

The library functions behind ``vrwkv pretrain-mae``. They combine the data pipeline (``vrwkv.data``, labels
unused), the task (``vrwkv.tasks.mae``) and the engine shared with classification (``Trainer``: resumable atomic
checkpoints, DDP, progress, CSV/TensorBoard logs, ``config.yaml``). Presets live in ``configs/mae/``.
Fine-tuning from the result is classification: ``vrwkv train --init-from RUN/last.pt``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vrwkv.data import DataConfig, TransformedDataset, build_datasets, build_transform, collate_samples
from vrwkv.engine.checkpoint import is_run_checkpoint, load_checkpoint
from vrwkv.engine.config import (PRESET_DIR, ModelConfig, OptimConfig, RunConfig, ScheduleConfig, config_from_preset,
                                 from_dict, list_presets, save_yaml, to_dict)
from vrwkv.engine.distributed import DistInfo, process_setup
from vrwkv.engine.loop import LAST_CHECKPOINT, Trainer, unwrap
from vrwkv.engine.run_dir import latest_run_dir, resolve_run_dir, saved_config, seed_all, set_deterministic
from vrwkv.tasks.mae import MAEConfig, MAETask

logger = logging.getLogger("vrwkv")

MAE_PRESET_DIR = PRESET_DIR / "mae"
DEFAULT_PRESET = "digits"
FIGURE_DIR = "reconstructions"

__all__ = ["MAEExperiment", "VisualizeConfig", "build_mae_model", "latest_run_dir", "list_mae_presets",
           "make_config", "pretrain", "save_reconstruction_figure", "visualize"]


@dataclass
class VisualizeConfig:
    """The reconstruction figure written at every evaluation (``run_dir/reconstructions/``)."""

    num_images: int = 8  # first images of the validation set; 0 = no figure
    seed: int = 0  # seed of the figure's masks (the same patches are hidden at every evaluation)


@dataclass
class MAEExperiment:
    """Everything that defines a pre-training run; saved as ``config.yaml`` next to its checkpoints.

    Defaults are the official recipe (spec §5): ``mae_vrwkv_base_patch16``, mask ratio 0.75, RandomResizedCrop
    (scale 0.2-1) + flip, effective batch 4096 (1024 x 4 accumulation), AdamW lr 2.4e-3 betas (0.9, 0.95), weight
    decay 0.05 on every parameter, no clipping, 800 epochs with 10 warm-up, cosine to 0.
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="mae_vrwkv_base_patch16"))
    data: DataConfig = field(default_factory=lambda: DataConfig(scale=(0.2, 1.0), auto_augment=None, re_prob=0.0))
    task: MAEConfig = field(default_factory=MAEConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2.4e-3, betas=(0.9, 0.95), clip_grad=None,
                                                                   wd_rule="all"))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=800, warmup_epochs=10,
                                                                            warmup_lr_ratio=0.0, min_lr_ratio=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(accum_steps=4))
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)


def list_mae_presets() -> list[str]:
    """Names of the bundled pre-training presets (``configs/mae/*.yaml``)."""
    return list_presets(MAE_PRESET_DIR)


def make_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> MAEExperiment:
    """Preset (bundled name or YAML path) + ``key=value`` overrides (``["task.mask_ratio=0.6", ...]``)."""
    return config_from_preset(MAEExperiment, preset, overrides, MAE_PRESET_DIR)


def build_mae_model(cfg: ModelConfig, img_size: int) -> nn.Module:
    """The masked autoencoder named by ``cfg`` for ``img_size`` inputs; ``cfg.checkpoint`` (an official MAE file, one
    of our pre-training checkpoints or a state dict) initialises it."""
    from vrwkv.models.mae import create_mae_model

    if cfg.init_from:
        raise ValueError("model.init_from initialises a classifier from an MAE encoder (vrwkv train); to start "
                         "pre-training from an MAE checkpoint use model.checkpoint")
    kwargs: dict[str, Any] = {"img_size": img_size}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    kwargs.update(cfg.kwargs)
    try:
        model = create_mae_model(cfg.name, checkpoint_path=cfg.checkpoint, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot build MAE model {cfg.name!r} with {kwargs}: {e}") from None
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ------------------------------------------------------------------------------------------------ figure
def _first_images(dataset: Any, n: int) -> torch.Tensor:
    """The first ``n`` readable images of a ``TransformedDataset`` (eval transform), stacked."""
    images = []
    for i in range(len(dataset)):
        if len(images) == n:
            break
        image = dataset[i][0]
        if image is not None:
            images.append(image)
    if not images:
        raise ValueError("no readable image to draw a reconstruction figure from")
    return torch.stack(images)


def save_reconstruction_figure(model: nn.Module, images: torch.Tensor, path: str | Path, *, mask_ratio: float,
                               mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0,
                               title: str = "") -> Path:
    """Draw original / masked / prediction / reconstruction (visible + predicted patches) rows for ``images``.

    Args:
        model: a :class:`~vrwkv.models.mae.MaskedAutoencoderVRWKV` (run in eval mode; its mode is restored).
        images: normalised images ``[N, C, H, W]``.
        path: PNG file to write (folders are created).
        mask_ratio: fraction of patches hidden.
        mean / std: the normalisation of ``images`` (to show them in pixel space).
        seed: seed of the masks.
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    images = images.to(device)
    was_training = model.training
    model.eval()
    try:
        out = model.reconstruct(images, mask_ratio, torch.Generator(device=device).manual_seed(seed))
    finally:
        model.train(was_training)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * s + m).clamp(0, 1).permute(0, 2, 3, 1).cpu()  # [N, H, W, C]

    hidden = out["mask"].permute(0, 2, 3, 1).cpu()  # [N, H, W, 1], 1 = hidden
    original = to_pixels(images)
    rows = {"original": original, "masked": original * (1 - hidden) + 0.5 * hidden,  # hidden patches grey
            "prediction": to_pixels(out["prediction"]), "reconstruction": to_pixels(out["reconstruction"])}
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 0.8, 1.3 * len(rows) + 0.4), squeeze=False)
    for r, (name, pics) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            pic = pics[c]
            ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray" if pic.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title or f"mask ratio {mask_ratio}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _PretrainTrainer(Trainer):
    """The shared ``Trainer`` that also writes a reconstruction figure after each evaluation of the model."""

    def __init__(self, *args: Any, figure_images: torch.Tensor | None, figure_kwargs: dict[str, Any],
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.figure_images = figure_images
        self.figure_kwargs = figure_kwargs

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        metrics = super().evaluate(model)
        if model is None and self.figure_images is not None and self.dist.is_main:  # not for the EMA weights
            name = f"epoch{self.state.epoch:04d}-step{self.state.step:07d}.png"
            title = f"step {self.state.step}, val loss {metrics['loss']:.4f}"
            save_reconstruction_figure(unwrap(self.model), self.figure_images, self.run_dir / FIGURE_DIR / name,
                                       title=title, **self.figure_kwargs)
        return metrics


# ------------------------------------------------------------------------------------------------ pre-train
def pretrain(cfg: MAEExperiment, *, preset: str = DEFAULT_PRESET, resume: str | Path | None = None,
             overrides_on_resume: list[str] | None = None) -> tuple[Path, dict[str, float]]:
    """Pre-train ``cfg`` (or continue the run in folder ``resume``); returns the run folder and the final metrics.

    Works single-process and under ``torchrun``, exactly as classification training. ``run.output_dir`` defaults
    to ``runs/mae-<preset>`` (``-1``, ``-2``... if taken). A resumed run uses its saved config (with
    ``overrides_on_resume``), including its device and thread count: those change the float rounding.
    """
    if resume is not None:
        cfg = saved_config(MAEExperiment, Path(resume), overrides_on_resume, extra_keys=("encoder",),
                           required_key="encoder", wrong_kind="an MAE pre-training run (use vrwkv train)")
    with process_setup(cfg.run.device, cfg.run.threads) as dist:
        return _pretrain(cfg, dist, preset, resume)


def default_output_dir(preset: str) -> Path:
    return Path(f"runs/mae-{Path(preset).stem}")


def _pretrain(cfg: MAEExperiment, dist: DistInfo, preset: str,
              resume: str | Path | None) -> tuple[Path, dict[str, float]]:
    run_dir, resume_ckpt = resolve_run_dir(cfg.run.output_dir, default_output_dir(preset), dist, resume)
    cfg.run.output_dir = str(run_dir)
    if cfg.visualize.num_images < 0:
        raise ValueError(f"visualize.num_images must be >= 0, got {cfg.visualize.num_images}")
    set_deterministic(cfg.run.deterministic)
    seed_all(cfg.run.seed)  # same initial weights on every process

    train_raw, val_raw, _ = build_datasets(cfg.data)
    train_set = TransformedDataset(train_raw, build_transform(cfg.data, True), seed=cfg.run.seed, replace_bad=True,
                                   min_size=cfg.data.img_size)
    val_set = TransformedDataset(val_raw, build_transform(cfg.data, False), seed=cfg.run.seed,
                                 min_size=cfg.data.img_size)
    model = build_mae_model(cfg.model, cfg.data.img_size).to(dist.device)
    task = MAETask(model, cfg.task).to(dist.device)
    # the encoder's architecture travels with the checkpoint, for `vrwkv train --init-from`
    config = {**to_dict(cfg), "encoder": to_dict(model.encoder_kwargs)}
    figure_images = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), run_dir / "config.yaml")
        n_enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask", "ln2")))
        n_all = sum(p.numel() for p in model.parameters())
        logger.info(f"{cfg.model.name} ({model.sparse_mode} sparse inputs): {n_all / 1e6:.2f}M parameters "
                    f"({n_enc / 1e6:.2f}M encoder) | mask ratio {cfg.task.mask_ratio} | data {cfg.data.dataset}: "
                    f"{len(train_raw)} train / {len(val_raw)} val images | {dist.world_size} process(es) on "
                    f"{dist.device} | run dir {run_dir}")
        if cfg.visualize.num_images:
            figure_images = _first_images(val_set, cfg.visualize.num_images)
    seed_all(cfg.run.seed + dist.rank)  # independent masking / drop-path streams per process
    figure_kwargs = dict(mask_ratio=cfg.task.mask_ratio, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                         seed=cfg.visualize.seed)
    trainer = _PretrainTrainer(task, train_set, val_set, batch_size=cfg.data.batch_size, workers=cfg.data.workers,
                               collate_fn=collate_samples, optim=cfg.optim, schedule=cfg.schedule, run=cfg.run,
                               run_dir=run_dir, config=config, metric="loss", maximize=False,
                               on_bad_image=cfg.data.on_bad_image, channels_last=cfg.model.channels_last, dist=dist,
                               figure_images=figure_images, figure_kwargs=figure_kwargs)
    metrics = trainer.fit(resume_from=resume_ckpt)
    if dist.is_main and trainer.state.best_metric is not None:
        logger.info(f"done: best val loss {trainer.state.best_metric:.4f} | checkpoint {run_dir / LAST_CHECKPOINT} | "
                    f"fine-tune with: vrwkv train --init-from {run_dir / LAST_CHECKPOINT}")
    return run_dir, metrics


# ------------------------------------------------------------------------------------------------ visualize
def visualize(checkpoint: str | Path, output: str | Path | None = None, *, cfg: MAEExperiment | None = None,
              dataset: str | None = None, num_images: int | None = None, device: torch.device | str = "cpu") -> Path:
    """Reconstruction figure of a checkpoint on the first validation images.

    Args:
        checkpoint: one of our pre-training checkpoints (its config gives the model and data), or any MAE
            checkpoint (official, state dict) together with ``cfg`` describing the model and data.
        output: PNG path (default: ``reconstruction.png`` beside the checkpoint).
        cfg: experiment config for checkpoints that carry none.
        dataset: ``"digits"`` or an ImageFolder root instead of the run's data set.
        num_images: images to draw (default: the config's ``visualize.num_images``, at least 1).
        device: where to run the model.

    Returns:
        The PNG path.
    """
    checkpoint = Path(checkpoint)
    try:
        ckpt = load_checkpoint(checkpoint)
    except ValueError:  # not ours (e.g. an official file with pickled args): the MAE loader below reads it
        ckpt = {}
    if is_run_checkpoint(ckpt):
        if "encoder" not in ckpt["config"]:
            raise ValueError(f"{checkpoint} is a classification checkpoint, not an MAE pre-training one")
        cfg = from_dict(MAEExperiment, {k: v for k, v in ckpt["config"].items() if k != "encoder"})
        cfg.model.checkpoint = None
        model = build_mae_model(cfg.model, cfg.data.img_size)
        model.load_state_dict(ckpt["model"])
    else:
        if cfg is None:
            raise ValueError(f"{checkpoint} is not one of our pre-training checkpoints: give the model config")
        cfg.model.checkpoint = str(checkpoint)
        model = build_mae_model(cfg.model, cfg.data.img_size)
    data = DataConfig(**{**vars(cfg.data), "on_bad_image": "skip"})
    if dataset is not None:
        data.dataset = dataset
    _, val_raw, _ = build_datasets(data)
    val_set = TransformedDataset(val_raw, build_transform(data, False), min_size=data.img_size)
    n = num_images if num_images is not None else max(cfg.visualize.num_images, 1)
    if n < 1:
        raise ValueError(f"the number of images must be >= 1, got {n}")
    images = _first_images(val_set, n)
    output = Path(output) if output is not None else checkpoint.parent / "reconstruction.png"
    return save_reconstruction_figure(model.to(device), images, output, mask_ratio=cfg.task.mask_ratio,
                                      mean=tuple(data.mean), std=tuple(data.std), seed=cfg.visualize.seed,
                                      title=f"{checkpoint.name}: {cfg.model.name}, mask ratio {cfg.task.mask_ratio}")
