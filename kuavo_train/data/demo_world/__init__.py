"""The Kuavo demo world: a seeded toy tabletop that writes real LeRobot datasets for the
four tasks of the spec and replays held-out scenes closed loop."""

from kuavo_train.data.demo_world.tasks import CAMERAS, DEMO_TASKS, JOINT_NAMES, TASKS_BY_NAME, DemoWorldError
from kuavo_train.data.demo_world.world import KuavoDemoWorld
from kuavo_train.data.demo_world.writer import (
    ExpertPolicy,
    load_scene_seeds,
    run_closed_loop,
    write_demo_world,
    write_task_dataset,
)

__all__ = [
    "CAMERAS", "DEMO_TASKS", "JOINT_NAMES", "TASKS_BY_NAME", "DemoWorldError", "KuavoDemoWorld", "ExpertPolicy",
    "load_scene_seeds", "run_closed_loop", "write_demo_world", "write_task_dataset",
]
