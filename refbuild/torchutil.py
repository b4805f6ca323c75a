"""Torch chores both halves share (refbuild's stages, model's train/eval/infer): one helper each.

Which device `--device auto` means, and which precision `--precision auto` means on it.
"""
from __future__ import annotations

import torch

from data_manifests import MsrfaceError
from refbuild.cliutil import Precision
from refbuild.errors import RefbuildError

PRECISIONS = tuple(p.value for p in Precision)


def resolve_device(device: str) -> str:
    """`auto`: cuda when available, else cpu; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_device(device: str) -> torch.device:
    """`resolve_device` as a torch.device."""
    return torch.device(resolve_device(device))


def resolve_precision(precision: str, device: torch.device,
                      error: type[MsrfaceError] = RefbuildError) -> str:
    """auto: bf16 autocast on CUDA (its tensor cores), fp32 on CPU (exact; bf16 there is opt-in).

    Raises:
        error (the caller's package exception): a precision other than auto, fp32 or bf16.
    """
    if precision not in PRECISIONS:
        raise error(f"--precision {precision!r}: choose auto, fp32 or bf16")
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision
