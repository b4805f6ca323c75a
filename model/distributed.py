"""Data-parallel training under `torchrun`: detect the launch, set up and tear down.

`torchrun --nproc-per-node N -m model train ...` starts N copies of the command with
RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) in their environment.
Without them, or with WORLD_SIZE=1, training is the plain single-process loop and
nothing here touches `torch.distributed`.

`--batch-size` is per process: N processes with batch b take the same global batch
of N*b samples per step as one process with batch N*b (each rank its contiguous
b-slice, see `data.ResumableBatchSampler`), and DDP's gradient average over ranks
equals the gradient of the mean loss over that global batch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from refbuild.torchutil import resolve_device

from .errors import MsrError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; world_size 1 = not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Read a torchrun launch from the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistInfo()
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise MsrError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); launch with torchrun") from e
    if not 0 <= rank < world:
        raise MsrError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    return DistInfo(rank, world, local)


def rank_device(name: str, info: DistInfo) -> torch.device:
    """The device of this rank: `auto`/`cuda` -> cuda:LOCAL_RANK under torchrun (set current), else as given."""
    name = resolve_device(name)
    device = torch.device(name)
    if not info.enabled or device.type != "cuda":
        return device
    if device.index is not None:
        raise MsrError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda or auto")
    if info.local_rank >= torch.cuda.device_count():
        raise MsrError(f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                       "lower --nproc-per-node")
    device = torch.device("cuda", info.local_rank)
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(info: DistInfo, device: torch.device) -> Iterator[None]:
    """Init the process group (nccl on CUDA, gloo on CPU) for the block; destroy it after, also on error."""
    if not info.enabled:
        yield
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", rank=info.rank, world_size=info.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` (which must be called through its forward) when distributed."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_over_ranks(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (SUM / N: gloo has no AVG); `x` itself when not distributed."""
    if not info.enabled:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / info.world_size


__all__ = ["DistInfo", "barrier", "from_env", "mean_over_ranks", "process_group", "rank_device", "wrap"]
