"""Runners: how shards of work are distributed, kept apart from the work itself.

A stage provides a *worker class*: built once per worker process (it loads
models in `__init__`, never pickled), then called on one task (a shard) at a
time; the call writes the shard's outputs and done-marker itself and returns
how many items it handled. A runner maps that worker over the pending tasks and
yields the counts as tasks finish, in any order.

- `LocalRunner(workers=1)`: in this process (no pool, simplest to debug).
- `LocalRunner(workers=N)`: N processes on this machine, forked where that is safe
  (Linux, CUDA untouched in this process: workers inherit the imported torch
  instead of importing it again, ~3 s saved per run on 2 cores), spawned elsewhere.

Every worker runs torch with ONE intra-op thread: parallelism comes from
workers, and a float result never depends on the thread count, so outputs are
byte-identical whatever the engine or number of workers.
- `RayRunner` (pipelines/ray_runner.py): Ray Data actors, on a laptop or a cluster.
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import multiprocessing as mp


class Worker(Protocol):
    def __call__(self, task: Any) -> int: ...


class Runner(Protocol):
    def map(self, worker_cls: Callable[..., Worker], args: tuple, tasks: Sequence[Any]) -> Iterator[int]: ...


_WORKER: Worker | None = None


def single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def start_method() -> str:
    """fork on Linux while CUDA is uninitialised here, else spawn.

    fork is safe for our workers because the first thing each does is set torch to one
    thread (`single_thread`), so no OpenMP team is ever started in the child, the same
    recipe as torch's DataLoader workers; CUDA cannot survive a fork, hence spawn once
    it is initialised (and on macOS/Windows, where fork is unsafe or absent).
    """
    import sys

    import torch

    return "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"


def _init(worker_cls: Callable[..., Worker], args: tuple) -> None:
    global _WORKER
    single_thread()
    _WORKER = worker_cls(*args)


def _call(task: Any) -> int:
    assert _WORKER is not None
    return _WORKER(task)


@dataclass(frozen=True)
class LocalRunner:
    workers: int = 1

    def map(self, worker_cls: Callable[..., Worker], args: tuple, tasks: Sequence[Any]) -> Iterator[int]:
        if not tasks:
            return
        workers = min(self.workers, len(tasks))  # never start a process with nothing to do
        if workers <= 1:
            import torch

            threads = torch.get_num_threads()
            single_thread()
            try:
                worker = worker_cls(*args)
                for t in tasks:
                    yield worker(t)
            finally:
                torch.set_num_threads(threads)
            return
        ctx = mp.get_context(start_method())
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                 initargs=(worker_cls, args)) as pool:
            pending = {pool.submit(_call, t) for t in tasks}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()  # a worker's exception ends the run; finished shards stay done


def resolve_workers(workers: int, device: str, needs_model: bool) -> int:
    """0 means auto: one worker per core for model work on CPU, else one."""
    if workers > 0:
        return workers
    if not needs_model:
        return 1
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu else (os.cpu_count() or 1)


def make_runner(engine: str, workers: int) -> Runner:
    if engine == "local":
        return LocalRunner(workers)
    if engine == "ray":
        from pipelines.ray_runner import RayRunner

        return RayRunner(workers)
    raise ValueError(f"unknown engine {engine!r}; use local or ray")
