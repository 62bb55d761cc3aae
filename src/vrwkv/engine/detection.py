"""Object detection / instance segmentation end to end: build the run from a preset, train, evaluate (COCO AP),
draw predictions.

The library functions behind ``vrwkv det-train``, ``vrwkv det-eval`` and ``vrwkv det-predict``. They combine the
detection data (``vrwkv.data.detection``), the task (``vrwkv.tasks.detection``: torchvision's Mask R-CNN + FPN on
the VRWKV-Adapter or a simple feature pyramid) and the engine shared with the other tasks (``Trainer``: resumable
atomic checkpoints, DDP, progress, CSV/TensorBoard logs, ``config.yaml``, layer-wise lr decay). Evaluation gathers
every process's detections and scores them with pycocotools on the main process. Presets live in
``configs/detection/``.
"""
from __future__ import annotations

import colorsys
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vrwkv.data.detection import COCODetection, DetectionSamples, DigitDetectionScenes, collate_detection
from vrwkv.data.sampler import ShardedSampler
from vrwkv.engine.checkpoint import is_run_checkpoint, load_checkpoint
from vrwkv.engine.config import (PRESET_DIR, OptimConfig, RunConfig, ScheduleConfig, config_from_preset, from_dict,
                                 list_presets, save_yaml, to_dict)
from vrwkv.engine.distributed import DistInfo, all_gather_objects, broadcast_buffers, process_setup
from vrwkv.engine.loop import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, make_loader, move_to, resolve_amp
from vrwkv.engine.run_dir import latest_run_dir, resolve_run_dir, saved_config, seed_all, set_deterministic
from vrwkv.tasks.detection import DetectionTask, MaskRCNNConfig, VRWKVBackboneWithFPN, VRWKVMaskRCNN, coco_evaluate

logger = logging.getLogger("vrwkv")

DET_PRESET_DIR = PRESET_DIR / "detection"
DEFAULT_PRESET = "digit_scenes"
_EXTRA_KEYS = ("classes", "category_ids")  # stored beside the experiment in checkpoints

__all__ = ["DetDataConfig", "DetModelConfig", "DetectionExperiment", "LoadedDetector", "build_detector",
           "default_output_dir", "evaluate", "evaluate_detection", "latest_run_dir", "list_det_presets",
           "load_detector", "make_config", "predict", "train"]


@dataclass
class DetModelConfig:
    """The network: a VRWKV backbone, a neck giving 4 maps (``adapter`` = official VRWKV-Adapter with the detection
    feature addition, ``simple`` = ViTDet pyramid), torchvision's FPN and Mask R-CNN heads (``rcnn``).
    ``backbone`` is a key of ``vrwkv.models.adapter.ADAPTER_CONFIGS`` for the adapter, any registered VRWKV name for
    the simple pyramid; ``kwargs`` override its arguments."""

    backbone: str = "vrwkv_tiny"
    neck: str = "adapter"
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # backbone init: official det/seg checkpoint (its backbone.*) or a classifier
    rcnn: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)


@dataclass
class DetDataConfig:
    """``dataset``: ``"digit_scenes"`` (bundled) or a COCO root holding the image folders and annotation files
    named below (COCO 2017 layout by default)."""

    dataset: str = "digit_scenes"
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    hflip: float = 0.5
    batch_size: int = 16
    eval_batch_size: int = 8
    workers: int = 4
    img_size: int = 64  # digit scenes: side
    scenes_train: int = 1000  # digit scenes per split
    scenes_val: int = 200
    max_digits: int = 4
    on_bad_image: str = "error"


@dataclass
class DetectionExperiment:
    """Everything that defines a detection run; saved as ``config.yaml`` next to its checkpoints. Defaults follow
    the official Mask R-CNN 1x recipe for VRWKV-S/B/L (spec §6.3: AdamW lr 1e-4, wd 0.05, layer decay 0.85, no
    clipping, 12 epochs, 500-iteration warm-up); the schedule is cosine instead of steps at epochs 8 and 11,
    which the engine's scheduler options do not express."""

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.05, clip_grad=None,
                                                                   layer_decay=0.85))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        sched="cosine", epochs=12, warmup_epochs=0.1, warmup_lr_ratio=1e-3, min_lr_ratio=0.0))
    run: RunConfig = field(default_factory=RunConfig)


def list_det_presets() -> list[str]:
    """Names of the bundled detection presets (``configs/detection/*.yaml``)."""
    return list_presets(DET_PRESET_DIR)


def make_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> DetectionExperiment:
    """Preset (bundled name or YAML path) + ``key=value`` overrides."""
    return config_from_preset(DetectionExperiment, preset, overrides, DET_PRESET_DIR)


def default_output_dir(preset: str) -> Path:
    return Path(f"runs/det-{Path(preset).stem}")


