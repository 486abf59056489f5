"""The project's user-facing error types: `str()` is the one line shown to the user.

Every layer raises these (never a traceback for bad configs or data); the CLI
catches `KuavoError` and exits with code 2.
"""

from __future__ import annotations


class KuavoError(ValueError):
    """A problem the user can fix; `str()` is one line naming what and where."""


class DataError(KuavoError):
    """Bad or missing data."""
