"""What both command lines (`refbuild`, `model`) share: `--version`, and usage errors in one line.

typer prints a usage error as a framed, many-line "Error" box; here it is one
line, `error: <what> (see `<command> --help`)`, with click's exit code 2, like
every other error of this project (which library code raises and each CLI
prints as `error: ...`, exit code 1).
"""
from __future__ import annotations

import enum
import functools
import sys
from importlib.metadata import PackageNotFoundError, version as _version
from typing import Any, Callable, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from data_manifests import MsrfaceError

try:
    from typer._click import exceptions as _exc, utils as _utils  # typer >= 0.2x carries its own click
except ImportError:  # older typer: click itself
    from click import exceptions as _exc, utils as _utils


# `--precision` of both CLIs (refbuild/torchutil.py resolves it); here, not there, so a CLI
# does not import torch to parse its options
def choices(name: str, *values: str) -> type[enum.Enum]:
    """A str Enum whose members are `values`, named as they are spelled: what typer shows as an option's choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Precision = choices("Precision", "auto", "fp32", "bf16")


def package_version() -> str:
    try:
        return _version("msrface")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def version_callback(value: bool) -> None:
    """`--version`: print it and exit (an eager option of the app's callback)."""
    if value:
        print(f"msrface {package_version()}")
        raise typer.Exit()


def fail(console: Console, e: Exception) -> NoReturn:
    """Print `error: <message>` in one line (paths may hold [ ]: escaped) and exit 1."""
    console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


INTERRUPTED = "interrupted; rerun the same command to resume"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def one_line_errors(console: Console, interrupted: str | Callable[..., str] = INTERRUPTED
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command: any MsrfaceError it raises (refbuild's, model's, a manifest's) becomes
    one line on `console` and exit 1, in this one place for every command of both CLIs. A Ctrl-C
    becomes one line too, `interrupted` (or what it returns, given the command's arguments), and
    exit 130: every stage resumes, so the line says how."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # typer reads the wrapped signature and annotations
        def command(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except MsrfaceError as e:
                fail(console, e)
            except KeyboardInterrupt:
                line = interrupted(**kwargs) if callable(interrupted) else interrupted
                console.print(f"[bold yellow]{escape(line)}[/]", highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_INTERRUPTED) from None
        return command
    return decorate


def run_app(app: typer.Typer, prog: str) -> None:
    """Run a typer app as a program: usage errors in one line (exit 2), everything else as typer does."""
    try:
        rc = app(prog_name=prog, standalone_mode=False)
    except _exc.NoArgsIsHelpError as e:  # no arguments: typer has shown the help already
        sys.exit(e.exit_code)
    except _exc.UsageError as e:
        where = e.ctx.command_path if e.ctx else prog
        _utils.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
        sys.exit(e.exit_code)
    except _exc.ClickException as e:
        _utils.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        _utils.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def comma_floats(text: str | None, n: int | None, opt: str,
                 within: tuple[float, float] | None = None) -> tuple[float, ...] | None:
    """'0.9,1.3' -> (0.9, 1.3) for option `opt` (exactly `n` numbers when n is given, each in the closed
    range `within` when given); None stays None.

    Raises:
        typer.BadParameter: naming the option and what it takes (a usage error, exit code 2).
    """
    if text is None:
        return None
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{opt} takes comma-separated numbers, got {text!r}") from None
    if n is not None and len(vals) != n:
        raise typer.BadParameter(f"{opt} takes {n} comma-separated numbers, got {text!r}")
    if within is not None and not all(within[0] <= v <= within[1] for v in vals):
        raise typer.BadParameter(f"{opt} values must be in [{within[0]:g}, {within[1]:g}], got {text!r}")
    return vals
