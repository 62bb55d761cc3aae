"""Semantic segmentation end to end: build the run from a preset, train, evaluate (mIoU), predict masks.

The library functions behind ``vrwkv seg-train``, ``vrwkv seg-eval`` and ``vrwkv seg-predict``. They combine the
segmentation data (``vrwkv.data.segmentation``), the task (``vrwkv.tasks.segmentation``: UperNet on the
VRWKV-Adapter or a simple feature pyramid) and the engine shared with classification (``Trainer``: resumable
atomic checkpoints, DDP, progress, CSV/TensorBoard logs, ``config.yaml``, layer-wise lr decay). Presets live in
``configs/segmentation/``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vrwkv.data.segmentation import (ADE20KFolder, DigitScenes, SegmentationSamples, SegmentationTransform,
                                     collate_segmentation)
from vrwkv.engine.checkpoint import is_run_checkpoint, load_checkpoint
from vrwkv.engine.config import (PRESET_DIR, OptimConfig, RunConfig, ScheduleConfig, config_from_preset, from_dict,
                                 list_presets, save_yaml, to_dict)
from vrwkv.engine.distributed import DistInfo, broadcast_buffers, process_setup
from vrwkv.engine.loop import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, evaluate_dataset, resolve_amp
from vrwkv.engine.run_dir import latest_run_dir, resolve_run_dir, saved_config, seed_all, set_deterministic
from vrwkv.tasks.segmentation import SegmentationConfig, SegmentationTask, Segmentor

logger = logging.getLogger("vrwkv")

SEG_PRESET_DIR = PRESET_DIR / "segmentation"
DEFAULT_PRESET = "digit_scenes"

__all__ = ["SegDataConfig", "SegModelConfig", "SegmentationExperiment", "build_segmentor", "evaluate",
           "latest_run_dir", "load_segmentor", "make_config", "palette", "predict", "train"]


@dataclass
class SegModelConfig:
    """The network: a VRWKV backbone, a neck giving 4 maps (``adapter`` = official VRWKV-Adapter, ``simple`` =
    ViTDet pyramid) and the UperNet head. ``backbone`` is a key of ``vrwkv.models.adapter.ADAPTER_CONFIGS`` for
    the adapter, any registered VRWKV name for the simple pyramid; ``kwargs`` override its arguments."""

    backbone: str = "vrwkv_tiny"
    neck: str = "adapter"
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # initial weights: official seg/det or classification checkpoint
    channels: int = 512  # UperNet width
    aux_channels: int = 256  # auxiliary FCN width, 0 = none
    fpn_channels: int = 256  # simple pyramid output channels
    dropout: float = 0.1
    cls_init_std: float = 0.01  # classifiers' initial weight std (mmseg 0.01; see Segmentor)


@dataclass
class SegDataConfig:
    """``dataset``: ``"digit_scenes"`` (bundled) or an ADE20K-layout root. Official ADE20K: crop 512, short side 512
    at ratio 0.5-2, flip 0.5."""

    dataset: str = "digit_scenes"
    img_size: int = 512  # short side at scale ratio 1
    crop_size: int = 512
    ratio_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batch_size: int = 16
    eval_batch_size: int = 1  # >1 only for images of one size
    workers: int = 4
    num_classes: int = 150  # for folders (after reduce_zero_label)
    reduce_zero_label: bool = True
    train_split: str = "training"
    val_split: str = "validation"
    scenes_train: int = 1000  # digit scenes per split
    scenes_val: int = 200
    on_bad_image: str = "error"


@dataclass
class SegmentationExperiment:
    """Everything that defines a segmentation run; saved as ``config.yaml`` next to its checkpoints. Defaults
    follow the official UperNet recipe (spec §6.3) where it applies; the schedule is cosine to 0 (the official
    poly(1.0) is ``schedule.sched=poly``)."""

    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    task: SegmentationConfig = field(default_factory=SegmentationConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.2e-4, weight_decay=0.01, clip_grad=None,
                                                                   layer_decay=0.95))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(sched="cosine", epochs=100, warmup_epochs=1,
                                                                            warmup_lr_ratio=1e-6, min_lr_ratio=0.0))
    run: RunConfig = field(default_factory=RunConfig)


def list_seg_presets() -> list[str]:
    return list_presets(SEG_PRESET_DIR)


def make_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> SegmentationExperiment:
    """Preset (bundled name or YAML path) + ``key=value`` overrides."""
    return config_from_preset(SegmentationExperiment, preset, overrides, SEG_PRESET_DIR)


# ------------------------------------------------------------------------------------------------ data / model
def build_seg_datasets(cfg: SegDataConfig) -> tuple[Any, Any, list[str]]:
    """Raw (train, val) data sets of ``cfg.dataset`` and the class names."""
    if cfg.dataset == "digit_scenes":
        train = DigitScenes("train", cfg.img_size, cfg.scenes_train)
        return train, DigitScenes("val", cfg.img_size, cfg.scenes_val), list(train.classes)
    train = ADE20KFolder(cfg.dataset, cfg.train_split, cfg.reduce_zero_label, cfg.num_classes)
    val = ADE20KFolder(cfg.dataset, cfg.val_split, cfg.reduce_zero_label, cfg.num_classes)
    return train, val, list(train.classes)


def _transform(cfg: SegDataConfig, train: bool) -> SegmentationTransform:
    return SegmentationTransform(train, cfg.img_size, cfg.crop_size, tuple(cfg.ratio_range), cfg.hflip,
                                 tuple(cfg.mean), tuple(cfg.std))


def build_segmentor(cfg: SegModelConfig, num_classes: int, load_weights: bool = True) -> Segmentor:
    """UperNet on the configured backbone/neck; ``cfg.checkpoint`` (official dense-prediction or classification
    file) initialises the backbone, and the heads too if the file has fitting ``decode_head.*`` keys."""
    import vrwkv
    from vrwkv.models.adapter import SimpleFeaturePyramid, create_vrwkv_adapter

    rest: dict[str, torch.Tensor] = {}
    if cfg.neck == "adapter":
        backbone: nn.Module = create_vrwkv_adapter(cfg.backbone, **cfg.kwargs)
        if cfg.checkpoint and load_weights:
            rest = backbone.load_pretrained(cfg.checkpoint)
    elif cfg.neck == "simple":
        kwargs = dict(cfg.kwargs, num_classes=0)
        if cfg.checkpoint and load_weights:
            kwargs["checkpoint_path"] = cfg.checkpoint
        backbone = SimpleFeaturePyramid(vrwkv.create_model(cfg.backbone, **kwargs), cfg.fpn_channels)
    else:
        raise ValueError(f"model.neck must be 'adapter' or 'simple', got {cfg.neck!r}")
    model = Segmentor(backbone, num_classes, cfg.channels, cfg.aux_channels, dropout=cfg.dropout,
                      cls_init_std=cfg.cls_init_std)
    heads = {k: v for k, v in rest.items() if k.startswith(("decode_head.", "auxiliary_head."))}
    if heads:
        own = model.state_dict()
        fits = all(k in own and own[k].shape == v.shape for k, v in heads.items())
        if fits:
            model.load_state_dict(heads, strict=False)
            logger.info(f"loaded {len(heads)} head tensors from {cfg.checkpoint}")
        else:
            logger.info(f"heads of {cfg.checkpoint} do not fit (other classes/width); they keep their init")
    return model


# ------------------------------------------------------------------------------------------------ train
def train(cfg: SegmentationExperiment, *, preset: str = DEFAULT_PRESET, resume: str | Path | None = None,
          overrides_on_resume: list[str] | None = None) -> tuple[Path, dict[str, float]]:
    """Train ``cfg`` (or continue the run in folder ``resume``); returns the run folder and the final metrics."""
    if resume is not None:
        # the run continues with its saved config, device and thread count included (they change float rounding)
        cfg = saved_config(SegmentationExperiment, Path(resume), overrides_on_resume)
    with process_setup(cfg.run.device, cfg.run.threads) as dist:
        return _train(cfg, dist, preset, resume)


def _train(cfg: SegmentationExperiment, dist: DistInfo, preset: str,
           resume: str | Path | None) -> tuple[Path, dict[str, float]]:
    run_dir, resume_ckpt = resolve_run_dir(cfg.run.output_dir, f"runs/seg-{Path(preset).stem}", dist, resume)
    cfg.run.output_dir = str(run_dir)
    set_deterministic(cfg.run.deterministic)
    seed_all(cfg.run.seed)
    train_raw, val_raw, classes = build_seg_datasets(cfg.data)
    train_set = SegmentationSamples(train_raw, _transform(cfg.data, True), seed=cfg.run.seed, replace_bad=True)
    val_set = SegmentationSamples(val_raw, _transform(cfg.data, False), seed=cfg.run.seed)
    model = build_segmentor(cfg.model, len(classes), load_weights=resume is None)
    if dist.enabled and dist.device.type == "cuda":  # the official SyncBN (CUDA-only in torch)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dist.device)
    task = SegmentationTask(model, cfg.task).to(dist.device)
    config = {**to_dict(cfg), "classes": classes}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), run_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"UperNet + {cfg.model.backbone} ({cfg.model.neck}): {n_params / 1e6:.2f}M parameters | data "
                    f"{cfg.data.dataset}: {len(train_raw)} train / {len(val_raw)} val images, {len(classes)} "
                    f"classes | {dist.world_size} process(es) on {dist.device} | run dir {run_dir}")
    seed_all(cfg.run.seed + dist.rank)
    trainer = Trainer(task, train_set, val_set, batch_size=cfg.data.batch_size, workers=cfg.data.workers,
                      collate_fn=collate_segmentation, optim=cfg.optim, schedule=cfg.schedule, run=cfg.run,
                      run_dir=run_dir, config=config, metric="mIoU", on_bad_image=cfg.data.on_bad_image, dist=dist)
    trainer.evaluate = _eval_with_batch(trainer, cfg.data.eval_batch_size)  # type: ignore[method-assign]
    metrics = trainer.fit(resume_from=resume_ckpt)
    if dist.is_main and trainer.state.best_metric is not None:
        logger.info(f"done: best val mIoU {trainer.state.best_metric:.2f}% | checkpoints {run_dir / LAST_CHECKPOINT}, "
                    f"{run_dir / BEST_CHECKPOINT}")
    return run_dir, metrics


def _eval_with_batch(trainer: Trainer, eval_batch_size: int):
    """The trainer's evaluation with the segmentation eval batch size (images of different sizes need 1)."""
    def evaluate(model: nn.Module | None = None) -> dict[str, float]:
        if trainer.dist.enabled:  # without SyncBN every process has its own BatchNorm statistics: use the saved ones
            broadcast_buffers(model if model is not None else trainer.model)
        metrics, _ = evaluate_dataset(trainer.task, trainer.val_set, model=model,
                                      batch_size=max(1, eval_batch_size // trainer.dist.world_size),
                                      workers=trainer.workers, collate_fn=trainer.collate_fn, device=trainer.device,
                                      amp_dtype=trainer.amp_dtype, check_batch=trainer._check_batch,
                                      dist=trainer.dist)
        return metrics
    return evaluate


# ------------------------------------------------------------------------------------------------ eval / predict
@dataclass
class LoadedSegmentor:
    model: Segmentor
    classes: list[str]
    data: SegDataConfig
    cfg: SegmentationExperiment


def load_segmentor(checkpoint: str | Path, *, cfg: SegmentationExperiment | None = None, ema: bool = False,
                   device: torch.device | str = "cpu") -> LoadedSegmentor:
    """A segmentor from one of our run checkpoints, or from an official mmseg checkpoint built by ``cfg``
    (``cfg.model`` must describe it; ``cfg.data.num_classes`` classes)."""
    if not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    try:
        ckpt = load_checkpoint(checkpoint)
    except ValueError:
        ckpt = None
    if ckpt is not None and is_run_checkpoint(ckpt):
        saved = {k: v for k, v in ckpt["config"].items() if k != "classes"}
        run_cfg = from_dict(SegmentationExperiment, saved)
        classes = list(ckpt["config"]["classes"])
        model = build_segmentor(run_cfg.model, len(classes), load_weights=False)
        state = ckpt["model"]
        if ema:
            if ckpt.get("ema") is None:
                raise ValueError(f"{checkpoint} has no EMA weights")
            state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
        model.load_state_dict(state)
        return LoadedSegmentor(model.to(device).eval(), classes, run_cfg.data, run_cfg)
    if cfg is None:
        raise ValueError(f"{checkpoint} is not a vrwkv segmentation run checkpoint: give a preset describing it")
    model_cfg = SegModelConfig(**{**vars(cfg.model), "checkpoint": str(checkpoint)})
    classes = [f"class {i}" for i in range(cfg.data.num_classes)]
    model = build_segmentor(model_cfg, len(classes))
    return LoadedSegmentor(model.to(device).eval(), classes, cfg.data, cfg)


def evaluate(seg: LoadedSegmentor, dataset: str | None = None, *, slide_crop: int | None = None,
             slide_stride: int | None = None, batch_size: int | None = None, workers: int = 0,
             amp: str = "none") -> dict[str, float]:
    """mIoU / aAcc / mAcc / loss of ``seg`` on its validation split (or ``dataset``), optionally sliding-window."""
    device = next(seg.model.parameters()).device
    data = SegDataConfig(**vars(seg.data))
    if dataset is not None:
        data.dataset = dataset
    _, val_raw, classes = build_seg_datasets(data)
    if len(classes) != seg.model.num_classes:
        raise ValueError(f"the model has {seg.model.num_classes} classes, {data.dataset} has {len(classes)}")
    val_set = SegmentationSamples(val_raw, _transform(data, False))
    task = SegmentationTask(seg.model, SegmentationConfig(slide_crop=slide_crop, slide_stride=slide_stride))
    metrics, timing = evaluate_dataset(task, val_set, batch_size=batch_size or data.eval_batch_size, workers=workers,
                                       collate_fn=collate_segmentation, device=device,
                                       amp_dtype=resolve_amp(amp, device))
    metrics["img_per_s_model"] = timing["images"] / max(timing["forward_s"], 1e-9)
    return metrics


def palette(num_classes: int) -> np.ndarray:
    """``[K, 3]`` uint8 colours: black for class 0, then well-separated hues (deterministic)."""
    import colorsys

    colours = [(0, 0, 0)] + [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0))
                             for i in range(1, num_classes)]
    return np.array(colours[:num_classes], dtype=np.uint8)


