"""Ray Data runner: the same worker classes as actors, on one machine or a cluster.

Each actor builds its worker once (models load in the actor, never pickled)
and processes whole shards; the shard outputs are the same deterministic
Parquet files the local runner writes, so finished shards are skipped on a
rerun with either engine. `ray.init()` joins the cluster named by RAY_ADDRESS,
or starts a local instance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from refbuild.errors import RefbuildError


def _ray():
    try:
        import ray
    except ImportError:
        raise RefbuildError("--engine ray needs Ray: pip install 'msrface[ray]'") from None
    return ray


@dataclass(frozen=True)
class RayRunner:
    workers: int = 1

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
        import torch

        gpus = 1 if torch.cuda.is_available() else 0
        task_list = list(tasks)

        class _Actor:
            def __init__(self) -> None:
                from pipelines.runners import single_thread

                single_thread()
                self.worker = worker_cls(*args)

            def __call__(self, batch: dict) -> dict:
                return {"n": [self.worker(task_list[int(i)]) for i in batch["i"]]}

        ds = ray.data.from_items([{"i": i} for i in range(len(task_list))], override_num_blocks=len(task_list))
        out = ds.map_batches(_Actor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=max(1, self.workers)),
                             num_gpus=gpus)
        for row in out.iter_rows():
            yield int(row["n"])
