"""The demo world's pretraining set: generic one-step skills in other scenes than the tasks'.

`lerobot/smolvla_base` starts from a vision tower pretrained on other images and is then
pretrained on community robot data (other scenes, short generic instructions) before a user
fine-tunes it on their tasks. The embedded base plays that role offline, so it is pretrained
on the frames of the skills below: in the three scene families of the demo world but on
scene seeds that neither the tasks' training nor their held-out episodes use, and with none
of the four tasks' instructions or multi-step sequences (no weighing, no handover, no
turn-then-place, no re-grasp). Each frame comes with where each thing is in each camera's
image (`where_targets`), the labels of the vision tower's pretraining.

The vision tower also sees `scene_frames`: single frames of many more such scenes, with the
arms in random poses. The skills' episodes alone show 20 scenes per skill: a tower trained on
them found task 3's red bottle among the other bottles of fresh scenes hardly better than a
constant guess (`benchmarks/vision_probe.py`, README "The embedded default").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kuavo_train.data.demo_world.render import camera_views
from kuavo_train.data.demo_world.tasks import CAMERAS
from kuavo_train.data.demo_world.world import (
    HOME, LEFT, RIGHT, KuavoDemoWorld, _grasp_phases, _here, _mark, _place_phases,
)

# Scene seeds of the tasks are below 12,000,000 (writer.scene_seeds); these start above: the
# skills' from 20,000,000 (below 30,000,000 + episodes), `scene_frames`' from 40,000,000
# (below 50,000,000 + scenes).
PRETRAIN_SEED_OFFSET = 20_000_000
SCENE_SEED_OFFSET = 40_000_000
# The world (physics, rendering) of each scene family.
FAMILY_WORLD = {"conveyor": "task1_moving_grasp", "bottles": "task3_placement", "rack": "task4_sorting"}
MAX_SKILL_STEPS = 70


@dataclass(frozen=True)
class Skill:
    instruction: str
    family: str
    plan: tuple


def _pick_place(arm, key, z=0.03, extra=None):
    return (*_grasp_phases(arm), *_place_phases(arm, key, z=z, extra=extra), (arm, _mark(key, 0.15), 0.0, extra or {}, "reach"))


def _reach(arm, key):
    return ((arm, _mark(key, 0.15), 0.0, {}, "reach"), (arm, _mark(key, 0.04), 0.0, {}, "reach"))


SKILLS: tuple[Skill, ...] = (
    Skill("pick up the red block from the belt", "conveyor", tuple(_grasp_phases(RIGHT))),
    Skill("pick up the red block with the left hand", "conveyor", tuple(_grasp_phases(LEFT))),
    Skill("put the red block on the green square", "conveyor", _pick_place(RIGHT, "A")),
    Skill("put the red block on the blue square", "conveyor", _pick_place(RIGHT, "B")),
    Skill("put the red block on the white pad", "conveyor", _pick_place(RIGHT, "scale")),
    Skill("put the red block in the brown box", "conveyor", _pick_place(RIGHT, "container", z=0.05)),
    Skill("touch the green square", "conveyor", _reach(RIGHT, "A")),
    Skill("touch the blue square with the left hand", "conveyor", _reach(LEFT, "B")),
    Skill("pick up the red bottle with the left hand", "bottles", tuple(_grasp_phases(LEFT))),
    Skill("put the red bottle on the yellow square", "bottles", _pick_place(RIGHT, "yellow", z=0.04)),
    Skill("roll the right wrist", "bottles", ((RIGHT, _here(RIGHT, 0.2), 0.0, {RIGHT + 6: 1.0}, "reach"),)),
    Skill("pick up the workpiece from the rack", "rack", tuple(_grasp_phases(LEFT))),
    Skill("turn around", "rack", ((LEFT, HOME[LEFT], 0.0, {LEFT + 3: 1.2}, "reach"),)),
    Skill("put the workpiece in the marked slot", "rack", _pick_place(LEFT, "slot")),
)


def skill_seeds(skill_index: int, seed: int, count: int) -> list[int]:
    rng = np.random.default_rng([int(seed), 77, skill_index])
    base = PRETRAIN_SEED_OFFSET + int(rng.integers(0, 10_000_000))
    return [base + i for i in range(count)]


# What the vision tower learns to locate: the object, every kind of mark, both hands.
ENTITIES: tuple[str, ...] = ("object", "A", "B", "scale", "container", "yellow", "slot", "left_hand", "right_hand")


def where_targets(w: KuavoDemoWorld) -> np.ndarray:
    """(cameras, entities, 3): each entity's (u, v) in [-1, 1] image coordinates and 1 where it is
    in the camera's view; (0, 0, 0) where it is not, or not in this scene."""
    pos = {"object": w.obj[:2], "left_hand": w.q[LEFT : LEFT + 2], "right_hand": w.q[RIGHT : RIGHT + 2],
           **{k: v for k, v in w.scene.marks.items() if k in ENTITIES}}
    out = np.zeros((len(CAMERAS), len(ENTITIES), 3), dtype=np.float32)
    for c, (cx, cy, half, turned) in enumerate(camera_views(w)):
        for e, name in enumerate(ENTITIES):
            if name in pos:
                u, v = (pos[name][0] - cx) / half, (pos[name][1] - cy) / half
                if turned:
                    u, v = -u, -v
                if abs(u) <= 1 and abs(v) <= 1:
                    out[c, e] = (u, v, 1.0)
    return out


def pretraining_frames(seed: int, episodes_per_skill: int, image_size: int) -> dict[str, np.ndarray]:
    """Every frame of the skills' expert episodes, in episode order:
    `images` (frames, cameras, H, W, 3) uint8, `targets` (frames, cameras, entities, 3) float32
    (`where_targets`), `state` and `action` (frames, 16) float32, `episode` and `skill` (frames,) int
    (the skill indexes `SKILLS`). An episode ends a few still steps after the expert's plan is done."""
    cols = {k: [] for k in ("images", "targets", "state", "action", "episode", "skill")}
    episode = 0
    for i, skill in enumerate(SKILLS):
        for scene in skill_seeds(i, seed, episodes_per_skill):
            w = KuavoDemoWorld(FAMILY_WORLD[skill.family], image_size)
            w.plan = list(skill.plan)
            obs = w.reset(scene)
            still = 0
            while still < 3 and w.steps < MAX_SKILL_STEPS:
                action = w.expert_action()
                still += w.phase >= len(w.plan)  # holding still is part of the skill too
                cols["images"].append(np.stack([obs[f"observation.images.{c}"] for c in CAMERAS]))
                cols["targets"].append(where_targets(w))
                cols["state"].append(obs["observation.state"])
                cols["action"].append(action.astype(np.float32))
                cols["episode"].append(episode)
                cols["skill"].append(i)
                obs = w.step(action)
            episode += 1
    return {k: np.stack(v) if k in ("images", "targets", "state", "action") else np.asarray(v) for k, v in cols.items()}


def vision_scene_seeds(family: str, seed: int, count: int) -> list[int]:
    """The scene seeds of `scene_frames` for one scene family."""
    rng = np.random.default_rng([int(seed), 91, list(FAMILY_WORLD).index(family)])
    first = SCENE_SEED_OFFSET + int(rng.integers(0, 10_000_000))
    return [first + i for i in range(count)]


def scene_frames(seed: int, scenes_per_family: int, image_size: int) -> dict[str, np.ndarray]:
    """One frame of each of `scenes_per_family` pretraining scenes per scene family, the arms in
    random poses (hands anywhere over the table at any height, claws open or closed, the turn and
    wrist-roll joints sometimes moved), the object sometimes in a hand and, on the conveyor,
    anywhere along the belt: `images` (frames, cameras, H, W, 3) uint8 and `targets`
    (`where_targets`), as `pretraining_frames` gives them."""
    rng = np.random.default_rng([int(seed), 91])
    images, targets = [], []
    for family, task in FAMILY_WORLD.items():
        for scene in vision_scene_seeds(family, seed, scenes_per_family):
            w = KuavoDemoWorld(task, image_size)
            w.reset(scene)
            for arm in (LEFT, RIGHT):
                w.q[arm : arm + 2] = rng.uniform(0.0, 1.0, 2)
                w.q[arm + 2] = rng.uniform(0.0, 0.3)
                w.q[arm + 7] = float(rng.random() < 0.3)
            w.q[LEFT + 3] = rng.uniform(0.0, 1.3) if rng.random() < 0.3 else 0.0
            w.q[RIGHT + 6] = rng.uniform(0.0, 1.0) if rng.random() < 0.3 else 0.0
            if family == "conveyor":
                w.obj[0], w.steps = rng.uniform(0.08, 0.97), int(rng.integers(0, 100))
            if rng.random() < 0.2:
                w.holder = LEFT if rng.random() < 0.5 else RIGHT
                w.obj = w.hand(w.holder).copy()
            obs = w.observation()
            images.append(np.stack([obs[f"observation.images.{c}"] for c in CAMERAS]))
            targets.append(where_targets(w))
    return {"images": np.stack(images), "targets": np.stack(targets)}
