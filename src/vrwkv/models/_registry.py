"""Model names of this package. Registration goes through timm's registry, so ``timm.create_model`` sees them too;
this module only remembers which names are ours (for :func:`vrwkv.list_models` / :func:`vrwkv.create_model`)."""
from __future__ import annotations

import fnmatch
from typing import Callable, TypeVar

from timm.models import register_model as _timm_register_model

F = TypeVar("F", bound=Callable)
_MODEL_NAMES: list[str] = []


def register_model(fn: F) -> F:
    """Register a model entry point with timm (refusing duplicates) and record its name as one of ours."""
    if fn.__name__ in _MODEL_NAMES:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    fn = _timm_register_model(fn)
    _MODEL_NAMES.append(fn.__name__)
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of our registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _MODEL_NAMES if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """True if ``name`` (optionally with a ``.tag`` for the pretrained weights) is one of our models."""
    return name.split(".", 1)[0] in _MODEL_NAMES
