"""Pure-numpy cameras of the demo world: axis-aligned rectangles filled by slicing.

The head camera looks down on the whole table; each wrist camera looks down on
a window around its hand that widens with the hand's height, with the claw's
fingers drawn at the image edges (closed fingers meet in the middle). Drawing is
a handful of array slice assignments per camera: three 64 px cameras cost under a
millisecond.
"""

from __future__ import annotations

import math

import numpy as np

from kuavo_train.data.demo_world.tasks import CONVEYOR_SPEED, CONVEYOR_Y, LEFT, RIGHT

TABLE = (92, 92, 96)
BELT, BELT_STRIPE = (45, 45, 48), (70, 70, 74)
COLORS = {
    "A": (40, 200, 60),
    "B": (50, 90, 230),
    "scale": (225, 225, 225),
    "scale_weighed": (250, 240, 120),
    "container": (140, 90, 40),
    "yellow": (235, 210, 40),
    "rack": (165, 165, 165),
    "slot": (60, 60, 60),
    "slot_target": (40, 200, 60),
    "object": (220, 40, 40),
    "bottle": (220, 40, 40),
    "label": (250, 250, 250),
    "workpiece": (40, 190, 200),
    "left_hand": (0, 220, 220),
    "right_hand": (220, 0, 220),
    "finger": (20, 20, 20),
}


def _rect(cx, cy, hx, hy, color):
    return (cx - hx, cy - hy, cx + hx, cy + hy, color)


def _outline(cx, cy, h, t, color):
    return [
        _rect(cx, cy - h, h, t, color),
        _rect(cx, cy + h, h, t, color),
        _rect(cx - h, cy, t, h, color),
        _rect(cx + h, cy, t, h, color),
    ]


def scene_primitives(w) -> list[tuple]:
    """The world as rectangles (x0, y0, x1, y1, color) in table units, back to front."""

    fam, marks = w.task.scene_family, w.scene.marks
    prims = []
    if fam == "conveyor":
        prims.append(_rect(0.5, CONVEYOR_Y, 0.5, 0.06, BELT))
        shift = (w.steps * CONVEYOR_SPEED) % 0.1 if not w.ever_grasped else 0.0
        prims += [_rect(x + shift, CONVEYOR_Y, 0.008, 0.06, BELT_STRIPE) for x in np.arange(-0.1, 1.0, 0.1)]
        prims += _outline(*marks["A"], 0.045, 0.008, COLORS["A"])
        prims += _outline(*marks["B"], 0.045, 0.008, COLORS["B"])
        prims.append(_rect(*marks["scale"], 0.05, 0.05, COLORS["scale_weighed" if w.weighed else "scale"]))
        prims += _outline(*marks["container"], 0.06, 0.012, COLORS["container"])
        obj_color, obj_half = COLORS["object"], (0.025, 0.025)
    elif fam == "bottles":
        prims.append(_rect(*marks["yellow"], 0.07, 0.07, COLORS["yellow"]))
        prims += [_rect(p[0], p[1], 0.018, 0.035, c) for p, c in w.scene.clutter]
        obj_color, obj_half = COLORS["bottle"], (0.018, 0.035)
    else:
        prims.append(_rect(0.12, 0.5, 0.05, 0.4, COLORS["rack"]))
        for i in range(3):
            s = marks[f"slot{i}"]
            prims.append(_rect(*s, 0.05, 0.05, COLORS["slot"]))
        prims += _outline(*marks["slot"], 0.055, 0.01, COLORS["slot_target"])
        # the body's heading (zarm_l4, "turn around"), shown as a bar along the top edge
        prims.append(_rect(0.5, 0.02, 0.4 * min(max(w.q[LEFT + 3] / 1.2, 0.0), 1.0) + 0.01, 0.02, (250, 150, 30)))
        obj_color, obj_half = COLORS["workpiece"], (0.03, 0.03)
    lift = 1.0 + 2.0 * float(w.obj[2])  # a lifted object looks bigger from above
    prims.append(_rect(w.obj[0], w.obj[1], obj_half[0] * lift, obj_half[1] * lift, obj_color))
    if fam == "bottles":
        # the label turns into view as the right wrist rolls (zarm_r7)
        roll = min(max(w.q[RIGHT + 6], 0.0), 1.0) if w.holder == RIGHT else 0.0
        prims.append(_rect(w.obj[0], w.obj[1], obj_half[0] * lift * roll, 0.01 * lift, COLORS["label"]))
    for arm, name in ((LEFT, "left_hand"), (RIGHT, "right_hand")):
        x, y, z = w.q[arm : arm + 3]
        h = 0.02 + 0.06 * z
        prims += _outline(x, y, h, 0.006, COLORS[name])
        if w.q[arm + 7] > 0.5:
            prims.append(_rect(x, y, 0.008, 0.008, COLORS[name]))
    return prims


def draw(size: int, view: tuple[float, float, float], prims, background=TABLE) -> np.ndarray:
    """Rasterise rectangles into a (size, size, 3) uint8 image of the window center +- half."""
    cx, cy, half = (float(v) for v in view)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = background
    scale = size / (2 * half)
    ox, oy = cx - half, cy - half
    # Python floats and math.floor/ceil: the same pixels as numpy's, several times faster per
    # rectangle (closed-loop evaluation renders three cameras per step of every episode).
    for x0, y0, x1, y1, color in prims:
        px0, px1 = math.floor((float(x0) - ox) * scale), math.ceil((float(x1) - ox) * scale)
        py0, py1 = math.floor((float(y0) - oy) * scale), math.ceil((float(y1) - oy) * scale)
        if px1 <= 0 or py1 <= 0 or px0 >= size or py0 >= size:
            continue
        img[max(py0, 0) : min(py1, size), max(px0, 0) : min(px1, size)] = color
    return img


def camera_views(w) -> list[tuple[float, float, float, bool]]:
    """(center x, center y, half width, image rotated 180 degrees) of head_cam_h, wrist_cam_l, wrist_cam_r."""

    views = [(0.5, 0.5, 0.5, False)]
    for arm in (LEFT, RIGHT):
        x, y, z = w.q[arm : arm + 3]
        # turned around: the left wrist sees the scene rotated
        turned = arm == LEFT and w.task.scene_family == "rack" and w.q[LEFT + 3] > 0.6
        views.append((x, y, 0.12 + 0.6 * z, bool(turned)))
    return views


def render_views(w) -> list[np.ndarray]:
    """head_cam_h, wrist_cam_l, wrist_cam_r."""

    size = w.image_size
    prims = scene_primitives(w)
    (head, *wrists) = camera_views(w)
    images = [draw(size, head[:3], prims)]
    for arm, (x, y, half, turned) in zip((LEFT, RIGHT), wrists):
        img = draw(size, (x, y, half), prims, background=(70, 70, 74))
        # claw fingers at the edges: open = at the border, closed = meeting in the middle
        gap = size // 2 - 2 if w.q[arm + 7] <= 0.5 else 3
        f = max(size // 16, 1)
        mid = size // 2
        img[mid - f : mid + f, max(mid - gap - f, 0) : mid - gap] = COLORS["finger"]
        img[mid - f : mid + f, mid + gap : min(mid + gap + f, size)] = COLORS["finger"]
        if turned:
            img = img[::-1, ::-1].copy()
        images.append(img)
    return images
