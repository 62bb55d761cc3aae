"""Reading checkpoint files safely and converting the official Vision-RWKV key layouts to ours (spec §8).

Recognised files:

* mmcls ``.pth`` (T/S/B): ``{'meta', 'state_dict', ['optimizer']}`` with ``backbone.*`` and ``head.fc.*`` keys;
* the InternImage-trainer file of VRWKV-L: ``{'state_dict' | 'model', 'optimizer', ..., 'config', ['model_ema']}``
  with ``backbone.*`` and ``head.0.*`` / ``head.2.*`` keys; its ``config`` is a pickled yacs ``CfgNode``;
* plain state dicts in either naming (also with a ``module.`` prefix from DistributedDataParallel);
* our own safetensors files (``vrwkv convert``), whose metadata records the position-embedding grid.

Everything is read without executing code from the file: ``torch.load(weights_only=True)`` with an allow-list that
adds only an inert stand-in for ``yacs.config.CfgNode`` (it unpickles into an ``OrderedDict``) and numpy scalars
(mmcv stores metric values in ``meta``), or ``safetensors``.
"""
from __future__ import annotations

import collections
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

_logger = logging.getLogger(__name__)

#: ``format`` entry of the metadata of our safetensors files.
SAFETENSORS_FORMAT = "vrwkv"


class _InertCfgNode:
    """Allow-listed under the name ``yacs.config.CfgNode``: unpickling creates a plain ``OrderedDict`` instead.

    The weights-only unpickler fills dict items only into real dict types, and sets the node's attributes
    (``__immutable__`` etc.) into the OrderedDict's ``__dict__``; no yacs code is imported or run.
    """

    def __new__(cls, *args):
        return collections.OrderedDict()


def _safe_globals() -> list:
    allowed: list = [(_InertCfgNode, "yacs.config.CfgNode")]
    try:
        import numpy as np
    except ImportError:  # numpy is optional for loading
        return allowed
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += sorted({type(np.dtype(c)) for c in "?bhilqBHILQefdFD"}, key=str)  # numeric dtype classes only
    return allowed


def is_safetensors_file(path: str | Path) -> bool:
    """True if the file starts with a safetensors header (8-byte little-endian length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < Path(path).stat().st_size


@dataclass
class Checkpoint:
    """A state dict read from a file, before key conversion.

    Attributes:
        state_dict: name -> tensor as stored.
        container: where it came from: ``"safetensors"``, ``"state_dict"``, ``"model"``, ``"model_ema"`` or
            ``"plain"`` (the file itself is the state dict).
        metadata: safetensors metadata (str -> str), empty for torch files.
    """

    state_dict: dict[str, torch.Tensor]
    container: str
    metadata: dict[str, str] = field(default_factory=dict)


def read_checkpoint(path: str | Path, use_ema: bool = False) -> Checkpoint:
    """Read the state dict of a checkpoint file without executing code from it.

    Args:
        path: ``.pth``/``.pt`` (torch) or safetensors file.
        use_ema: take the EMA weights (``model_ema`` / ``state_dict_ema``) of a training checkpoint.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint, needs unsafe pickle globals, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors_file(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        return Checkpoint(state_dict, "safetensors", metadata)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch zip archive, or a legacy pickle (protocol >= 2)
        raise ValueError(f"{path}: not a torch checkpoint or safetensors file")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(f"{path}: not loadable as weights only (refusing to run code from it): {first}") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a torch checkpoint or safetensors file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (state dict or training checkpoint), got {type(obj).__name__}")
    keys = ("model_ema", "state_dict_ema") if use_ema else ("state_dict", "model")
    for key in keys:
        if isinstance(obj.get(key), dict):
            return Checkpoint(_tensors_only(obj[key], path), key)
    if use_ema:
        raise ValueError(f"{path}: no EMA weights ('model_ema' / 'state_dict_ema'); top-level keys: {sorted(obj)}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(dict(obj), "plain")
    raise ValueError(f"{path}: no state dict found (looked for 'state_dict', 'model' or a dict of tensors); "
                     f"top-level keys: {sorted(map(str, obj))}")


def _tensors_only(state_dict: dict, path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state dict entries are not tensors: {bad[:5]}")
    return dict(state_dict)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename official keys to ours: strip ``module.`` and ``backbone.``, ``head.fc.*`` -> ``head.*``.

    Keys are not validated here (the model load reports missing/unexpected keys and shape mismatches).

    Returns:
        The converted state dict and the detected layout: ``"mmcls"`` (``head.fc``), ``"internimage"``
        (``backbone.*`` with ``head.0``/``head.2``), ``"official-backbone"`` (``backbone.*`` only) or ``"vrwkv"``.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    if not any(k.startswith("backbone.") for k in state_dict):
        return dict(state_dict), "vrwkv"
    out: dict[str, torch.Tensor] = {}
    layout = "official-backbone"
    for k, v in state_dict.items():
        if k.startswith("backbone."):
            k = k[len("backbone.") :]
        elif k.startswith("head.fc."):  # mmcls LinearClsHead
            k, layout = "head." + k[len("head.fc.") :], "mmcls"
        elif k.startswith(("head.0.", "head.2.")):  # InternImage MLP head of VRWKV-L
            layout = "internimage"
        out[k] = v
    return out, layout


def pos_embed_grid(
    num_tokens: int,
    metadata: dict[str, str] | None = None,
    model_grid: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The (H0, W0) grid of a stored ``pos_embed`` of ``num_tokens`` tokens.

    Taken from our safetensors metadata if present, else the model's grid if the token counts agree, else a square.
    """
    if metadata and "pos_embed_grid" in metadata:
        h, w = (int(s) for s in metadata["pos_embed_grid"].split("x"))
        if h * w != num_tokens:
            raise ValueError(f"metadata grid {h}x{w} does not match pos_embed with {num_tokens} tokens")
        return h, w
    if model_grid is not None and model_grid[0] * model_grid[1] == num_tokens:
        return model_grid
    side = round(num_tokens**0.5)
    if side * side != num_tokens:
        raise ValueError(f"cannot infer the grid of a pos_embed with {num_tokens} tokens (not a square)")
    return side, side


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``state_dict`` (our key names) as safetensors with ``format=vrwkv`` in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": SAFETENSORS_FORMAT, **metadata})
    _logger.info("wrote %d tensors to %s", len(tensors), path)
