"""A small timm-style model registry: `register_model`, `create_model`, `list_models`, and `model_cost`
(parameters and FLOPs of a variant, for Table 1 and the quality bench).

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


def model_cost(model: str | nn.Module, num_refs: int = 4) -> dict[str, float]:
    """Parameters and forward FLOPs per sample of a model, or of a registered variant by name with its
    default settings (torch FlopCounterMode: 2 x multiply-adds of conv/matmul), with `num_refs`
    references where the model takes them. Pass the built model when it was made with other kwargs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = (create_model(model) if isinstance(model, str) else model).eval()
    dev = next(model.parameters()).device
    lr = torch.rand(1, 3, 16, 16, device=dev)
    refs = torch.rand(1, num_refs, 3, model.out_size, model.out_size, device=dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(lr, refs, torch.ones(1, num_refs, dtype=torch.bool, device=dev))
    return {"params": sum(p.numel() for p in model.parameters()), "flops": float(fc.get_total_flops())}
