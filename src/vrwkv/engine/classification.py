"""Image classification end to end: build the experiment from a preset, train, evaluate, predict.

These are the library functions behind ``vrwkv train``, ``vrwkv eval`` and ``vrwkv predict``; they combine the
data pipeline (``vrwkv.data``), the task (``vrwkv.tasks.classification``) and the shared engine (``Trainer``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vrwkv.data import DataConfig, TransformedDataset, build_datasets, build_transform, collate_samples, load_rgb
from vrwkv.engine.checkpoint import is_run_checkpoint, load_checkpoint
from vrwkv.engine.config import (ModelConfig, OptimConfig, RunConfig, ScheduleConfig, config_from_preset, from_dict,
                                 save_yaml, to_dict)
from vrwkv.engine.distributed import DistInfo, process_setup
from vrwkv.engine.loop import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, evaluate_dataset, resolve_amp
from vrwkv.engine.run_dir import latest_run_dir  # noqa: F401  (re-exported: vrwkv train --resume)
from vrwkv.engine.run_dir import resolve_run_dir, saved_config, seed_all, set_deterministic
from vrwkv.tasks.classification import ClassificationConfig, ClassificationTask

logger = logging.getLogger("vrwkv")

DEFAULT_PRESET = "digits"


@dataclass
class ClassificationExperiment:
    """Everything that defines a classification run; saved as ``config.yaml`` next to its checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: ClassificationConfig = field(default_factory=ClassificationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


def make_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> ClassificationExperiment:
    """Preset (bundled name or YAML path) + ``key=value`` overrides (``["optim.lr=3e-4", ...]``)."""
    return config_from_preset(ClassificationExperiment, preset, overrides)


# ------------------------------------------------------------------------------------------------ model
def _create(name: str, **kwargs: Any) -> nn.Module:
    """Our models through ``vrwkv.create_model`` (official checkpoint conversion), any other through timm."""
    import timm

    import vrwkv

    ours = getattr(vrwkv, "list_models", None)
    if ours is not None and name.split(".")[0] in set(ours()):
        return vrwkv.create_model(name, **kwargs)
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown model {name!r}; see vrwkv.list_models() and timm.list_models()")
    return timm.create_model(name, **kwargs)


def build_model(cfg: ModelConfig, num_classes: int, img_size: int | None = None) -> nn.Module:
    """Any registered model (VRWKV or timm) with ``num_classes`` outputs, sized for ``img_size`` inputs.

    ``img_size`` / ``drop_path_rate`` are passed only to models that accept them (ViT-like models do, most CNNs
    do not take ``img_size``). ``cfg.checkpoint`` initialises the weights: one of our run checkpoints (its
    ``model`` weights; a classifier head of a different size is left freshly initialised) or any file the model
    factory converts (official VRWKV checkpoints, timm weights). ``cfg.init_from`` then loads the encoder of an MAE
    checkpoint into the backbone (fine-tuning; see ``vrwkv.models.mae.load_mae_encoder``).
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    kwargs.update(cfg.kwargs)
    ckpt = None
    if cfg.checkpoint:
        ckpt = read_run_checkpoint(cfg.checkpoint)
        if ckpt is None:
            kwargs["checkpoint_path"] = cfg.checkpoint
    while True:
        try:
            model = _create(cfg.name, **kwargs)
            break
        except TypeError as e:  # drop optional size arguments the architecture does not take
            dropped = next((k for k in ("img_size", "drop_path_rate") if k in kwargs and k in str(e)
                            and k not in cfg.kwargs), None)
            if dropped is None:
                raise ValueError(f"cannot build model {cfg.name!r} with {kwargs}: {e}") from None
            kwargs.pop(dropped)
    if ckpt is not None:
        state = ckpt["model"]
        own = model.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        for k in mismatched:
            state.pop(k)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(mismatched):
            raise ValueError(f"{cfg.checkpoint} does not fit model {cfg.name!r}: missing {list(missing)[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
        if mismatched:
            logger.info(f"re-initialised {mismatched} (shape differs from {cfg.checkpoint})")
    if cfg.init_from:
        from vrwkv.models.mae import load_mae_encoder

        load_mae_encoder(model, cfg.init_from)  # raises a ValueError if the classifier is not a fitting VRWKV
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"model {cfg.name!r} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def read_run_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """One of our training checkpoints, or None for any other file (official / timm weights, which the model
    factory converts). A missing file raises ValueError."""
    if not Path(path).is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        ckpt = load_checkpoint(path)
    except ValueError:  # not loadable with weights_only: not ours; the model factory reports on it
        return None
    return ckpt if is_run_checkpoint(ckpt) else None


# ------------------------------------------------------------------------------------------------ train
def train(cfg: ClassificationExperiment, *, preset: str = DEFAULT_PRESET, resume: str | Path | None = None,
          overrides_on_resume: list[str] | None = None) -> tuple[Path, dict[str, float]]:
    """Train ``cfg`` (or continue the run in folder ``resume``); returns the run folder and the final metrics.

    Works single-process and under ``torchrun`` (one process per device; gloo on CPU, nccl on CUDA). Only the
    main process writes. ``run.output_dir`` defaults to ``runs/<preset>`` (``-1``, ``-2``... if taken).
    """
    if resume is not None:
        # the run continues with its saved config, device and thread count included (they change float rounding)
        cfg = saved_config(ClassificationExperiment, Path(resume), overrides_on_resume)
    with process_setup(cfg.run.device, cfg.run.threads) as dist:
        return _train(cfg, dist, preset, resume)


def _train(cfg: ClassificationExperiment, dist: DistInfo, preset: str,
           resume: str | Path | None) -> tuple[Path, dict[str, float]]:
    run_dir, resume_ckpt = resolve_run_dir(cfg.run.output_dir, f"runs/{Path(preset).stem}", dist, resume)
    cfg.run.output_dir = str(run_dir)
    set_deterministic(cfg.run.deterministic)
    seed_all(cfg.run.seed)  # same initial weights on every process

    train_raw, val_raw, classes = build_datasets(cfg.data)
    train_set = TransformedDataset(train_raw, build_transform(cfg.data, True), seed=cfg.run.seed, replace_bad=True,
                                   min_size=cfg.data.img_size)
    val_set = TransformedDataset(val_raw, build_transform(cfg.data, False), seed=cfg.run.seed,
                                 min_size=cfg.data.img_size)
    model = build_model(cfg.model, len(classes), cfg.data.img_size).to(dist.device)
    task = ClassificationTask(model, len(classes), cfg.task).to(dist.device)
    config = {**to_dict(cfg), "classes": list(classes)}
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), run_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"{cfg.model.name}: {n_params / 1e6:.2f}M parameters | data {cfg.data.dataset}: "
                    f"{len(train_raw)} train / {len(val_raw)} val images, {len(classes)} classes | "
                    f"{dist.world_size} process(es) on {dist.device} | run dir {run_dir}")
    seed_all(cfg.run.seed + dist.rank)  # independent drop-path / mixup streams per process
    trainer = Trainer(task, train_set, val_set, batch_size=cfg.data.batch_size, workers=cfg.data.workers,
                      collate_fn=collate_samples, optim=cfg.optim, schedule=cfg.schedule, run=cfg.run,
                      run_dir=run_dir, config=config, metric="top1", on_bad_image=cfg.data.on_bad_image,
                      channels_last=cfg.model.channels_last, dist=dist)
    metrics = trainer.fit(resume_from=resume_ckpt)
    if dist.is_main and trainer.state.best_metric is not None:
        logger.info(f"done: best val top-1 {trainer.state.best_metric:.2f}% | checkpoints {run_dir / LAST_CHECKPOINT}"
                    f", {run_dir / BEST_CHECKPOINT}")
    return run_dir, metrics


# ------------------------------------------------------------------------------------------------ eval / predict
@dataclass
class LoadedClassifier:
    """A classifier ready for inference: the model, its class names and its eval-time data settings."""

    model: nn.Module
    classes: list[str]  # display names, in class-index order
    data: DataConfig
    name: str
    folder_names: list[str] | None = None  # class-folder names in index order (ImageNet synsets); default: classes


def load_classifier(checkpoint: str | None = None, model_name: str | None = None, *, ema: bool = False,
                    device: torch.device | str = "cpu", num_classes: int | None = None) -> LoadedClassifier:
    """A trained classifier from one of our run checkpoints, an official checkpoint (``model_name`` needed) or a
    registered model name alone (random or default weights)."""
    ckpt = read_run_checkpoint(checkpoint) if checkpoint else None
    if ckpt is not None:
        saved = {k: v for k, v in ckpt["config"].items() if k != "classes"}
        cfg = from_dict(ClassificationExperiment, saved)
        classes = list(ckpt["config"]["classes"])
        model_cfg = ModelConfig(name=cfg.model.name, kwargs=cfg.model.kwargs)
        model = build_model(model_cfg, len(classes), cfg.data.img_size)
        state = ckpt["model"]
        if ema:
            if ckpt.get("ema") is None:
                raise ValueError(f"{checkpoint} has no EMA weights (trained without run.ema=true)")
            state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
        model.load_state_dict(state)
        name, data = cfg.model.name, cfg.data
    else:
        if model_name is None:
            raise ValueError(f"{checkpoint} is not a vrwkv training checkpoint: also give the model name (--model)")
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if checkpoint:
            kwargs["checkpoint_path"] = checkpoint
        model = _create(model_name, **kwargs)
        n = model.num_classes if hasattr(model, "num_classes") else num_classes
        folders = None
        if n == 1000:  # ImageNet-1k: synset folders (n01440764, ...) and readable names from timm
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            classes, folders = list(info.label_descriptions()), list(info.label_names())
        else:
            classes = [str(i) for i in range(n or 0)]
        clf = LoadedClassifier(model.to(device).eval(), classes, data_config_for(model), model_name, folders)
        return clf
    return LoadedClassifier(model.to(device).eval(), classes, data, name)


def data_config_for(model: nn.Module) -> DataConfig:
    """Eval settings (input size, crop, mean/std, interpolation) from a model's pretrained config."""
    from timm.data import resolve_data_config

    d = resolve_data_config({}, model=model)
    return DataConfig(img_size=int(d["input_size"][-1]), crop_pct=float(d["crop_pct"]),
                      interpolation=str(d["interpolation"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


def evaluate(classifier: LoadedClassifier, dataset: str | None = None, *, split: str | None = None,
             batch_size: int = 64, workers: int = 0, on_bad_image: str = "error", amp: str = "none",
             progress: bool = False) -> dict[str, float]:
    """Top-1 / top-5 / loss and throughput of ``classifier`` on a data set (default: the one it was trained on).

    ``dataset`` is ``"digits"`` or an ImageFolder root; ``split`` defaults to the config's val split.
    """
    device = next(classifier.model.parameters()).device
    data = DataConfig(**{**vars(classifier.data), "on_bad_image": on_bad_image})
    if dataset is not None:
        data.dataset = dataset
    if split is not None:
        data.val_split = split
    val_raw = build_eval_dataset(data, classifier.folder_names or classifier.classes)
    val_set = TransformedDataset(val_raw, build_transform(data, False), min_size=data.img_size)
    task = ClassificationTask(classifier.model, len(classifier.classes), ClassificationConfig(label_smoothing=0))
    bad: list[str] = []

    def check(batch: dict) -> None:
        for path, reason in batch["bad"]:
            if on_bad_image == "error":
                from vrwkv.data import BadImageError

                raise BadImageError(path, reason + " (use --on-bad-image skip to skip such files)")
            logger.warning(f"skipping bad image {path}: {reason}")
            bad.append(path)

    metrics, timing = evaluate_dataset(task, val_set, batch_size=batch_size, workers=workers,
                                       collate_fn=collate_samples, device=device, amp_dtype=resolve_amp(amp, device),
                                       check_batch=check, progress=progress)
    metrics["bad_images"] = len(bad)
    metrics["img_per_s_model"] = timing["images"] / max(timing["forward_s"], 1e-9)
    metrics["img_per_s_total"] = timing["images"] / max(timing["total_s"], 1e-9)
    return metrics


def build_eval_dataset(data: DataConfig, folder_names: list[str]) -> Any:
    """The evaluation split, with class indices aligned to the classifier's classes (``folder_names`` in index
    order). An ImageFolder split may hold any subset of those class folders (e.g. a few ImageNet synsets)."""
    from vrwkv.data import DigitsDataset, ImageFolderDataset

    if data.dataset == "digits":
        val = DigitsDataset("val", data.img_size)
        if len(folder_names) != len(val.classes):
            raise ValueError(f"the classifier has {len(folder_names)} classes, digits has 10")
        return val
    split_dir = Path(data.dataset) / data.val_split
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []
    unknown = sorted(set(found) - set(folder_names))
    if unknown:
        raise ValueError(f"{split_dir} has class folders the classifier does not know: {unknown[:5]} (its classes "
                         f"are e.g. {folder_names[:3]})")
    return ImageFolderDataset(data.dataset, data.val_split, classes=folder_names, on_bad_image=data.on_bad_image)


@torch.no_grad()
def predict(classifier: LoadedClassifier, images: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each image file (any format/mode Pillow reads)."""
    transform = build_transform(classifier.data, False)
    device = next(classifier.model.parameters()).device
    batch = torch.stack([transform(load_rgb(p)) for p in images]).to(device)
    probs = classifier.model(batch).float().softmax(dim=-1)
    k = min(topk, probs.shape[-1])
    top = probs.topk(k, dim=-1)
    return [[(classifier.classes[i] if i < len(classifier.classes) else str(i), float(p))
             for p, i in zip(ps.tolist(), idx.tolist())] for ps, idx in zip(top.values, top.indices)]
