"""rich progress bar for training: samples/s, loss, ETA."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self.p, self.t = progress, task

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.p is not None:
            self.p.update(self.t, completed=step, loss=loss, rate=rate)


@contextlib.contextmanager
def train_progress(enabled: bool, total: int, done: int) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    cols = [
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} samples/s"), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols) as p:
        yield _Bar(p, p.add_task("train", total=total, completed=done, loss=float("nan"), rate=0.0))
