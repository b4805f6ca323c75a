"""A small timm-style model registry: `register_model`, `create_model`, `list_models`.

As timm's: the model files import this module and register their variants on import;
this module imports no model file (the package, `model/__init__.py`, imports them all).
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

from .errors import MsrError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a variant constructor under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered variants matching a glob pattern."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered variant; kwargs override the variant's defaults.

    Raises:
        MsrError: unknown model name.
    """
    if name not in _MODELS:
        raise MsrError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)
