"""What the command line prints, and how a command ends.

Human-facing lines, tables and progress go to stderr; results meant for
other programs (paths, ids, `--json`) go to stdout. Text that comes from the
user or from data (paths, class names, error messages) is never read as Rich
markup: a path like `runs/[/x]` prints as it is.

Nor does it ever reach the terminal as control codes: a class name in a
dataset.json, a path, a lock holder's name or a job's log line could hold an
escape sequence (an OSC 52 clipboard write, a screen clear, a bell). Both
consoles below are `TerminalConsole`s, which write every character that is
not printable as an escape (`storage.printable`), whoever built the text
(tables, titles, messages); Rich's own colours and cursor moves are not text
and pass. The message helpers escape their text as they build it (so a
message stays one line and a table measures what it shows), and `result`
does the same when stdout is a terminal, as `ls` does.
"""

from __future__ import annotations

import functools
import inspect
import re
import signal
import sys
import typing
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.segment import Segment
from rich.text import Text

from ..errors import Interrupted, RunFailed, UserError

_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # SGR: colour and weight only (Ray's log prefixes use them)


def safe(text: Any) -> str:
    """Text as it may reach a terminal: one line, every control character
    (ESC, BEL, newline, ...) written as an escape such as `\\x1b`."""
    from ..storage import printable  # here: `vae-ray --help` stays free of pyarrow

    return printable(str(text))


def _safe_lines(text: str) -> str:
    """Like `safe`, keeping line breaks (multi-line results: YAML, log lines);
    colour codes, which would only show as noise, are dropped."""
    return "\n".join(safe(_COLOURS.sub("", line)) for line in text.split("\n"))


class TerminalConsole(Console):
    """A Rich console that never writes a control character it was given as
    text: whatever renders through it (a table title or cell made anywhere,
    a status line) has its non-printable characters escaped. Control segments
    (Rich's cursor moves) and styles (applied later, as codes) are not text."""

    def render(self, renderable, options=None):
        for segment in super().render(renderable, options):
            text = segment.text
            if segment.control or text == "\n" or text.isprintable():
                yield segment
            else:
                yield Segment(_safe_lines(text), segment.style, segment.control)


console = TerminalConsole(stderr=True, highlight=False)
out = TerminalConsole(highlight=False, soft_wrap=True)

EXIT_CODES = (
    "Exit status: 0 done (or already complete), 1 the run failed, 2 a mistake in the input "
    "(one line says which), 130/143 interrupted (Ctrl-C / SIGTERM)."
)


def say(text: str, style: str | None = None) -> None:
    """One line for the person at the terminal (stderr), never read as markup."""
    console.print(Text(safe(text), style=style or ""), soft_wrap=True)


def labelled(label: str, text: str, style: str) -> None:
    console.print(Text.assemble((label, style), " ", safe(text)), soft_wrap=True)


def warn(text: str) -> None:
    labelled("warning:", text, "yellow")


def result(text: str) -> None:
    """One line on stdout, for other programs: written as it is (no wrapping,
    no tab expansion, no markup). On a terminal, control characters are
    escaped as on stderr; a pipe gets the text unchanged (as `ls` does)."""
    text = str(text)
    sys.stdout.write(f"{_safe_lines(text) if is_terminal() else text}\n")
    sys.stdout.flush()


def cell(value: Any) -> Text:
    """A table cell holding user or data text, shown literally."""
    return Text(safe(value))


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
    "safe",
    "say",
    "warn",
]
