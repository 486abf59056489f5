"""Realistic synthetic Kuavo ROS1 bags, for tests and for trying the converter without a robot.

A bag holds what a Kuavo 4 Pro recording holds, with the same topics, message
types and units: `/sensors_data_raw` (28 joints in radians, 100 Hz),
`/joint_cmd`, `/kuavo_arm_traj` (14 arm targets in DEGREES), the state and
command topics of one hand kind, JPEG cameras at about 30 Hz with jitter and
transport latency, optional 16-bit PNG depth, and for the walking task the
`_synced` arm trajectory, the base pose target and pauses of `/kuavo_arm_traj`
while walking. Joint trajectories are smooth scripted manipulation sequences
that differ per task and per seed, and the images are drawn from the arm and
object positions so a policy can learn from them.

`defect` writes the bags a converter must refuse: "truncated" (cut file),
"missing_topic" (no hand state topic), "too_short" (2 camera frames),
"stamps_out_of_order" (header stamps going back on the head camera).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kuavo_train.data.rosbag.topic_map import HAND_DEFAULTS, TopicMap

DEFECTS = ("truncated", "missing_topic", "too_short", "stamps_out_of_order", "late_hand_state", "camera_stall",
           "raw_image", "hand_command_stops")
LATE_S = 1.0  # late_hand_state: the hand state starts this long after the first camera frame; camera_stall: the
# left wrist camera sends nothing for this long from the middle of the recording; hand_command_stops: the
# hand command's last message is this long after the first camera frame (a command sent on change)
CAMERA_RATE_HZ = 30.0
SENSOR_RATE_HZ = 100.0
COMMAND_RATE_HZ = 50.0
STATE_LAG_S = 0.08  # the measured joints follow the command with this delay
MARGIN_S = 0.3  # sensor streams start before the first and end after the last camera frame

_DEFAULTS = TopicMap()
CAMERA_TOPICS = {c.name: c.topic for c in _DEFAULTS.cameras}
DEPTH_TOPICS = {c.name: d.topic for c, d in zip(_DEFAULTS.cameras, _DEFAULTS.depth.cameras)}  # head_cam_h -> /cam_h/depth/...
TASK_STYLE = {  # background color (RGB) and scene family per task
    "task1_moving_grasp": ((150, 120, 90), "conveyor"),
    "task2_weighing": ((120, 140, 100), "conveyor"),
    "task3_placement": ((110, 110, 130), "bottles"),
    "task4_sorting": ((90, 120, 150), "rack"),
}


@dataclass(frozen=True)
class SyntheticBag:
    """What was written, for checks: receive stamps (s) and the arm command the converter should read."""

    path: Path
    task: str
    hand_kind: str
    only_arm: bool
    defect: str | None
    head_stamps: np.ndarray  # receive times of the head camera messages
    arm_stamps: np.ndarray  # receive times of the arm command topic the converter uses
    arm_deg: np.ndarray  # (n, 14) its positions, degrees
    missing_topic: str | None = None


# ---------------------------------------------------------------- motion script
# Arm pose <-> where its gripper is drawn: shoulder pitch (joint 1) moves it up and down the
# image, wrist yaw (joint 6) left and right; the other joints move along for realism.
HOME_L = np.array([0.0, 0.25, 0.0, -0.5, 0.0, -0.1, 0.0])
HOME_R = np.array([0.0, -0.25, 0.0, -0.5, 0.0, 0.1, 0.0])


def _reach(side: str, u: float, v: float) -> np.ndarray:
    """A 7-joint arm pose whose drawn gripper lands at image point (u, v) in [0, 1]^2."""
    sign = 1.0 if side == "l" else -1.0
    return np.array([-1.6 * (0.85 - v), sign * (0.15 + 0.4 * abs(u - 0.5)), 0.1 * sign, -0.5 - 0.6 * (0.85 - v),
                     0.0, 0.5 * (u - 0.5), 0.0])


def _ee_uv(q: np.ndarray) -> tuple[float, float]:
    """Where the drawn gripper of an arm pose is (the inverse of `_reach`)."""
    return float(np.clip(0.5 + q[5] / 0.5, 0.02, 0.98)), float(np.clip(0.85 + q[0] / 1.6, 0.05, 0.95))


def _script(task: str, rng: np.random.Generator) -> tuple[list[tuple], np.ndarray]:
    """Keyframes (phase in [0, 1], left pose, right pose, left grip, right grip, base x/y/yaw, walking),
    and the object's image position."""
    obj = np.array([0.45 + 0.15 * rng.random(), 0.55 + 0.1 * rng.random()])
    tgt1 = (0.7 + 0.1 * rng.random(), 0.35 + 0.1 * rng.random())
    tgt2 = (0.55 + 0.1 * rng.random(), 0.25 + 0.1 * rng.random())
    hl, hr, base0 = HOME_L, HOME_R, np.zeros(3)
    if task in ("task1_moving_grasp", "task2_weighing"):
        above = (obj[0], obj[1] - 0.15)
        mid = tgt1 if task == "task1_moving_grasp" else (0.8, 0.5)  # task 2: the scale on the right
        k = [(0.0, hl, hr, 0, 0), (0.15, hl, _reach("r", *above), 0, 0), (0.25, hl, _reach("r", *obj), 0, 0),
             (0.32, hl, _reach("r", *obj), 0, 1), (0.45, hl, _reach("r", *mid), 0, 1), (0.52, hl, _reach("r", *mid), 0, 0),
             (0.6, hl, _reach("r", *mid), 0, 1), (0.75, hl, _reach("r", *tgt2), 0, 1), (0.82, hl, _reach("r", *tgt2), 0, 0),
             (1.0, hl, hr, 0, 0)]
        return [(*x, base0, False) for x in k], obj
    if task == "task3_placement":
        over = (0.5, 0.45)  # hand-over point
        k = [(0.0, hl, hr, 0, 0), (0.15, _reach("l", *obj), hr, 0, 0), (0.22, _reach("l", *obj), hr, 1, 0),
             (0.4, _reach("l", *over), _reach("r", *over), 1, 0), (0.47, _reach("l", *over), _reach("r", *over), 1, 1),
             (0.53, _reach("l", *over), _reach("r", *over), 0, 1), (0.75, hl, _reach("r", *tgt1), 0, 1),
             (0.82, hl, _reach("r", *tgt1), 0, 0), (1.0, hl, hr, 0, 0)]
        return [(*x, base0, False) for x in k], obj
    if task == "task4_sorting":
        rack = np.array([1.0 + 0.3 * rng.random(), 0.2 * rng.random(), 0.0])
        place = np.array([rack[0] + 0.5, rack[1] - 0.8, np.pi])
        k = [(0.0, hl, hr, 0, 0, base0, False), (0.06, hl, hr, 0, 0, base0, True), (0.24, hl, hr, 0, 0, rack, True),
             (0.3, hl, _reach("r", *obj), 0, 0, rack, False), (0.36, hl, _reach("r", *obj), 0, 1, rack, False),
             (0.45, hl, hr, 0, 1, rack, False), (0.5, hl, hr, 0, 1, rack, True), (0.7, hl, hr, 0, 1, place, True),
             (0.8, hl, _reach("r", *tgt1), 0, 1, place, False), (0.88, hl, _reach("r", *tgt1), 0, 0, place, False),
             (1.0, hl, hr, 0, 0, place, False)]
        return k, obj
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASK_STYLE)})")


