"""``create_model``: timm's factory restricted to our models, with official checkpoint files as ``checkpoint_path``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from vrwkv.models._registry import is_model, list_models


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build one of our registered models (e.g. ``"vrwkv_tiny"``), optionally with weights.

    Args:
        model_name: registered name, optionally with a pretrained tag (``"vrwkv_large.in22k"``).
        pretrained: download and load the weights of the pretrained cfg (official URLs).
        checkpoint_path: load this file instead: an official mmcls/InternImage ``.pth``, a plain state dict, or our
            safetensors. The official layouts are converted and ``pos_embed`` is resized to the model's grid.
        **kwargs: model arguments (``num_classes``, ``img_size``, ``drop_path_rate``, ``features_only``, ...).

    Raises:
        ValueError: unknown model name, or a checkpoint that does not fit the model (the message lists the
            missing/unexpected keys and shape mismatches).
        FileNotFoundError: ``checkpoint_path`` does not exist.
    """
    if not is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(list_models())}")
    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["file"] = str(checkpoint_path)
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
