"""What every runner shares: the worker and runner protocols, and one intra-op thread per worker."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol, Sequence


class Worker(Protocol):
    def __call__(self, task: Any) -> int: ...


class Runner(Protocol):
    def map(self, worker_cls: Callable[..., Worker], args: tuple, tasks: Sequence[Any]) -> Iterator[int]: ...


def _threads(n: int | None) -> tuple[int, int | None]:
    """Set torch's (and numba's, where present) intra-op threads to n; return what they were."""
    import torch

    torch_was, numba_was = torch.get_num_threads(), None
    try:
        import numba

        numba_was = numba.get_num_threads()
        if n:
            numba.set_num_threads(n)
    except (ImportError, ValueError):  # numba absent, or its threading layer refuses
        pass
    if n:
        torch.set_num_threads(n)
    return torch_was, numba_was


def single_thread() -> None:
    """torch and numba with one thread: parallelism comes from workers, and a float
    result never depends on the thread count."""
    _threads(1)


@contextmanager
def one_thread() -> Iterator[None]:
    """`single_thread` for a worker run in this process, the thread counts restored afterwards."""
    torch_was, numba_was = _threads(1)
    try:
        yield
    finally:
        _threads(torch_was)
        if numba_was:
            import numba

            numba.set_num_threads(numba_was)