def _smooth(s: np.ndarray) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(s, 0.0, 1.0))


class _Motion:
    """Smooth joint, grip and base trajectories of one scripted episode, as functions of time."""

    def __init__(self, task: str, rng: np.random.Generator, t_start: float, duration: float):
        keys, self.obj = _script(task, rng)
        self.t_start, self.duration = t_start, duration
        self.phases = np.array([k[0] for k in keys])
        self.arm_keys = np.array([np.concatenate([k[1], k[2]]) for k in keys])
        self.grip_keys = np.array([[k[3], k[4]] for k in keys], dtype=np.float64)
        self.base_keys = np.array([k[5] for k in keys], dtype=np.float64)
        self.walk_keys = np.array([k[6] for k in keys], dtype=bool)
        self.wobble_phase = rng.uniform(0, 2 * np.pi, size=14)
        self.wobble_freq = rng.uniform(0.2, 0.6, size=14)

    def _segment(self, t) -> tuple[np.ndarray, np.ndarray]:
        s = np.clip((np.atleast_1d(np.asarray(t, dtype=np.float64)) - self.t_start) / self.duration, 0.0, 1.0)
        i = np.clip(np.searchsorted(self.phases, s, side="right") - 1, 0, len(self.phases) - 2)
        return i, _smooth((s - self.phases[i]) / (self.phases[i + 1] - self.phases[i]))[:, None]

    def _interp(self, t, vals: np.ndarray) -> np.ndarray:
        i, w = self._segment(t)
        return vals[i] * (1 - w) + vals[i + 1] * w

    def arm(self, t) -> np.ndarray:
        """(n, 14) arm command in radians."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        wobble = 0.02 * np.sin(2 * np.pi * self.wobble_freq * (t[:, None] - self.t_start) + self.wobble_phase)
        return self._interp(t, self.arm_keys) + wobble

    def grip(self, t) -> np.ndarray:
        """(n, 2) grip closure in [0, 1] (left, right)."""
        return np.clip(self._interp(t, self.grip_keys), 0.0, 1.0)

    def base(self, t) -> np.ndarray:
        """(n, 3) base pose target x, y, yaw."""
        return self._interp(t, self.base_keys)

    def walking(self, t) -> np.ndarray:
        i, _ = self._segment(t)
        return self.walk_keys[i]


# ---------------------------------------------------------------- images
def _disc(img: np.ndarray, u: float, v: float, r: float, color) -> None:
    """A filled circle at image point (u, v) in [0, 1]^2, radius r in image widths (sub-pixel)."""
    import cv2

    h, w = img.shape[:2]
    cv2.circle(img, (int(u * w * 16), int(v * h * 16)), max(int(r * w * 16), 16), tuple(int(c) for c in color), -1,
               lineType=cv2.LINE_8, shift=4)


def _box(img: np.ndarray, u0: float, v0: float, u1: float, v1: float, color) -> None:
    h, w = img.shape[:2]
    x0, x1 = sorted((int(round(u0 * w)), int(round(u1 * w))))
    y0, y1 = sorted((int(round(v0 * h)), int(round(v1 * h))))
    img[max(y0, 0):max(min(y1, h), 0), max(x0, 0):max(min(x1, w), 0)] = color


class _Scene:
    """Draws the head and wrist views from the arm poses, grips and the carried object."""

    def __init__(self, task: str, rng: np.random.Generator, size: tuple[int, int], obj: np.ndarray):
        self.task = task
        self.bg, self.family = TASK_STYLE[task]
        self.w, self.h = size
        self.obj_color = tuple(int(c) for c in rng.integers(30, 255, size=3))
        self.obj = np.array(obj, dtype=np.float64)
        self.held_by: int | None = None

    def update_object(self, ee: list[tuple[float, float]], grip: np.ndarray, conveyor_shift: float) -> None:
        for side in (0, 1):
            near = np.hypot(*(np.array(ee[side]) - self.obj)) < 0.2
            if self.held_by is None and grip[side] > 0.6 and near:
                self.held_by = side
        if self.held_by is not None:
            if grip[self.held_by] < 0.4:
                self.held_by = None
            else:
                self.obj = np.array(ee[self.held_by])
        elif self.family == "conveyor":
            self.obj[0] = (self.obj[0] + conveyor_shift) % 1.0

    def head(self, ee, grip, base: np.ndarray) -> np.ndarray:
        img = np.empty((self.h, self.w, 3), np.uint8)
        img[:] = self.bg
        scroll = (0.3 * base[0] + 0.15 * base[2]) % 1.0  # the world slides by while walking
        if self.family == "conveyor":
            _box(img, 0.0, 0.5, 1.0, 0.7, (60, 60, 60))
        elif self.family == "bottles":
            _box(img, 0.6, 0.2, 0.95, 0.45, (220, 200, 40))
        else:
            for k in range(3):
                x = (k / 3 + scroll) % 1.0
                _box(img, x, 0.1, x + 0.08, 0.5, (150, 100, 60))
        if self.held_by is None:
            _disc(img, *self.obj, 0.06, self.obj_color)
        for side, color in ((0, (230, 60, 60)), (1, (60, 60, 230))):
            u, v = ee[side]
            _disc(img, u, v, 0.05 + 0.03 * (1 - grip[side]), color)
            _disc(img, u, v, 0.02, (255, 255, 255))
        if self.held_by is not None:  # the carried object, in the gripper
            _disc(img, *self.obj, 0.04, self.obj_color)
        return img

    def wrist(self, side: int, ee, grip) -> np.ndarray:
        img = np.empty((self.h, self.w, 3), np.uint8)
        img[:] = tuple(int(0.6 * c) for c in self.bg)
        rel = (self.obj - np.array(ee[side])) * 2.5 + 0.5
        _disc(img, rel[0], rel[1], 0.15, self.obj_color)
        gap = 0.05 + 0.3 * (1 - grip[side])
        _box(img, 0.5 - gap - 0.06, 0.55, 0.5 - gap, 1.0, (200, 200, 200))
        _box(img, 0.5 + gap, 0.55, 0.5 + gap + 0.06, 1.0, (200, 200, 200))
        return img

    def depth(self, rgb: np.ndarray) -> np.ndarray:
        """uint16 millimetres: a plane at ~1 m, brighter (nearer) where things are drawn."""
        h, w = rgb.shape[:2]
        plane = 900 + 300 * np.linspace(0, 1, h, dtype=np.float64)[:, None] * np.ones((1, w))
        near = (np.abs(rgb.astype(np.int16) - np.array(self.bg, np.int16)).sum(-1) > 30)
        return np.where(near, plane - 350, plane).astype(np.uint16)


# ---------------------------------------------------------------- writing
class _Out:
    """Collects serialized messages and writes them in receive-time order, like `rosbag record`."""

    def __init__(self, path: Path):
        from rosbags.rosbag1 import Writer

        from kuavo_train.data.rosbag.types import kuavo_typestore

        self.store = kuavo_typestore()
        self.T = self.store.types
        self.writer = Writer(path)
        self.writer.open()
        self.conns: dict[str, object] = {}
        self.msgs: list[tuple[int, int, str, bytes]] = []
        self.seq: dict[str, int] = {}

    def header(self, topic: str, t: float, frame: str = ""):
        ns = int(round(t * 1e9))
        self.seq[topic] = self.seq.get(topic, -1) + 1
        return self.T["std_msgs/msg/Header"](seq=self.seq[topic], stamp=self.T["builtin_interfaces/msg/Time"](
            sec=ns // 10**9, nanosec=ns % 10**9), frame_id=frame)

    def put(self, topic: str, msgtype: str, recv_t: float, msg) -> None:
        if topic not in self.conns:
            self.conns[topic] = self.writer.add_connection(topic, msgtype, typestore=self.store)
        self.msgs.append((int(round(recv_t * 1e9)), len(self.msgs), topic, self.store.serialize_ros1(msg, msgtype)))

    def close(self) -> None:
        for ns, _, topic, data in sorted(self.msgs):
            self.writer.write(self.conns[topic], ns, data)
        self.writer.close()


def _jpeg(rgb: np.ndarray) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.reshape(-1).astype(np.uint8)


def _compressed_depth(depth_mm: np.ndarray) -> np.ndarray:
    """compressed_depth_image_transport's layout: a 12-byte config header, then a 16-bit PNG."""
    import cv2

    ok, png = cv2.imencode(".png", depth_mm)
    assert ok
    return np.concatenate([np.zeros(12, np.uint8), png.reshape(-1).astype(np.uint8)])


