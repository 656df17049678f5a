"""Errors that mean "what you gave is wrong" (options, files, data, a model's layers).

The command line prints a :class:`UserError` as one line and exits 1; any other exception is
a bug in maskd (or in a library under it) and keeps its traceback. Each class also derives
from the built-in type a Python caller expects (``ValueError``, ``TypeError``, ...), so
``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "UserError",
    "UserKeyError",
    "UserRuntimeError",
    "UserTypeError",
    "UserValueError",
]


class UserError(Exception):
    """Base of every mistake in the user's input; its message names the input and the fix."""


class UserValueError(UserError, ValueError):
    """A value out of range, a malformed file, an unknown name."""


class UserTypeError(UserError, TypeError):
    """A value of the wrong type."""


class UserKeyError(UserError, KeyError):
    """A name that is not there (a layer, a level)."""

    def __str__(self) -> str:  # KeyError quotes its message; a message reads better plain
        return str(self.args[0]) if self.args else ""


class UserRuntimeError(UserError, RuntimeError):
    """A model or dataset that does not behave as its configuration says (a layer that never
    runs, every sample unreadable)."""
