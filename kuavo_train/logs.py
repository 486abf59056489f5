"""Logging set-up shared by the CLI, the spec entry point and the library's pipeline."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path

NOISY = ("httpx", "huggingface_hub", "urllib3", "filelock", "lerobot.configs.video", "OpenGL")
VIDEO_BACKEND_LOGGER = "lerobot.utils.import_utils"


class _VideoBackendOnce(logging.Filter):
    """LeRobot logs an 80-line torchcodec traceback each time a video dataset is opened on a
    machine without FFmpeg's shared libraries, then decodes with PyAV, which works. A run
    opens datasets dozens of times, so this keeps one line, once per process."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "torchcodec" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args = ("torchcodec cannot be loaded (are FFmpeg's shared libraries installed?): "
                                   "LeRobot decodes video with PyAV instead"), ()
        return True


def collapse_video_backend_warning() -> None:
    logger = logging.getLogger(VIDEO_BACKEND_LOGGER)
    if not any(isinstance(f, _VideoBackendOnce) for f in logger.filters):
        logger.addFilter(_VideoBackendOnce())


LOG_FILE = "train.log"


def attach_log_file(path: str | Path) -> logging.Handler | None:
    """Add a run's log file to the root logger; returns the handler to remove when the run ends
    (None when one is attached already), so that runs made one after another in one process
    (compare, the benchmark) each keep their own log."""
    collapse_video_backend_warning()
    path = Path(path)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return None
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    return h


def detach_log_file(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def logging_to(path: str | Path):
    """The block's log lines go to `path` too (a run's train.log, by a command working on the run)."""
    handler = attach_log_file(path)
    try:
        yield
    finally:
        detach_log_file(handler)


def lerobot_prints_silenced():
    """LeRobot's SmolVLA prints (not logs) a line or two each time a policy is built ("Reducing the
    number of VLM layers", "Loading weights from local directory"): a demo run builds a dozen, and
    the lines would bury its own. Logging is untouched."""
    return contextlib.redirect_stdout(io.StringIO())


def quiet() -> None:
    """Keep library chatter out of the user's terminal and the run's log."""
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    collapse_video_backend_warning()


def quiet_worker() -> None:
    """`quiet()` for a helper process: its parent already says whether torchcodec loads."""
    quiet()
    logging.getLogger(VIDEO_BACKEND_LOGGER).setLevel(logging.ERROR)


def progress_bars(enabled: bool = True) -> bool:
    """Whether to draw progress bars: only in a terminal (in a log file a bar is thousands of
    carriage-return updates; the log lines say the same)."""
    return enabled and sys.stderr.isatty()