def _hand_messages(out: _Out, kind: str, recv_t: float, t: float, grip_state: np.ndarray, grip_cmd: np.ndarray,
                   skip_state: bool, skip_command: bool = False) -> None:
    T = out.T
    d = HAND_DEFAULTS[kind]
    names = ["left_claw", "right_claw"]
    if kind == "leju_claw":
        if not skip_state:
            data = T["kuavo_msgs/msg/endEffectorData"](name=names, position=grip_state * 100.0, velocity=np.zeros(2), effort=np.zeros(2))
            out.put(d["state_topic"], "kuavo_msgs/msg/lejuClawState", recv_t, T["kuavo_msgs/msg/lejuClawState"](
                header=out.header(d["state_topic"], t), state=np.array([2, 2], np.int8), data=data))
        if not skip_command:
            data = T["kuavo_msgs/msg/endEffectorData"](name=names, position=grip_cmd * 100.0, velocity=np.full(2, 50.0),
                                                       effort=np.full(2, 1.0))
            out.put(d["action_topic"], "kuavo_msgs/msg/lejuClawCommand", recv_t, T["kuavo_msgs/msg/lejuClawCommand"](
                header=out.header(d["action_topic"], t), data=data))
    elif kind == "rq2f85":
        js = T["sensor_msgs/msg/JointState"]
        gnames = ["left_gripper_joint", "right_gripper_joint"]
        if not skip_state:
            out.put(d["state_topic"], "sensor_msgs/msg/JointState", recv_t, js(
                header=out.header(d["state_topic"], t), name=gnames, position=grip_state * 0.8, velocity=np.zeros(2), effort=np.zeros(2)))
        out.put(d["action_topic"], "sensor_msgs/msg/JointState", recv_t, js(
            header=out.header(d["action_topic"], t), name=gnames, position=np.round(grip_cmd * 255.0), velocity=np.zeros(0), effort=np.zeros(0)))
    else:  # dexhand: 6 fingers per hand, the thumb rotation held at 100 like the reference's teleoperation
        def fingers(g):
            return np.array([g, 1.0, g, g, g, g]) * 100.0

        if not skip_state:
            pos = np.concatenate([fingers(grip_state[0]), fingers(grip_state[1])])
            out.put(d["state_topic"], "sensor_msgs/msg/JointState", recv_t, T["sensor_msgs/msg/JointState"](
                header=out.header(d["state_topic"], t), name=[f"{s}_qiangnao_{i}" for s in ("left", "right") for i in range(1, 7)],
                position=pos, velocity=np.zeros(12), effort=np.zeros(12)))
        out.put(d["action_topic"], "kuavo_msgs/msg/robotHandPosition", recv_t, T["kuavo_msgs/msg/robotHandPosition"](
            header=out.header(d["action_topic"], t), left_hand_position=np.round(fingers(grip_cmd[0])).astype(np.uint8),
            right_hand_position=np.round(fingers(grip_cmd[1])).astype(np.uint8)))


