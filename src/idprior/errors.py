"""User-facing errors.

Every mistake a user can make is raised as an `IdpriorError` whose message is one line that
names the problem and the fix. The CLI prints it and exits with code 2; `--debug` shows the
traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class IdpriorError(Exception):
    """A problem with the user's input; the message says what to do."""


class ConfigError(IdpriorError):
    """One or more invalid configuration fields; `problems` holds one line per field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))
