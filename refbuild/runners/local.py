"""The local engine: workers in this process, or in N processes on this machine.

- `LocalRunner(workers=1)`: in this process (no pool, simplest to debug).
- `LocalRunner(workers=N)`: N processes, forked where that is safe (Linux, CUDA
  untouched in this process: workers inherit the imported torch instead of importing
  it again, ~3 s saved per run on 2 cores), spawned elsewhere.

Workers die with the process that started them (kill -9 and SIGTERM included): an
orphan would keep the library lock it inherited, and the terminal, for as long as it ran.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from refbuild.runners.base import Worker, one_thread, single_thread

_WORKER: Worker | None = None
_KILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows has no SIGKILL; os.kill terminates there


def start_method() -> str:
    """fork on Linux while CUDA is uninitialised here, else spawn.

    fork is safe for our workers because the first thing each does is set torch to one
    thread (`single_thread`), so no OpenMP team is ever started in the child, the same
    recipe as torch's DataLoader workers; CUDA cannot survive a fork, hence spawn once
    it is initialised (and on macOS/Windows, where fork is unsafe or absent).
    """
    import torch

    return "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"


def _watch_parent(parent: int) -> None:
    """Portable fallback of `_die_with`: a thread that ends this process once `parent` is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), _KILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _die_with(parent: int) -> None:
    """End this worker as soon as `parent` (the pid that started it) exits, however it exits.

    Linux: PR_SET_PDEATHSIG, so the kernel SIGKILLs us when the parent (strictly: the
    thread that started us; the pool starts workers from the caller's thread) exits;
    the getppid() check after it covers a parent that died before the prctl. Elsewhere,
    or should prctl fail, a thread polls getppid()."""
    armed = False
    if sys.platform == "linux":
        try:
            import ctypes

            armed = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if not armed:
        _watch_parent(parent)
    if os.getppid() != parent:
        os.kill(os.getpid(), _KILL)


def _init(worker_cls: Callable[..., Worker], args: tuple, parent: int) -> None:
    global _WORKER
    _die_with(parent)
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
            with one_thread():
                worker = worker_cls(*args)
                for t in tasks:
                    yield worker(t)
            return
        ctx = mp.get_context(start_method())
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                 initargs=(worker_cls, args, os.getpid())) as pool:
            pending = {pool.submit(_call, t) for t in tasks}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()  # a worker's exception ends the run; finished shards stay done
