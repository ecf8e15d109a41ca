"""The one exception type a user's mistake turns into.

Anything raised as `UserError` reaches the terminal as a single line and exit
status 2 (see `cli.py`); everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a bad path, a corrupt file, an impossible value."""


class RunFailed(Exception):
    """A run that could not finish (a worker crashed, the loss went non-finite).

    Reaches the terminal as one line and exit status 1."""