def write_synthetic_bag(path, *, task: str, hand_kind: str, only_arm: bool, n_frames: int,
                        cameras=("head_cam_h", "wrist_cam_l", "wrist_cam_r"), seed: int = 0,
                        image_size: tuple[int, int] = (64, 48), defect: str | None = None,
                        depth: bool = False) -> SyntheticBag:
    """Write one Kuavo recording of `task` with `n_frames` head-camera frames (~30 Hz).

    `image_size` is (width, height). The same arguments always give the same bag.
    """
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r} (known: {', '.join(DEFECTS)})")
    if hand_kind == "qiangnao":
        hand_kind = "dexhand"
    if hand_kind not in HAND_DEFAULTS:
        raise ValueError(f"unknown hand kind {hand_kind!r} (known: {', '.join(HAND_DEFAULTS)})")
    unknown = [c for c in cameras if c not in CAMERA_TOPICS]
    if unknown or "head_cam_h" not in cameras:
        raise ValueError(f"cameras must include head_cam_h and come from {list(CAMERA_TOPICS)} (got {list(cameras)})")
    if defect == "too_short":
        n_frames = 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, sorted(TASK_STYLE).index(task) if task in TASK_STYLE else 99])
    t0 = 1_700_000_000.0 + 100.0 * seed + rng.random()
    duration = n_frames / CAMERA_RATE_HZ
    motion = _Motion(task, rng, t0 + MARGIN_S, duration)
    conveyor_shift = 0.004  # image widths per frame; the object arrives where the arm grasps
    start_obj = motion.obj - ([conveyor_shift * 0.3 * n_frames, 0.0] if TASK_STYLE[task][1] == "conveyor" else 0.0)
    scene = _Scene(task, rng, image_size, start_obj % 1.0)
    out = _Out(path)
    T = out.T
    t_end = t0 + 2 * MARGIN_S + duration
    missing = HAND_DEFAULTS[hand_kind]["state_topic"] if defect == "missing_topic" else None

    # joints at 100 Hz: measured state (lags the command) and the whole-body joint command
    ts = np.arange(t0, t_end, 1.0 / SENSOR_RATE_HZ)
    legs = 0.05 * np.sin(np.linspace(0, 4 * np.pi, 12))
    head = np.array([0.0, 0.1])
    arm_state = motion.arm(ts - STATE_LAG_S) + rng.normal(0, 0.002, (len(ts), 14))
    arm_cmd = motion.arm(ts)
    arm_vel = (arm_cmd - motion.arm(ts - 0.01)) / 0.01
    vec3, quat = T["geometry_msgs/msg/Vector3"], T["geometry_msgs/msg/Quaternion"]
    zero3 = vec3(x=0.0, y=0.0, z=0.0)
    imu = T["kuavo_msgs/msg/imuData"](gyro=zero3, acc=vec3(x=0.0, y=0.0, z=9.81), free_acc=zero3, quat=quat(x=0.0, y=0.0, z=0.0, w=1.0))
    no_ee = T["kuavo_msgs/msg/endEffectorData"](name=[], position=np.zeros(0), velocity=np.zeros(0), effort=np.zeros(0))
    z28 = np.zeros(28)
    for k, t in enumerate(ts):
        header = out.header("/sensors_data_raw", t)
        joints = T["kuavo_msgs/msg/jointData"](joint_q=np.concatenate([legs, arm_state[k], head]),
                                              joint_v=np.concatenate([np.zeros(12), arm_vel[k], np.zeros(2)]), joint_vd=z28, joint_torque=z28)
        out.put("/sensors_data_raw", "kuavo_msgs/msg/sensorsData", t + 0.001, T["kuavo_msgs/msg/sensorsData"](
            header=header, sensor_time=header.stamp, joint_data=joints, imu_data=imu, end_effector_data=no_ee))
        out.put("/joint_cmd", "kuavo_msgs/msg/jointCmd", t + 0.001, T["kuavo_msgs/msg/jointCmd"](
            header=out.header("/joint_cmd", t), joint_q=np.concatenate([legs, arm_cmd[k], head]), joint_v=z28, tau=z28,
            tau_max=z28, tau_ratio=z28, joint_kp=z28, joint_kd=z28, control_modes=np.full(28, 2, np.int32)))

    # commands at 50 Hz: arm trajectory in degrees (paused while walking), hand, base
    tc = np.arange(t0, t_end, 1.0 / COMMAND_RATE_HZ)
    arm_names = [f"zarm_{s}{i}_joint" for s in ("l", "r") for i in range(1, 8)]
    js = T["sensor_msgs/msg/JointState"]
    walking = motion.walking(tc) & (not only_arm)
    deg_all = np.rad2deg(motion.arm(tc))
    grip_state, grip_cmd, base = motion.grip(tc - STATE_LAG_S), motion.grip(tc), motion.base(tc)
    recv_c = tc + 0.002
    for k, t in enumerate(tc):
        if not walking[k]:
            out.put("/kuavo_arm_traj", "sensor_msgs/msg/JointState", recv_c[k], js(
                header=out.header("/kuavo_arm_traj", t), name=arm_names, position=deg_all[k], velocity=np.zeros(0), effort=np.zeros(0)))
        if not only_arm:
            out.put("/kuavo_arm_traj_synced", "sensor_msgs/msg/JointState", recv_c[k], js(
                header=out.header("/kuavo_arm_traj_synced", t), name=arm_names, position=deg_all[k], velocity=np.zeros(0), effort=np.zeros(0)))
            x, y, yaw = base[k]
            twist = T["geometry_msgs/msg/Twist"](linear=vec3(x=x, y=y, z=0.0), angular=vec3(x=0.0, y=0.0, z=yaw))
            out.put("/cmd_pose_world_synced", "geometry_msgs/msg/TwistStamped", recv_c[k], T["geometry_msgs/msg/TwistStamped"](
                header=out.header("/cmd_pose_world_synced", t), twist=twist))
        late = defect == "late_hand_state" and t < t0 + MARGIN_S + LATE_S
        stopped = defect == "hand_command_stops" and t > t0 + MARGIN_S + LATE_S
        _hand_messages(out, hand_kind, recv_c[k], t, grip_state[k], grip_cmd[k], skip_state=missing is not None or late,
                       skip_command=stopped)

    # cameras at ~30 Hz with jitter and transport latency; images follow the measured arm
    cam_ci = T["sensor_msgs/msg/CompressedImage"]
    head_recv = []
    t_nom = t0 + MARGIN_S + np.arange(n_frames) / CAMERA_RATE_HZ
    q_seen, grip_seen, base_seen = motion.arm(t_nom - STATE_LAG_S), motion.grip(t_nom - STATE_LAG_S), motion.base(t_nom)
    for i in range(n_frames):
        ee = [_ee_uv(q_seen[i, :7]), _ee_uv(q_seen[i, 7:])]
        scene.update_object(ee, grip_seen[i], conveyor_shift)
        images = {"head_cam_h": scene.head(ee, grip_seen[i], base_seen[i]),
                  "wrist_cam_l": scene.wrist(0, ee, grip_seen[i]), "wrist_cam_r": scene.wrist(1, ee, grip_seen[i])}
        for k, cam in enumerate(cameras):
            stamp = t_nom[i] + 0.003 * k + rng.normal(0, 0.002)
            if defect == "camera_stall" and cam == "wrist_cam_l" and 0 <= t_nom[i] - t_nom[n_frames // 2] < LATE_S:
                continue
            if defect == "stamps_out_of_order" and cam == "head_cam_h" and i == n_frames // 2:
                stamp -= 3.0 / CAMERA_RATE_HZ  # the driver's clock jumped back three frames
            recv = t_nom[i] + 0.003 * k + 0.012 + 0.004 * rng.random()
            topic = CAMERA_TOPICS[cam]
            if defect == "raw_image" and cam == "wrist_cam_r":  # a raw camera topic recorded by mistake
                img = images[cam]
                out.put(topic, "sensor_msgs/msg/Image", recv, T["sensor_msgs/msg/Image"](
                    header=out.header(topic, stamp), height=img.shape[0], width=img.shape[1], encoding="rgb8",
                    is_bigendian=0, step=img.shape[1] * 3, data=np.ascontiguousarray(img).reshape(-1)))
                continue
            out.put(topic, "sensor_msgs/msg/CompressedImage", recv, cam_ci(
                header=out.header(topic, stamp, frame=f"{cam}_optical_frame"), format="rgb8; jpeg compressed bgr8",
                data=_jpeg(images[cam])))
            if depth:
                dtopic = DEPTH_TOPICS[cam]
                out.put(dtopic, "sensor_msgs/msg/CompressedImage", recv + 0.001, cam_ci(
                    header=out.header(dtopic, stamp), format="16UC1; compressedDepth png",
                    data=_compressed_depth(scene.depth(images[cam]))))
            if cam == "head_cam_h":
                head_recv.append(recv)
    out.close()

    if defect == "truncated":
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.truncate(int(size * 0.6))
    # the converter reads the _synced copy when there is one (task 4), else /kuavo_arm_traj
    keep = np.ones(len(tc), bool) if not only_arm else ~walking
    return SyntheticBag(path=path, task=task, hand_kind=hand_kind, only_arm=only_arm, defect=defect,
                        head_stamps=np.array(head_recv), arm_stamps=recv_c[keep], arm_deg=deg_all[keep], missing_topic=missing)