# ------------------------------------------------------------------------------------------------ data / model
def build_det_datasets(cfg: DetDataConfig, train: bool = True) -> tuple[Any, Any]:
    """Raw (train or None, val) data sets of ``cfg.dataset`` (both expose ``classes``, ``category_ids`` and
    ``coco_dict()``)."""
    if cfg.dataset == "digit_scenes":
        tr = DigitDetectionScenes("train", cfg.img_size, cfg.scenes_train, cfg.max_digits) if train else None
        return tr, DigitDetectionScenes("val", cfg.img_size, cfg.scenes_val, cfg.max_digits)
    root = Path(cfg.dataset)
    if not root.is_dir():
        raise ValueError(f"data.dataset must be 'digit_scenes' or a COCO root folder; {root} does not exist")
    tr = COCODetection(root / cfg.train_images, root / cfg.train_annotations) if train else None
    return tr, COCODetection(root / cfg.val_images, root / cfg.val_annotations)


def build_detector(cfg: DetModelConfig, num_classes: int, load_weights: bool = True) -> VRWKVMaskRCNN:
    """Mask R-CNN (``num_classes`` = categories + background) on the configured backbone/neck; ``cfg.checkpoint``
    (official detection / segmentation or classification file) initialises the backbone (and adapter)."""
    import vrwkv
    from vrwkv.models.adapter import SimpleFeaturePyramid, create_vrwkv_adapter

    if cfg.neck == "adapter":
        body: nn.Module = create_vrwkv_adapter(cfg.backbone, **{"add_rwkv_feature": "detection", **cfg.kwargs})
        if cfg.checkpoint and load_weights:
            rest = body.load_pretrained(cfg.checkpoint)
            if rest:
                logger.info(f"{len(rest)} non-backbone tensors of {cfg.checkpoint} (mmdet neck/heads) are not used: "
                            f"the FPN and heads are torchvision's")
    elif cfg.neck == "simple":
        kwargs = dict(cfg.kwargs, num_classes=0)
        if cfg.checkpoint and load_weights:
            kwargs["checkpoint_path"] = cfg.checkpoint
        body = SimpleFeaturePyramid(vrwkv.create_model(cfg.backbone, **kwargs), cfg.rcnn.fpn_channels)
    else:
        raise ValueError(f"model.neck must be 'adapter' or 'simple', got {cfg.neck!r}")
    return VRWKVMaskRCNN(VRWKVBackboneWithFPN(body, cfg.rcnn.fpn_channels), num_classes, cfg.rcnn)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_detection(task: DetectionTask, dataset: DetectionSamples, gt: dict[str, Any],
                       category_ids: list[int], *, batch_size: int, workers: int, device: torch.device,
                       model: nn.Module | None = None, amp_dtype: torch.dtype | None = None,
                       check_batch: Callable[[dict], None] | None = None, dist: DistInfo | None = None,
                       progress: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """COCO box / mask AP of ``model`` (default ``task.model``) on ``dataset`` against the instances dict ``gt``.

    Each process predicts its shard; the detections are gathered and scored on the main process, whose metrics
    every process returns. Returns ``(metrics, timing)`` as ``vrwkv.engine.loop.evaluate_dataset``.
    """
    dist = dist or DistInfo(device=device)
    model = model if model is not None else task.model
    was_training = model.training
    model.eval()
    sampler = ShardedSampler(len(dataset), dist.world_size, dist.rank, shuffle=False)
    loader = make_loader(dataset, sampler, batch_size, workers, collate_detection, device)
    if progress and dist.is_main:
        from tqdm import tqdm

        loader = tqdm(loader, unit="batch", desc="eval", dynamic_ncols=True, leave=False)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    results: list[dict[str, Any]] = []
    images, forward_s, t0 = 0, 0.0, time.perf_counter()
    try:
        for batch in loader:
            if check_batch is not None:
                check_batch(batch)
            if batch["image"].numel() == 0:
                continue
            batch = move_to(batch, device)
            t1 = time.perf_counter()
            with autocast():
                results += task.predict_batch(batch, category_ids, model=model)
            forward_s += time.perf_counter() - t1
            images += batch["image"].shape[0]
    finally:
        model.train(was_training)
    total_s = time.perf_counter() - t0
    gathered = all_gather_objects((results, images))
    metrics = None
    if dist.is_main:
        metrics = coco_evaluate(gt, [r for rs, _ in gathered for r in rs])
        metrics["count"] = sum(n for _, n in gathered)
        metrics["detections"] = sum(len(rs) for rs, _ in gathered)
    metrics = all_gather_objects(metrics)[0]
    return metrics, {"images": float(metrics["count"]), "forward_s": forward_s, "total_s": total_s}


class _DetectionTrainer(Trainer):
    """The shared ``Trainer`` with COCO evaluation (detections gathered over processes, pycocotools)."""

    def __init__(self, *args: Any, gt: dict[str, Any], category_ids: list[int], eval_batch_size: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gt, self.category_ids, self.eval_batch_size = gt, category_ids, eval_batch_size

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        if self.dist.enabled:
            broadcast_buffers(model if model is not None else self.model)
        metrics, _ = evaluate_detection(self.task, self.val_set, self.gt, self.category_ids, model=model,
                                        batch_size=max(1, self.eval_batch_size // self.dist.world_size),
                                        workers=self.workers, device=self.device, amp_dtype=self.amp_dtype,
                                        check_batch=self._check_batch, dist=self.dist)
        if self.dist.is_main:
            which = "EMA " if model is not None else ""
            logger.info(f"{which}val box AP {metrics['box_AP']:.2f} (AP50 {metrics['box_AP50']:.2f}, AP75 "
                        f"{metrics['box_AP75']:.2f}) | mask AP {metrics['mask_AP']:.2f} (AP50 "
                        f"{metrics['mask_AP50']:.2f}, AP75 {metrics['mask_AP75']:.2f})")
        return metrics


# ------------------------------------------------------------------------------------------------ train
def train(cfg: DetectionExperiment, *, preset: str = DEFAULT_PRESET, resume: str | Path | None = None,
          overrides_on_resume: list[str] | None = None) -> tuple[Path, dict[str, float]]:
    """Train ``cfg`` (or continue the run in folder ``resume``); returns the run folder and the final metrics.

    Works single-process and under ``torchrun``, as classification training. A resumed run uses its saved config
    (with ``overrides_on_resume``), device and thread count included.
    """
    if resume is not None:
        cfg = saved_config(DetectionExperiment, Path(resume), overrides_on_resume, _EXTRA_KEYS,
                           required_key="category_ids", wrong_kind="a detection run (vrwkv det-train)")
    with process_setup(cfg.run.device, cfg.run.threads) as dist:
        return _train(cfg, dist, preset, resume)


def _train(cfg: DetectionExperiment, dist: DistInfo, preset: str,
           resume: str | Path | None) -> tuple[Path, dict[str, float]]:
    run_dir, resume_ckpt = resolve_run_dir(cfg.run.output_dir, default_output_dir(preset), dist, resume)
    cfg.run.output_dir = str(run_dir)
    set_deterministic(cfg.run.deterministic)
    seed_all(cfg.run.seed)  # same initial weights on every process
    train_raw, val_raw = build_det_datasets(cfg.data)
    if list(train_raw.category_ids) != list(val_raw.category_ids):
        raise ValueError(f"train and val categories differ: {train_raw.category_ids[:5]}... vs "
                         f"{val_raw.category_ids[:5]}...")
    classes, category_ids = list(train_raw.classes), list(train_raw.category_ids)
    train_set = DetectionSamples(train_raw, train=True, hflip=cfg.data.hflip, seed=cfg.run.seed, replace_bad=True)
    val_set = DetectionSamples(val_raw, train=False, seed=cfg.run.seed)
    model = build_detector(cfg.model, len(classes) + 1, load_weights=resume is None)
    if dist.enabled and dist.device.type == "cuda":  # the official SyncBN in the adapter (CUDA-only in torch)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dist.device)
    task = DetectionTask(model).to(dist.device)
    config = {**to_dict(cfg), "classes": classes, "category_ids": category_ids}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), run_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"Mask R-CNN + {cfg.model.backbone} ({cfg.model.neck}): {n_params / 1e6:.2f}M parameters | data "
                    f"{cfg.data.dataset}: {len(train_raw)} train / {len(val_raw)} val images, {len(classes)} "
                    f"categories | {dist.world_size} process(es) on {dist.device} | run dir {run_dir}")
    seed_all(cfg.run.seed + dist.rank)
    trainer = _DetectionTrainer(task, train_set, val_set, batch_size=cfg.data.batch_size, workers=cfg.data.workers,
                                collate_fn=collate_detection, optim=cfg.optim, schedule=cfg.schedule, run=cfg.run,
                                run_dir=run_dir, config=config, metric="box_AP", on_bad_image=cfg.data.on_bad_image,
                                dist=dist, gt=val_raw.coco_dict(), category_ids=category_ids,
                                eval_batch_size=cfg.data.eval_batch_size)
    metrics = trainer.fit(resume_from=resume_ckpt)
    if dist.is_main and trainer.state.best_metric is not None:
        logger.info(f"done: best val box AP {trainer.state.best_metric:.2f} | checkpoints {run_dir / LAST_CHECKPOINT}, "
                    f"{run_dir / BEST_CHECKPOINT}")
    return run_dir, metrics


# ------------------------------------------------------------------------------------------------ eval / predict
@dataclass
class LoadedDetector:
    """A detector ready for inference: the model, its category names / COCO ids and its run config."""

    model: VRWKVMaskRCNN
    classes: list[str]
    category_ids: list[int]
    cfg: DetectionExperiment


def load_detector(checkpoint: str | Path, *, ema: bool = False, device: torch.device | str = "cpu") -> LoadedDetector:
    """A detector from one of our ``det-train`` run checkpoints (``last.pt`` / ``best.pt``)."""
    if not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    try:
        ckpt = load_checkpoint(checkpoint)
    except ValueError:
        ckpt = None
    if ckpt is None or not is_run_checkpoint(ckpt) or "category_ids" not in ckpt["config"]:
        raise ValueError(f"{checkpoint} is not a vrwkv det-train checkpoint (official mmdet files initialise a run's "
                         f"backbone through model.checkpoint; their heads are not torchvision's)")
    cfg = from_dict(DetectionExperiment, {k: v for k, v in ckpt["config"].items() if k not in _EXTRA_KEYS})
    classes, category_ids = list(ckpt["config"]["classes"]), list(ckpt["config"]["category_ids"])
    model = build_detector(cfg.model, len(classes) + 1, load_weights=False)
    state = ckpt["model"]
    if ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"{checkpoint} has no EMA weights")
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
    model.load_state_dict(state)
    return LoadedDetector(model.to(device).eval(), classes, category_ids, cfg)