@torch.no_grad()
def predict(seg: LoadedSegmentor, image_path: str | Path, out: str | Path, overlay: str | Path | None = None, *,
            slide_crop: int | None = None, slide_stride: int | None = None, alpha: float = 0.5) -> dict[str, Any]:
    """Segment one image file: writes the colour mask PNG ``out`` (and a blended ``overlay`` PNG).

    Returns ``{"classes": {name: pixel fraction}, "mask": path, "overlay": path | None}``.
    """
    from PIL import Image

    from vrwkv.data.image_folder import load_rgb

    image = load_rgb(image_path)
    tf = _transform(seg.data, False)
    x, _ = tf(image, Image.new("L", image.size))
    device = next(seg.model.parameters()).device
    logits = seg.model.inference(x[None].to(device), slide_crop, slide_stride)
    logits = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                             align_corners=False)
    pred = logits.argmax(1)[0].cpu().numpy()
    colours = palette(len(seg.classes))[pred]  # [h, w, 3]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(colours).save(out)
    if overlay is not None:
        blend = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * colours
        Image.fromarray(blend.round().astype(np.uint8)).save(overlay)
    counts = np.bincount(pred.ravel(), minlength=len(seg.classes)) / pred.size
    present = {seg.classes[i]: float(c) for i, c in enumerate(counts) if c > 0}
    return {"classes": dict(sorted(present.items(), key=lambda kv: -kv[1])), "mask": str(out),
            "overlay": str(overlay) if overlay else None}
