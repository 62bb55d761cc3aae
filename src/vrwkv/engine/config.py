"""Experiment configuration: dataclass sections ← YAML preset ← ``key=value`` command-line overrides.

Task-agnostic pieces live here (model, optimiser, schedule and run sections, and the dict/YAML/override
machinery, which works on any nested dataclass). A task composes its experiment config from these sections
and its own (see ``vrwkv.engine.classification.ClassificationExperiment``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Which network to build. ``kwargs`` go to the model constructor (e.g. ``embed_dim``, ``depth``)."""

    name: str = "vrwkv_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.0
    checkpoint: str | None = None  # initial weights: an official checkpoint or one of our run checkpoints
    init_from: str | None = None  # MAE checkpoint (ours or official) whose encoder initialises the backbone
    grad_checkpointing: bool = False
    channels_last: bool = False


@dataclass
class OptimConfig:
    """Optimiser (timm.optim). Defaults: the official recipe (spec §3.3), lr for a global batch of 1024."""

    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # only for momentum optimisers (sgd, ...)
    clip_grad: float | None = 5.0  # max global grad norm, None = off
    layer_decay: float | None = None  # layer-wise lr decay factor (e.g. 0.75 for fine-tuning), None = off
    # "official": no decay on normalisation layers and on biases, decay on everything else (incl. pos_embed,
    # spatial_decay/first, layer-scale gammas), as mmcls' paramwise_cfg; "timm": no decay on every 1-D
    # parameter and on the model's no_weight_decay() names; "all": decay on every parameter (official MAE).
    wd_rule: str = "official"


@dataclass
class ScheduleConfig:
    """Per-iteration learning-rate schedule (timm.scheduler): linear warm-up, then cosine to ``min_lr``."""

    sched: str = "cosine"
    epochs: int = 300
    warmup_epochs: float = 20
    warmup_lr_ratio: float = 1e-3  # warm-up starts at lr × this
    min_lr_ratio: float = 1e-2  # the cosine ends at lr × this


@dataclass
class RunConfig:
    """How the run executes: device, precision, accumulation, EMA, checkpoints, logging."""

    output_dir: str | None = None  # default: runs/<preset>[-N]
    seed: int = 0
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else mps, else cpu
    threads: int | None = None  # CPU threads per process (torch.set_num_threads); None = torch's default
    amp: str = "auto"  # auto (bf16 on GPUs that support it, else off) | none | bf16 | fp16
    accum_steps: int = 1
    ema: bool = False
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    deterministic: bool = False
    ckpt_every: int = 0  # also checkpoint every N optimizer steps (0: only at epoch ends)
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    log_every: int = 10  # optimizer steps between rows of steps.csv / TensorBoard points
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans all epochs)
    progress: bool = True
    tensorboard: bool = True


def to_dict(cfg: Any) -> Any:
    """A nested dataclass as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _check_value(path: str, value: Any, annotation: Any) -> Any:
    """Validate ``value`` against a (simple) field annotation, converting lists to tuples where needed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_value(path, value, opt)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if annotation is Any:
        return value
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_value(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from (partial) nested data; unknown keys and wrongly typed values raise ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {path + unknown[0]!r}; valid keys at this level: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = from_dict(hint, value, f"{path}{f.name}.")
        else:
            kwargs[f.name] = _check_value(path + f.name, value, hint)
    return cls(**kwargs)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``update`` wins); ``model.kwargs``-style free dicts merge key by key too."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["optim.lr=3e-4", "model.kwargs={depth: 4}"]`` → ``[(["optim", "lr"], 3e-4), ...]``.

    Values are parsed as YAML (numbers, booleans, ``null``, lists, mappings); other text stays a string.
    """
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key.split("."), value))
    return out


def apply_overrides(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in a copy of nested ``data``; a mapping value replaces the whole entry."""
    out = merge({}, data)
    for path, value in parse_overrides(items):
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def list_presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    """Names of the bundled presets (``src/vrwkv/configs/*.yaml``; another task's folder with ``preset_dir``)."""
    return sorted(p.stem for p in preset_dir.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error if the file is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must contain a mapping, got {type(data).__name__}")
    return data


def load_preset(name_or_path: str, preset_dir: Path = PRESET_DIR) -> dict[str, Any]:
    """A bundled preset by name (from ``preset_dir``), or a YAML file by path (which may name a ``preset:`` to
    start from)."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        data = load_yaml(name_or_path)
    elif name_or_path in list_presets(preset_dir):
        data = load_yaml(preset_dir / f"{name_or_path}.yaml")
    else:
        raise ValueError(f"unknown preset {name_or_path!r}; bundled presets: {', '.join(list_presets(preset_dir))}")
    base = data.pop("preset", None)
    return merge(load_preset(base, preset_dir), data) if base else data


def config_from_preset(cls: type[T], preset: str, overrides: list[str] | None = None,
                       preset_dir: Path = PRESET_DIR) -> T:
    """An experiment config of type ``cls``: a preset (bundled name in ``preset_dir`` or a YAML path) plus
    ``key=value`` overrides (``["optim.lr=3e-4", ...]``), checked field by field."""
    data = load_preset(preset, preset_dir)
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
