"""Model options shared by the tool subcommands (flops, erf, export, features); no heavy imports at module level."""
from __future__ import annotations

import argparse
from typing import Any


def add_model_options(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    """``--model-kwargs KEY=VALUE ...`` and, if ``checkpoint``, ``--checkpoint PATH``."""
    if checkpoint:
        p.add_argument("--checkpoint", help="weights: an official .pth, a safetensors file from `vrwkv convert`, "
                                            "a plain state dict or a `vrwkv train` checkpoint (default: random init)")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model constructor arguments, values parsed as YAML (e.g. wkv_mode=causal num_classes=10)")


def parse_kwargs(items: list[str], what: str = "--model-kwargs") -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values parsed as YAML scalars)."""
    import yaml

    from vrwkv.cli import CLIError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"{what}: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise CLIError(f"{what}: cannot parse the value of {key.strip()!r}: {raw!r}") from None
    return out


def build_model(name: str, checkpoint: str | None = None, kwargs: dict[str, Any] | None = None,
                device: str | None = None) -> Any:
    """A registered model with optional weights, as :class:`vrwkv.cli.CLIError` on any user error."""
    import torch

    import vrwkv
    from vrwkv.cli import CLIError

    try:
        model = vrwkv.create_model(name, checkpoint_path=checkpoint, **(kwargs or {}))
        if device is not None:
            model = model.to(torch.device(device))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        message = " ".join(str(e).split())  # one line
        raise CLIError(f"cannot build {name}{' from ' + checkpoint if checkpoint else ''}: {message}") from None
    return model.eval()


def native_size(model: Any) -> tuple[int, int]:
    """The (h, w) input size a VRWKV model was built for (its ``img_size``)."""
    return tuple(g * model.patch_size for g in model.grid_size)
