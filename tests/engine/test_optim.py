import math

import pytest
import torch
from torch import nn

from vrwkv.engine.config import OptimConfig, ScheduleConfig
from vrwkv.engine.optim import build_optimizer, build_scheduler


class Toy(nn.Module):
    """Parameter kinds of a VRWKV block: Linear weight/bias, LayerNorm, 1-D spatial_decay, layer-scale gamma."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module() for _ in range(2)])
        for b in self.blocks:
            b.ln1 = nn.LayerNorm(4)
            b.key = nn.Linear(4, 4)
            b.spatial_decay = nn.Parameter(torch.zeros(4))
            b.gamma1 = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 2)

    def group_matcher(self, coarse=False):
        return {"stem": r"^$", "blocks": [(r"^blocks\.(\d+)", None)]}


def _decay_of(opt, model):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_official_rule_decays_1d_vrwkv_params_but_not_norms_or_biases():
    model = Toy()
    decay = _decay_of(build_optimizer(model, OptimConfig(weight_decay=0.05)), model)
    assert decay["blocks.0.spatial_decay"] == 0.05 and decay["blocks.1.gamma1"] == 0.05
    assert decay["blocks.0.key.weight"] == 0.05 and decay["head.weight"] == 0.05
    assert decay["blocks.0.ln1.weight"] == 0 and decay["blocks.0.ln1.bias"] == 0 and decay["head.bias"] == 0
    timm_rule = _decay_of(build_optimizer(model, OptimConfig(wd_rule="timm")), model)
    assert timm_rule["blocks.0.spatial_decay"] == 0 and timm_rule["blocks.0.key.weight"] == 0.05
    with pytest.raises(ValueError, match="wd_rule"):
        build_optimizer(model, OptimConfig(wd_rule="other"))


def test_layer_decay_scales_lr_by_depth():
    model = Toy()
    opt = build_optimizer(model, OptimConfig(layer_decay=0.5))
    ids = {id(p): n for n, p in model.named_parameters()}
    scale = {ids[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale["head.weight"] == 1.0
    assert scale["blocks.1.key.weight"] == 0.5 and scale["blocks.0.key.weight"] == 0.25


def test_cosine_schedule_with_warmup_per_iteration():
    model = Toy()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, ScheduleConfig(epochs=10, warmup_epochs=2, warmup_lr_ratio=1e-3,
                                                min_lr_ratio=1e-2), 1e-3, updates_per_epoch=5)
    lrs = []
    for t in range(51):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    cosine_10 = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 10 / 50))  # cosine spans warm-up too
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(cosine_10)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear ramp up
    assert all(a >= b for a, b in zip(lrs[10:50], lrs[11:51])) and lrs[50] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="smaller than one"):
        build_scheduler(opt, ScheduleConfig(), 1e-3, updates_per_epoch=0)
