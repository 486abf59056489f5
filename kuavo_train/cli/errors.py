"""User-facing errors: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

from kuavo_train.errors import KuavoError, first_line

EXIT_USER_ERROR = 2


@contextmanager
def one_line_errors():
    """KuavoError: one line, exit code 2. Ctrl-C and SIGTERM (`timeout`, a job scheduler) unwind the
    same way, so every `finally` removes what it staged, then one line and exit code 130 / 143, as a
    shell reports the signal; what was complete before stays (a training run resumes from its last
    checkpoint)."""
    terminated = [False]

    def on_term(signum, frame):
        terminated[0] = True
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    except KuavoError as exc:  # every user-facing error type of the project derives from it
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"stopped by {'SIGTERM' if terminated[0] else 'Ctrl-C'}: its temporary files removed (run the command "
              "again; a training run resumes from its last checkpoint)", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if terminated[0] else signal.SIGINT))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
