"""Torch chores both halves share (refbuild's stages, model's train/eval/infer): one helper each.

Which device `--device auto` means, and which precision `--precision auto` means on it.
"""
from __future__ import annotations

from pathlib import Path

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


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device,
                      error: type[MsrfaceError] = RefbuildError, cpu_bf16: bool = False) -> str:
    """auto: bf16 autocast on CUDA (its tensor cores); on CPU fp32 (exact), unless `cpu_bf16` (training
    asks for it) and the CPU has native bf16: there autocast trains 1.7-2.4x faster (BENCHMARKS.md).

    Raises:
        error (the caller's package exception): a precision other than auto, fp32 or bf16.
    """
    if precision not in PRECISIONS:
        raise error(f"--precision {precision!r}: choose auto, fp32 or bf16")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (cpu_bf16 and native_cpu_bf16()) else "fp32"
