"""User-facing errors: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from kuavo_train.errors import KuavoError, first_line

EXIT_USER_ERROR = 2


@contextmanager
def one_line_errors():
    try:
        yield
    except KuavoError as exc:  # every user-facing error type of the project derives from it
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
