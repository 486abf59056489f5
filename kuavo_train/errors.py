"""The project's user-facing error types: `str()` is the one line shown to the user.

Every layer raises these (never a traceback for bad configs or data); the CLI
catches `KuavoError` and exits with code 2.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a
    one-line error quotes of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class KuavoError(ValueError):
    """A problem the user can fix; `str()` is one line naming what and where."""


class DataError(KuavoError):
    """Bad or missing data."""
