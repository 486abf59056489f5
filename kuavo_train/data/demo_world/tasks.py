"""The four Kuavo tasks of the spec and the Kuavo arm joint names."""

from __future__ import annotations

from dataclasses import dataclass
from kuavo_train.errors import KuavoError


@dataclass(frozen=True)
class DemoTask:
    task_id: int
    name: str
    instruction: str
    # Tasks with the same scene family draw identical scenes from the same seed.
    scene_family: str


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask(
        1,
        "task1_moving_grasp",
        "Grasp the object from the conveyor belt using visual guidance. Place it precisely at the first marked target "
        "location on the table. Then grasp it again and place it precisely at the second marked target location on the table.",
        "conveyor",
    ),
    DemoTask(
        2,
        "task2_weighing",
        "Pick up the package from the conveyor belt, weigh it on the electronic scale, then pick it up again and place it "
        "in the designated storage container",
        "conveyor",
    ),
    DemoTask(
        3,
        "task3_placement",
        "Pick up a bottle from the cluttered daily chemical bottles, transfer it to the other hand, and place it in the "
        "specified pose with the label facing up in the yellow area. Requirements: bottle mouth outside the yellow area, "
        "most of the bottle body inside the yellow area, label facing up",
        "bottles",
    ),
    DemoTask(
        4,
        "task4_sorting",
        "Move from the starting point to the rack, pick up the workpiece, turn around, move to the placement rack, and "
        "place it in the designated position in the material container",
        "rack",
    ),
)

TASKS_BY_NAME = {t.name: t for t in DEMO_TASKS}

# Geometry both the simulation (world.py) and the renderer (render.py) use.
CONVEYOR_Y, CONVEYOR_SPEED = 0.15, 0.006
LEFT, RIGHT = 0, 8  # first joint index of each arm

JOINT_NAMES: tuple[str, ...] = (
    *(f"zarm_l{i}" for i in range(1, 8)),
    "left_claw",
    *(f"zarm_r{i}" for i in range(1, 8)),
    "right_claw",
)

CAMERAS: tuple[str, ...] = ("head_cam_h", "wrist_cam_l", "wrist_cam_r")


class DemoWorldError(KuavoError):
    """Bad input to the demo world; `str()` is the one line shown to the user."""
