"""Public Bi-WKV entry point (implementation being written)."""
from __future__ import annotations

import torch


def bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str = "paper") -> torch.Tensor:
    """Bi-WKV over [B, T, C] keys/values; w, u are [C] and already divided by T. Returns [B, T, C]."""
    from vrwkv.ops.wkv.reference import reference_bi_wkv

    return reference_bi_wkv(k, v, w, u, semantics=semantics).to(k.dtype)
