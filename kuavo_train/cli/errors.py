"""User-facing errors: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from kuavo_train.errors import first_line

EXIT_USER_ERROR = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    from kuavo_train.config.schema import ConfigError
    from kuavo_train.data.task_data import DataError
    from kuavo_train.policy.factory import PolicyLoadError
    from kuavo_train.training.pipeline import InstructionError
    from kuavo_train.training.run_state import RunNotFoundError

    from kuavo_train.errors import KuavoError

    types = [KuavoError, ConfigError, DataError, PolicyLoadError, InstructionError, RunNotFoundError]
    from kuavo_train.data.rosbag.topic_map import RosbagError

    types.append(RosbagError)
    try:
        from kuavo_train.data.demo_world import DemoWorldError

        types.append(DemoWorldError)
    except ImportError:
        pass
    try:
        from kuavo_train.data.metaworld.env import MetaWorldError

        types.append(MetaWorldError)
    except ImportError:
        pass
    try:
        from kuavo_train.wrapper.policy.smolvla import WrapperInputError

        types.append(WrapperInputError)
    except ImportError:
        pass
    return tuple(types)


@contextmanager
def one_line_errors():
    try:
        yield
    except Exception as exc:  # not `except user_error_types()`: that would import torch on every exit
        if not isinstance(exc, user_error_types()):
            raise
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