def evaluate(det: LoadedDetector, dataset: str | None = None, *, batch_size: int | None = None, workers: int = 0,
             amp: str = "none") -> dict[str, float]:
    """COCO box / mask AP of ``det`` on its validation split (or on ``dataset``: ``"digit_scenes"`` / a COCO root
    laid out as the run's config says), plus model throughput."""
    device = next(det.model.parameters()).device
    data = DetDataConfig(**vars(det.cfg.data))
    if dataset is not None:
        data.dataset = dataset
    _, val_raw = build_det_datasets(data, train=False)
    if list(val_raw.category_ids) != det.category_ids:
        raise ValueError(f"the model's category ids {det.category_ids[:5]}... differ from {data.dataset}'s "
                         f"{list(val_raw.category_ids)[:5]}...")
    val_set = DetectionSamples(val_raw, train=False)
    metrics, timing = evaluate_detection(DetectionTask(det.model), val_set, val_raw.coco_dict(), det.category_ids,
                                         batch_size=batch_size or data.eval_batch_size, workers=workers,
                                         device=device, amp_dtype=resolve_amp(amp, device))
    metrics["img_per_s_model"] = timing["images"] / max(timing["forward_s"], 1e-9)
    return metrics


def _colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated, deterministic colours."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 1.0)) for i in range(n)]


