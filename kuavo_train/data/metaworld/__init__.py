"""MetaWorld v3 (a simulator we did not write) for a closed-loop continual-learning benchmark:
scripted-expert LeRobot datasets and held-out-seed evaluation. Needs the `metaworld` extra."""

from kuavo_train.data.metaworld.env import (
    DEFAULT_TASKS,
    INSTRUCTIONS,
    OBSERVATIONS,
    MetaWorldError,
    MetaWorldSim,
    SimSettings,
    check_tasks,
    instruction_for,
    known_tasks,
    stock_env_facts,
)
from kuavo_train.data.metaworld.writer import META_FILE, has_metaworld, read_meta, write_task_dataset

__all__ = [
    "DEFAULT_TASKS", "INSTRUCTIONS", "META_FILE", "OBSERVATIONS", "MetaWorldError", "MetaWorldSim", "SimSettings",
    "check_tasks", "has_metaworld", "instruction_for", "known_tasks", "read_meta", "stock_env_facts", "write_task_dataset",
]
