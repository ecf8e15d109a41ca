"""What the command line prints, and how a command ends.

Human-facing lines, tables and progress go to stderr; results meant for
other programs (paths, ids, `--json`) go to stdout. Text that comes from the
user or from data (paths, class names, error messages) is never read as Rich
markup: a path like `runs/[/x]` prints as it is.
"""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import typing
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..errors import Interrupted, RunFailed, UserError

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

EXIT_CODES = (
    "Exit status: 0 done (or already complete), 1 the run failed, 2 a mistake in the input "
    "(one line says which), 130/143 interrupted (Ctrl-C / SIGTERM)."
)


def say(text: str, style: str | None = None) -> None:
    """One line for the person at the terminal (stderr), never read as markup."""
    console.print(Text(str(text), style=style or ""), soft_wrap=True)


def labelled(label: str, text: str, style: str) -> None:
    console.print(Text.assemble((label, style), " ", str(text)), soft_wrap=True)


def warn(text: str) -> None:
    labelled("warning:", text, "yellow")


def result(text: str) -> None:
    """One line on stdout, for other programs: written as it is (no wrapping,
    no tab expansion, no markup)."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def cell(value: Any) -> Text:
    """A table cell holding user or data text, shown literally."""
    return Text(str(value))


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def handles_errors(fn: Callable) -> Callable:
    """Turn the exceptions a command can end with into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _raise_interrupted)
        except ValueError:  # not the main thread (e.g. a test runner's worker thread)
            previous = None
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            labelled("error:", str(exc), "bold red")
            raise typer.Exit(2) from None
        except RunFailed as exc:
            labelled("failed:", str(exc), "bold red")
            raise typer.Exit(1) from None
        except Interrupted as exc:
            labelled("interrupted:", str(exc), "yellow")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            labelled("interrupted:", "stopped by Ctrl-C", "yellow")
            raise typer.Exit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    wrapper.__signature__ = resolved_signature(fn)
    return wrapper


def resolved_signature(fn: Callable) -> inspect.Signature:
    """fn's signature with its annotations evaluated in fn's own module (they
    are strings under `from __future__ import annotations`), so that Typer
    reads the options from the wrapper exactly as from fn."""
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except (NameError, TypeError):
        hints = {}
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation)) if isinstance(p.annotation, str) else p
        for p in signature.parameters.values()
    ]
    return signature.replace(parameters=params)


def is_terminal() -> bool:
    return sys.stdout.isatty()


__all__ = [
    "EXIT_CODES",
    "cell",
    "console",
    "escape",
    "handles_errors",
    "is_terminal",
    "labelled",
    "out",
    "result",
    "say",
    "warn",
]