@torch.no_grad()
def predict(det: LoadedDetector, image_path: str | Path, out: str | Path, *, score_thresh: float = 0.5,
            mask_alpha: float = 0.5, scale: int = 1) -> list[dict[str, Any]]:
    """Detect objects in one image file and write it with masks, boxes, labels and scores drawn (PNG ``out``),
    enlarged ``scale`` times (pixel replication) so that labels stay legible on small images.

    Returns the kept detections: ``[{"label": name, "score", "box": [x1, y1, x2, y2]}, ...]`` by decreasing score,
    boxes in the original image's pixels.
    """
    import numpy as np
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from vrwkv.data.image_folder import load_rgb

    if not 0 <= score_thresh <= 1:
        raise ValueError(f"score threshold must be in [0, 1], got {score_thresh}")
    if scale < 1:
        raise ValueError(f"drawing scale must be >= 1, got {scale}")
    image = load_rgb(image_path)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, h, w] uint8
    device = next(det.model.parameters()).device
    (output,) = det.model([pixels.to(device).float() / 255.0])
    keep = output["scores"] >= score_thresh
    boxes, labels, scores = output["boxes"][keep].cpu(), output["labels"][keep].cpu(), output["scores"][keep].cpu()
    colours = _colours(len(det.classes))
    drawn = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # [3, h * scale, w * scale]
    if keep.any():
        masks = output["masks"][keep][:, 0].cpu() > 0.5  # [N, h, w]
        masks = masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        drawn = draw_segmentation_masks(drawn, masks, alpha=mask_alpha, colors=[colours[i - 1] for i in labels])
        names = [f"{det.classes[i - 1]} {s:.2f}" for i, s in zip(labels.tolist(), scores.tolist())]
        drawn = draw_bounding_boxes(drawn, boxes * scale, labels=names, colors=[colours[i - 1] for i in labels],
                                    width=max(1, scale // 2))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out)
    return [{"label": det.classes[i - 1], "score": float(s), "box": [round(v, 1) for v in b]}
            for i, s, b in zip(labels.tolist(), scores.tolist(), boxes.tolist())]
