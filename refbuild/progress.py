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
    # the title holds a path: its own line, soft-wrapped (a table title would break it mid-word); paths may hold [ ]
    console.print(escape(title), style="italic", highlight=False, soft_wrap=True)
    t = Table(show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right", overflow="fold")  # a long path wraps, never cut to "..."
    for k, v in rows:
        t.add_row(escape(k), f"{v:,}" if isinstance(v, int) else "-" if v is None else escape(str(v)))  # None: nothing run
    console.print(t)


def warn(line: str, label: str = "warning") -> None:
    """One yellow `warning:` (or `note:`) line on stderr, printed even with --quiet: something the user
    should know about the output."""
    console.print(f"[yellow]{label}:[/] {escape(line)}", highlight=False, soft_wrap=True)
