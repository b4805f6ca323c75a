"""Runners: how shards of work are distributed, kept apart from the work itself.

A stage provides a *worker class*: built once per worker process (it loads models in
`__init__`, never pickled), then called on one task (a shard) at a time; the call
writes the shard's outputs and done-marker itself and returns how many items it
handled. A runner maps that worker over the pending tasks and yields the counts as
tasks finish, in any order. Engines are registered by name (`ENGINES`): `local`
(this process, or N processes: `refbuild.runners.local`) and `ray` (Ray Data actors:
`refbuild.runners.ray_actors`); adding one is one class and one entry.

Every worker runs torch (and numba) with ONE intra-op thread: parallelism comes from
workers, and a float result never depends on the thread count, so outputs are
byte-identical whatever the engine or number of workers.
"""
from __future__ import annotations

import enum
import importlib
import os

from refbuild.runners.base import Runner, Worker, one_thread, single_thread

__all__ = ["ENGINES", "Engine", "Runner", "Worker", "make_runner", "one_thread", "resolve_workers", "single_thread",
           "wants_cuda"]

ENGINES = {"local": "refbuild.runners.local:LocalRunner", "ray": "refbuild.runners.ray_actors:RayRunner"}


class Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


def wants_cuda(device: str) -> bool:
    """Whether a stage run with `--device` works on CUDA here."""
    if device == "cuda":
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def resolve_workers(workers: int, device: str, needs_model: bool) -> int:
    """0 means auto: one worker per core for model work on CPU, else one."""
    if workers > 0:
        return workers
    if not needs_model:
        return 1
    return 1 if wants_cuda(device) else (os.cpu_count() or 1)


def make_runner(engine: str, workers: int, device: str = "cpu") -> Runner:
    """The runner of a registered engine; a Ray actor takes one GPU when the stage runs on CUDA."""
    name = getattr(engine, "value", engine)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    runner = getattr(importlib.import_module(module), cls)
    if name == "ray":
        return runner(workers, gpus_per_actor=1 if wants_cuda(device) else 0)
    return runner(workers)
