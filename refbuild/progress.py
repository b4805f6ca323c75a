"""rich progress bars (items/s and ETA) and end-of-stage summary tables, on stderr."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- it/s" if speed is None else f"{speed:,.1f} it/s", style="cyan")


def bar(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )


def summary(title: str, rows: list[tuple[str, object]], quiet: bool = False) -> None:
    if quiet:
        return
    t = Table(title=escape(title), show_header=False, title_justify="left")  # paths may hold [ ]
    t.add_column(style="bold")
    t.add_column(justify="right", overflow="fold")  # a long path wraps, never cut to "..."
    for k, v in rows:
        t.add_row(escape(k), f"{v:,}" if isinstance(v, int) else escape(str(v)))
    console.print(t)
