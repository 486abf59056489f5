"""A tiny Kuavo-like tabletop world: two arms, one object to manipulate, three cameras.

Pseudo-kinematics (a toy, documented so that the data make sense):
- joints 0..6 are the left arm (zarm_l1..l7), 7 the left claw, 8..14 the right
  arm (zarm_r1..r7), 15 the right claw;
- a hand's position on the table is (x, y) = (zarm_*1, zarm_*2) and its height
  z = zarm_*3, in table units ([0, 1] x [0, 1], z in [0, 0.3]);
- zarm_l4 is the "turn around" joint of task 4, zarm_r7 the wrist roll that
  turns a bottle's label up in task 3; zarm_*5/6 follow the hand smoothly;
- a claw is closed when its value is > 0.5.

An action is the 16 absolute joint targets; a step moves every joint toward its
target by at most a fixed rate (the arm cannot jump), closes/opens the claws,
attaches the object to a hand that closes near it and drops it where a hand
opens. In tasks 1 and 2 the object rides a conveyor until first grasped.

Success is judged by events, in order (the stated criterion of each task):
1 moving grasp: object grasped, released on marker A, re-grasped, released on marker B.
2 weighing: object released on the scale and left there until weighed (3 steps),
  re-grasped, released in the container.
3 placement: bottle grasped by the left hand, handed to the right hand, released in
  the yellow area with the wrist rolled label-up (zarm_r7 > 0.8).
4 sorting: workpiece grasped from the rack, turned around (zarm_l4 > 1.0 while
  holding it), released on the designated container slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kuavo_train.data.demo_world.tasks import CAMERAS, CONVEYOR_SPEED, CONVEYOR_Y, LEFT, RIGHT, TASKS_BY_NAME, DemoWorldError

XY_RATE, Z_RATE, JOINT_RATE = 0.07, 0.05, 0.3  # per step (10 fps)
GRASP_RADIUS, GRASP_HEIGHT = 0.07, 0.06
PLACE_TOL = 0.08
WEIGH_STEPS = 3
HOME = {LEFT: (0.25, 0.6, 0.2), RIGHT: (0.75, 0.6, 0.2)}
MAX_STEPS = {"task1_moving_grasp": 90, "task2_weighing": 90, "task3_placement": 90, "task4_sorting": 80}


@dataclass
class Scene:
    """Everything drawn from the scene seed."""

    obj: np.ndarray  # (x, y) start of the object to manipulate
    marks: dict[str, np.ndarray]  # named fixed locations (targets, scale, container, ...)
    clutter: list[tuple[np.ndarray, tuple[int, int, int]]] = field(default_factory=list)


def make_scene(family: str, seed: int) -> Scene:
    rng = np.random.default_rng([int(seed), {"conveyor": 1, "bottles": 3, "rack": 4}[family]])
    u = rng.uniform
    if family == "conveyor":
        # Tasks 1 and 2 share this: the object on the belt, both task-1 markers and
        # the task-2 scale and container are in every scene.
        spots = _spread(rng, 4, lo=(0.12, 0.4), hi=(0.88, 0.9), min_dist=0.2)
        return Scene(obj=np.array([u(0.08, 0.35), CONVEYOR_Y]),
                     marks={"A": spots[0], "B": spots[1], "scale": spots[2], "container": spots[3]})
    if family == "bottles":
        spots = _spread(rng, 5, lo=(0.1, 0.15), hi=(0.45, 0.55), min_dist=0.11)
        clutter_colors = [(230, 140, 30), (150, 60, 200), (235, 235, 235), (60, 160, 60)]
        return Scene(obj=spots[0], marks={"yellow": np.array([u(0.6, 0.85), u(0.2, 0.75)]), "handover": np.array([0.5, 0.55])},
                     clutter=[(spots[i], clutter_colors[i - 1]) for i in range(1, 5)])
    # rack: the workpiece on a rack on the left, a container with three slots on the right
    slots = [np.array([0.78, y]) for y in (0.3, 0.5, 0.7)]
    k = int(rng.integers(3))
    return Scene(obj=np.array([0.12, u(0.2, 0.8)]), marks={"slot": slots[k], **{f"slot{i}": s for i, s in enumerate(slots)}})


def _spread(rng, n, lo, hi, min_dist):
    """n points in a box, pairwise at least min_dist apart (rejection sampling)."""
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(lo, hi)
        if all(np.linalg.norm(p - q) >= min_dist for q in pts):
            pts.append(p)
    return pts


class KuavoDemoWorld:
    def __init__(self, task: str, image_size: int = 64):
        if task not in TASKS_BY_NAME:
            raise DemoWorldError(f"demo world error: unknown task {task!r} (known: {', '.join(TASKS_BY_NAME)})")
        self.task = TASKS_BY_NAME[task]
        self.image_size = int(image_size)
        self.max_steps = MAX_STEPS[task]
        # The scripted expert's plan; the pretraining skills run other plans in the same world.
        self.plan = EXPERT_PLANS[task]

    # ---- state ---------------------------------------------------------------
    def reset(self, scene_seed: int) -> dict:
        self.scene = make_scene(self.task.scene_family, scene_seed)
        self.q = np.zeros(16)
        for arm, (x, y, z) in HOME.items():
            self.q[arm : arm + 3] = (x, y, z)
        self.obj = np.array([*self.scene.obj, 0.0])
        self.holder: int | None = None
        self.ever_grasped = False
        self.on_scale_steps = 0
        self.weighed = False
        self.events: list[str] = []
        self.steps = 0
        self.phase = 0  # the expert's progress
        self.phase_steps = 0
        return self.observation()

    def hand(self, arm: int) -> np.ndarray:
        return self.q[arm : arm + 3]

    @property
    def success(self) -> bool:
        return self.events == SUCCESS_EVENTS[self.task.name]

    @property
    def done(self) -> bool:
        return self.success or self.steps >= self.max_steps

    def step(self, action) -> dict:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (16,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be 16 finite joint targets, got shape {a.shape}")
        was_closed = {arm: self.q[arm + 7] > 0.5 for arm in (LEFT, RIGHT)}
        rate = np.full(16, JOINT_RATE)
        for arm in (LEFT, RIGHT):
            rate[arm : arm + 2] = XY_RATE
            rate[arm + 2] = Z_RATE
            rate[arm + 7] = 1.0  # claws snap
        self.q = self.q + np.clip(a - self.q, -rate, rate)
        for arm in (LEFT, RIGHT):
            self.q[arm : arm + 2] = np.clip(self.q[arm : arm + 2], 0.0, 1.0)
            self.q[arm + 2] = np.clip(self.q[arm + 2], 0.0, 0.3)
        for arm in (LEFT, RIGHT):
            closed = self.q[arm + 7] > 0.5
            h = self.hand(arm)
            if closed and not was_closed[arm] and self.holder != arm:
                near = np.linalg.norm(h[:2] - self.obj[:2]) < GRASP_RADIUS and abs(h[2] - self.obj[2]) < GRASP_HEIGHT
                if near:
                    self._grasp(arm)
            elif not closed and was_closed[arm] and self.holder == arm:
                self._release(arm)
        if self.holder is not None:
            self.obj = self.hand(self.holder).copy()
        elif not self.ever_grasped and self.task.scene_family == "conveyor":
            self.obj[0] = min(self.obj[0] + CONVEYOR_SPEED, 0.97)
        self._watch_scale()
        self.steps += 1
        return self.observation()

    # ---- events (the success criterion) ------------------------------------
    def _grasp(self, arm: int) -> None:
        prev, self.holder, self.ever_grasped = self.holder, arm, True
        name = self.task.name
        if name == "task3_placement":
            self._event("grasp_left" if arm == LEFT and prev is None else "handover" if arm == RIGHT and prev == LEFT else "other")
        elif name == "task4_sorting":
            self._event("grasp")
        elif name == "task1_moving_grasp":
            self._event("grasp" if "release_A" not in self.events else "regrasp")
        elif name == "task2_weighing":
            self._event("grasp" if "weighed" not in self.events else "regrasp")

    def _release(self, arm: int) -> None:
        self.holder = None
        self.obj = np.array([self.obj[0], self.obj[1], 0.0])
        at = lambda key: np.linalg.norm(self.obj[:2] - self.scene.marks[key]) < PLACE_TOL  # noqa: E731
        name = self.task.name
        if name == "task1_moving_grasp":
            self._event("release_A" if at("A") else "release_B" if at("B") else "drop")
        elif name == "task2_weighing":
            self._event("on_scale" if at("scale") else "in_container" if at("container") else "drop")
        elif name == "task3_placement":
            self._event("placed_label_up" if at("yellow") and self.q[RIGHT + 6] > 0.8 else "drop")
        elif name == "task4_sorting":
            turned = self.q[LEFT + 3] > 1.0
            self._event("placed" if turned and at("slot") else "drop")

    def _watch_scale(self) -> None:
        if self.task.name != "task2_weighing":
            return
        on = self.holder is None and np.linalg.norm(self.obj[:2] - self.scene.marks["scale"]) < PLACE_TOL
        self.on_scale_steps = self.on_scale_steps + 1 if on else 0
        if self.on_scale_steps >= WEIGH_STEPS and not self.weighed:
            self.weighed = True
            self._event("weighed")

    def _event(self, name: str) -> None:
        """Only the next expected event counts; anything else (a drop, a wrong place) is ignored,
        so a policy may recover, but success needs every key event in order."""
        expected = SUCCESS_EVENTS[self.task.name]
        if len(self.events) < len(expected) and name == expected[len(self.events)]:
            self.events.append(name)

    # ---- progress (a dense reward for closed-loop evaluation) -------------------
    def progress(self) -> float:
        """How far the task got, in [0, 1]: 1 exactly on success.

        (k + 0.5 * closeness) / n with k of the task's n key events done and closeness in
        [0, 1] how near the next event is: the nearest hand allowed to make a grasp-type
        event to the object, the object to the mark of a place-type event, or the share of
        the weighing time spent on the scale. Being close earns at most half an event, so
        progress never reaches (k + 1) / n before the event itself."""
        expected = SUCCESS_EVENTS[self.task.name]
        k = len(self.events)
        if k >= len(expected):
            return 1.0
        nxt = expected[k]
        if nxt == "weighed":
            closeness = min(self.on_scale_steps / WEIGH_STEPS, 1.0)
        elif nxt in GRASP_HANDS:
            d = min(float(np.linalg.norm(self.hand(arm) - self.obj)) for arm in GRASP_HANDS[nxt])
            closeness = max(0.0, 1.0 - d / APPROACH_SCALE)
        else:
            d = float(np.linalg.norm(self.obj[:2] - self.scene.marks[PLACE_MARKS[nxt]]))
            closeness = max(0.0, 1.0 - d / APPROACH_SCALE)
        return (k + 0.5 * closeness) / len(expected)

    # ---- the scripted expert -------------------------------------------------
    def expert_action(self) -> np.ndarray:
        """The next joint targets of the scripted expert (uses the true object position)."""
        plan = self.plan
        while self.phase < len(plan):
            arm, target, claw, extra, until = plan[self.phase]
            goal = self._resolve(target, arm)
            if self._phase_done(arm, goal, claw, extra, until):
                self.phase += 1
                self.phase_steps = 0
                continue
            break
        a = self.q.copy()
        if self.phase >= len(plan):
            return a
        arm, target, claw, extra, until = plan[self.phase]
        goal = self._resolve(target, arm)
        a[arm : arm + 3] = goal
        a[arm + 7] = claw
        for j, v in extra.items():
            a[j] = v
        # the wrist joints follow the hand (only so that all 16 dims move plausibly)
        for arm_ in (LEFT, RIGHT):
            a[arm_ + 4] = 0.5 * a[arm_ + 2]
            a[arm_ + 5] = 0.3 * (a[arm_] - 0.5)
        self.phase_steps += 1
        return a

    def _resolve(self, target, arm: int) -> np.ndarray:
        if callable(target):
            return np.asarray(target(self), dtype=np.float64)
        return np.asarray(target, dtype=np.float64)

    def _phase_done(self, arm, goal, claw, extra, until) -> bool:
        if until == "held":
            return self.holder == arm
        if until == "released":
            return self.holder != arm
        if until == "weighed":
            return self.weighed
        reached = np.all(np.abs(self.hand(arm) - goal) < 0.012) and (self.q[arm + 7] > 0.5) == (claw > 0.5)
        return bool(reached and all(abs(self.q[j] - v) < 0.05 for j, v in extra.items()))

    # ---- cameras -----------------------------------------------------------------
    def observation(self) -> dict:
        from kuavo_train.data.demo_world.render import render_views

        images = render_views(self)
        obs = {"observation.state": self.q.astype(np.float32)}
        for cam, img in zip(CAMERAS, images):
            obs[f"observation.images.{cam}"] = img
        return obs


def _obj_xy(z):
    """Target above/at the object, leading a moving object by one step."""

    def f(w: KuavoDemoWorld):
        lead = CONVEYOR_SPEED if (not w.ever_grasped and w.task.scene_family == "conveyor") else 0.0
        return (w.obj[0] + lead, w.obj[1], z)

    return f


def _mark(key, z):
    return lambda w: (*w.scene.marks[key], z)


def _here(arm, z):
    return lambda w: (*w.hand(arm)[:2], z)


def _grasp_phases(arm):
    return [
        (arm, _obj_xy(0.12), 0.0, {}, "reach"),
        (arm, _obj_xy(0.02), 0.0, {}, "reach"),
        (arm, _obj_xy(0.02), 1.0, {}, "held"),
        (arm, _here(arm, 0.15), 1.0, {}, "reach"),
    ]


def _place_phases(arm, key, z=0.03, extra=None):
    extra = extra or {}
    return [
        (arm, _mark(key, 0.15), 1.0, extra, "reach"),
        (arm, _mark(key, z), 1.0, extra, "reach"),
        (arm, _mark(key, z), 0.0, extra, "released"),
    ]


# One phase = (arm, hand target, claw, other joint targets, completion rule).
EXPERT_PLANS = {
    "task1_moving_grasp": [
        *_grasp_phases(RIGHT), *_place_phases(RIGHT, "A"),
        (RIGHT, _mark("A", 0.1), 0.0, {}, "reach"),
        *_grasp_phases(RIGHT), *_place_phases(RIGHT, "B"),
        (RIGHT, _mark("B", 0.15), 0.0, {}, "reach"),
    ],
    "task2_weighing": [
        *_grasp_phases(RIGHT), *_place_phases(RIGHT, "scale"),
        (RIGHT, _mark("scale", 0.1), 0.0, {}, "weighed"),
        *_grasp_phases(RIGHT), *_place_phases(RIGHT, "container", z=0.05),
        (RIGHT, _mark("container", 0.15), 0.0, {}, "reach"),
    ],
    "task3_placement": [
        *_grasp_phases(LEFT),
        (LEFT, _mark("handover", 0.15), 1.0, {}, "reach"),
        (RIGHT, lambda w: (w.scene.marks["handover"][0] + 0.0, w.scene.marks["handover"][1], 0.15), 0.0, {}, "reach"),
        (RIGHT, _here(RIGHT, 0.15), 1.0, {}, "held"),
        (LEFT, _here(LEFT, 0.15), 0.0, {}, "reach"),
        (LEFT, HOME[LEFT], 0.0, {}, "reach"),
        *_place_phases(RIGHT, "yellow", z=0.04, extra={RIGHT + 6: 1.0}),
        (RIGHT, _mark("yellow", 0.15), 0.0, {RIGHT + 6: 1.0}, "reach"),
    ],
    "task4_sorting": [
        *_grasp_phases(LEFT),
        (LEFT, _here(LEFT, 0.18), 1.0, {LEFT + 3: 1.2}, "reach"),
        *_place_phases(LEFT, "slot", extra={LEFT + 3: 1.2}),
        (LEFT, _mark("slot", 0.15), 0.0, {LEFT + 3: 1.2}, "reach"),
    ],
}

SUCCESS_EVENTS = {
    "task1_moving_grasp": ["grasp", "release_A", "regrasp", "release_B"],
    "task2_weighing": ["grasp", "on_scale", "weighed", "regrasp", "in_container"],
    "task3_placement": ["grasp_left", "handover", "placed_label_up"],
    "task4_sorting": ["grasp", "placed"],
}

# For `progress()`: which hands may make each grasp-type event, the mark of each place-type
# event, and the distance (table units) beyond which closeness is 0.
GRASP_HANDS = {"grasp": (LEFT, RIGHT), "regrasp": (LEFT, RIGHT), "grasp_left": (LEFT,), "handover": (RIGHT,)}
PLACE_MARKS = {"release_A": "A", "release_B": "B", "on_scale": "scale", "in_container": "container",
               "placed_label_up": "yellow", "placed": "slot"}
APPROACH_SCALE = 0.5
