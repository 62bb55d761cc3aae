"""Layer-depth ratios and channel ramps of the RWKV "fancy" initialisation (spec §1.7), shared by the mixers."""
from __future__ import annotations

from typing import Literal

import torch

InitMode = Literal["fancy", "local", "global"]
INIT_MODES: tuple[str, ...] = ("fancy", "local", "global")


def depth_ratios(layer_id: int, depth: int) -> tuple[float, float]:
    """``(r0, r1) = (l / (L - 1), 1 - l / L)``: r0 goes 0 -> 1 over the layers, r1 goes 1 -> ~0.

    A single-layer model gets ``r0 = 0`` (the official formula divides by zero there).
    """
    if not 0 <= layer_id < depth:
        raise ValueError(f"layer_id {layer_id} out of range for depth {depth}")
    r0 = layer_id / (depth - 1) if depth > 1 else 0.0
    r1 = 1.0 - layer_id / depth
    return r0, r1


def channel_ramp(param: torch.Tensor) -> torch.Tensor:
    """``c / C`` for c = 0..C-1, shaped like ``param`` ([C] or [1, 1, C]), on its device, in float32."""
    C = param.shape[-1]
    return (torch.arange(C, device=param.device, dtype=torch.float32) / C).view(param.shape)


def check_init_mode(init_mode: str) -> None:
    if init_mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {init_mode!r}")
