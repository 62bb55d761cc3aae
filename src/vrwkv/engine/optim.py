"""Optimiser and learning-rate schedule, assembled from timm (param groups, layer decay, cosine or poly + warm-up)."""
from __future__ import annotations

import torch
from torch import nn

from vrwkv.engine.config import OptimConfig, ScheduleConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def no_decay_names(model: nn.Module, rule: str) -> tuple[list[str], bool]:
    """Parameter names (fnmatch patterns) without weight decay, and whether all 1-D params are excluded too.

    ``"official"`` (mmcls ``norm_decay_mult=0, bias_decay_mult=0``): parameters of normalisation layers and every
    parameter named ``bias``; 1-D parameters such as ``spatial_decay`` or layer-scale gammas keep their decay.
    ``"timm"``: every 1-D parameter, plus the model's ``no_weight_decay()`` names. ``"all"``: none (decay on
    every parameter, as the official MAE pre-training).
    """
    if rule == "official":
        names = [f"{mod_name}.{p_name}" if mod_name else p_name
                 for mod_name, mod in model.named_modules() if isinstance(mod, _NORM_TYPES)
                 for p_name, _ in mod.named_parameters(recurse=False)]
        names += [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
        return names, False
    if rule == "all":  # the official MAE recipe: weight decay on every parameter
        return [], False
    if rule == "timm":
        extra = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        return sorted(extra), True
    raise ValueError(f"optim.wd_rule must be 'official', 'timm' or 'all', got {rule!r}")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm optimiser over weight-decay (and, with ``layer_decay``, per-layer lr-scale) parameter groups."""
    from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

    names, exclude_1d = no_decay_names(model, cfg.wd_rule)
    if cfg.layer_decay is not None:
        if not 0 < cfg.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {cfg.layer_decay}")
        groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=names,
                                          weight_decay_exclude_1d=exclude_1d, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay,
                                           weight_decay_exclude_1d=exclude_1d, no_weight_decay_list=names)
    kwargs = {}
    if cfg.opt.lower() in ("adamw", "adam", "nadamw", "lamb", "adan"):
        kwargs.update(betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **kwargs)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"cannot create optimizer {cfg.opt!r}: {e}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, lr: float, updates_per_epoch: int):
    """A timm scheduler stepped per optimizer update (``scheduler.step_update(num_updates)``); ``poly`` decays
    linearly to ``min_lr`` (mmseg's poly with power 1.0)."""
    from timm.scheduler import create_scheduler_v2

    if cfg.epochs < 1:
        raise ValueError(f"schedule.epochs must be >= 1, got {cfg.epochs}")
    if updates_per_epoch < 1:
        raise ValueError("an epoch has no optimizer step: the data set is smaller than one (accumulated) batch")
    # "poly" is mmseg's poly(power 1.0), the official segmentation schedule; timm reads the power from decay_rate
    extra = {"decay_rate": 1.0} if cfg.sched == "poly" else {}
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=lr * cfg.warmup_lr_ratio, min_lr=lr * cfg.min_lr_ratio, step_on_epochs=False,
            updates_per_epoch=updates_per_epoch, **extra)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"cannot create lr schedule {cfg.sched!r}: {e}") from None
    if scheduler is None:
        raise ValueError(f"unknown lr schedule {cfg.sched!r}")
    return scheduler
