"""The exceptions a command can end with, and how their text is shortened.

`UserError` (the user's input is wrong) reaches the terminal as one line and
exit status 2; `RunFailed` (a run could not finish) as one line and exit
status 1; `Interrupted` (Ctrl-C or SIGTERM) as exit status 130 or 143.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input: a bad path, a corrupt file, an impossible value."""


class RunFailed(Exception):
    """A run that could not finish (a worker crashed, the loss went non-finite, no progress)."""


class Interrupted(Exception):
    """The command was stopped by a signal; partial results are marked as partial."""

    def __init__(self, signum: int = signal.SIGINT, what: str = ""):
        self.signum = signum
        super().__init__(what or f"interrupted by {signal.Signals(signum).name}")

    @classmethod
    def restated(cls, exc: BaseException, say: Callable[[str], str]) -> Interrupted:
        """The same stop (a KeyboardInterrupt is SIGINT), with what it left
        said by `say(the signal's name)`."""
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        return cls(signum, say(signal.Signals(signum).name))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text (or its type's name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def root_cause(exc: BaseException, limit: int = 300) -> str:
    """The innermost exception's last line: what actually went wrong on a worker."""
    seen = exc
    while True:
        nxt = seen.__cause__ or getattr(seen, "cause", None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    lines = [line for line in str(seen).strip().splitlines() if line.strip()]
    return (lines[-1].strip() if lines else type(seen).__name__)[:limit]


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a Ray task or actor raised, from the exception Ray wraps
    it in on the caller's side (its cause chain), or None: a corrupt shard
    read on a worker is still the user's one-line mistake."""
    seen, steps, deepest = exc, 0, None
    while seen is not None and steps < 20:
        # Ray's RayTaskError(UserError) is both: its text is Ray's header, its cause the user's error.
        if isinstance(seen, UserError):
            deepest = seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
        steps += 1
    if deepest is not None:
        return UserError(first_line(deepest, 1000))
    # Ray Data keeps only the worker's traceback text of an error in a UDF.
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    for line in str(exc).splitlines():
        if line.strip().startswith(marker):
            return UserError(line.strip()[len(marker) :][:1000])
    return None
