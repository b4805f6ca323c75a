"""The Ray engine: the same worker classes as Ray Data actors, on one machine or a cluster.

Each actor builds its worker once (models load in the actor, never pickled) and
processes whole shards; the shard outputs are the same deterministic Parquet files
the local engine writes, so finished shards are skipped on a rerun with either
engine. The tasks travel inside the Ray dataset (one row each) and the worker's
arguments through the object store once (`ray.put`, the reference passed as
`fn_constructor_args`), never inside the actor's code. `ray.init()` joins the cluster named by RAY_ADDRESS, or starts a local
instance. Each actor takes one GPU when the stage runs on CUDA (`--device`), none
otherwise, whatever the launching machine has.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from refbuild.errors import RefbuildError
from refbuild.runners.base import single_thread


def _ray():
    try:
        import ray
    except ImportError:
        raise RefbuildError("--engine ray needs Ray: pip install 'msrface[ray]'") from None
    return ray


class _Actor:
    def __init__(self, worker_cls: Callable[..., Any], args: Any) -> None:
        import ray

        single_thread()
        self.worker = worker_cls(*(ray.get(args) if isinstance(args, ray.ObjectRef) else args))

    def __call__(self, batch: dict) -> dict:
        return {"n": [self.worker(pickle.loads(t)) for t in batch["task"]]}


@dataclass(frozen=True)
class RayRunner:
    workers: int = 1
    gpus_per_actor: float = 0

    def map(self, worker_cls: Callable[..., Any], args: tuple, tasks: Sequence[Any]) -> Iterator[int]:
        if not tasks:
            return
        ray = _ray()
        if not ray.is_initialized():
            import logging

            ray.init(log_to_driver=False, include_dashboard=False, logging_level=logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # refbuild draws its own
        ctx.print_on_execution_start = False
        rows = [{"task": pickle.dumps(t)} for t in tasks]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        args_ref = ray.put(args)  # once into the object store; every actor reads it from there
        out = ds.map_batches(_Actor, batch_size=1, fn_constructor_args=(worker_cls, args_ref),
                             compute=ray.data.ActorPoolStrategy(size=max(1, self.workers)),
                             num_gpus=self.gpus_per_actor)
        for row in out.iter_rows():
            yield int(row["n"])
