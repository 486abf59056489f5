"""Which Kuavo topics become which LeRobot features, and how.

Every default is the one of Leju's own converter (kuavo_data_challenge:
`kuavo_data/CvtRosbag2Lerobot.py`, `kuavo_data/common/kuavo_dataset.py`,
`kuavo_data/common/chunk_process.py`, `configs/data/KuavoRosbag2Lerobot.yaml`),
so that a dataset converted here matches one converted there. The documented
copy of these defaults is `configs/data/kuavo_rosbag.yaml`; a map file only
needs the keys it changes.

A bad map is one `RosbagError` line naming the field and the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from kuavo_train.errors import KuavoError, first_line

DEFAULT_MAP_FILE = Path(__file__).resolve().parents[3] / "configs" / "data" / "kuavo_rosbag.yaml"

HandKind = Literal["leju_claw", "rq2f85", "dexhand"]


class RosbagError(KuavoError):
    """Bad input to the rosbag converter; `str()` is the one line shown to the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraSpec(_Strict):
    """One image stream: `name` is the feature suffix (the rename), `topic` the bag topic."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$")
    topic: str = Field(min_length=2, pattern=r"^/")


class ArmSpec(_Strict):
    """Arm joints: state from the measured joints, action from the arm trajectory command."""

    state_topic: str = "/sensors_data_raw"
    # kuavo_msgs/sensorsData: 28 joints = 12 leg, 14 arm (7 left, 7 right), 2 head; radians.
    state_field: str = "joint_data.joint_q"
    left: tuple[int, int] = (12, 19)
    right: tuple[int, int] = (19, 26)
    # sensor_msgs/JointState.position (14 arm joints). The first topic present in a bag is used:
    # the reference prefers the gap-free `_synced` copy (written for task 4) over the raw command.
    action_topics: list[str] = Field(default_factory=lambda: ["/kuavo_arm_traj_synced", "/kuavo_arm_traj"], min_length=1)
    action_field: str = "position"
    # The reference reads /kuavo_arm_traj in degrees and converts with np.deg2rad.
    action_in_degrees: bool = True

    @model_validator(mode="after")
    def _seven_each(self) -> ArmSpec:
        for side in ("left", "right"):
            lo, hi = getattr(self, side)
            if lo < 0 or hi - lo != 7:
                raise ValueError(f"{side}: must be [first, last) of 7 joints, e.g. [12, 19] (got [{lo}, {hi}])")
        return self


# Per hand kind, as in the reference: topic, the fields concatenated into one vector, the index
# of the left and right value in it, the divisor to [0, 1], and the thresholds of `binary`.
HAND_DEFAULTS: dict[str, dict] = {
    "leju_claw": {  # Kuavo 4 Pro's two-finger claw, 0..100
        "state_topic": "/leju_claw_state", "state_fields": ["data.position"], "state_index": (0, 1), "state_divisor": 100.0,
        "action_topic": "/leju_claw_command", "action_fields": ["data.position"], "action_index": (0, 1), "action_divisor": 100.0,
        "binary_state_threshold": 50.0, "binary_action_threshold": 50.0,
    },
    "rq2f85": {  # Robotiq 2F-85 in the simulator: state 0..0.8 rad, command 0..255
        "state_topic": "/gripper/state", "state_fields": ["position"], "state_index": (0, 1), "state_divisor": 0.8,
        "action_topic": "/gripper/command", "action_fields": ["position"], "action_index": (0, 1), "action_divisor": 255.0,
        "binary_state_threshold": 0.4, "binary_action_threshold": 70.0,
    },
    "dexhand": {  # dexterous hand ("qiangnao"), 6 fingers per hand 0..100; the first finger is the gripper value
        "state_topic": "/dexhand/state", "state_fields": ["position"], "state_index": (0, 6), "state_divisor": 100.0,
        "action_topic": "/control_robot_hand_position", "action_fields": ["left_hand_position", "right_hand_position"],
        "action_index": (0, 6), "action_divisor": 100.0,
        "binary_state_threshold": 50.0, "binary_action_threshold": 50.0,
    },
}


class HandSpec(_Strict):
    """One gripper value per hand for state and action; unset fields take the kind's defaults."""

    kind: HandKind = "rq2f85"
    state_topic: str | None = None
    state_fields: list[str] | None = None
    state_index: tuple[int, int] | None = None
    state_divisor: float | None = None
    action_topic: str | None = None
    action_fields: list[str] | None = None
    action_index: tuple[int, int] | None = None
    action_divisor: float | None = None
    # Reference `is_binary`: 1 above the threshold (on the raw value), else 0.
    binary: bool = False
    binary_state_threshold: float | None = None
    binary_action_threshold: float | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _alias(cls, v):
        return "dexhand" if v == "qiangnao" else v  # the reference's name for the dexterous hand

    @field_validator("state_divisor", "action_divisor")
    @classmethod
    def _nonzero(cls, v):
        if v is not None and v == 0:
            raise ValueError("must not be 0")
        return v

    def resolved(self) -> HandSpec:
        """A copy with every unset field filled from the kind's defaults."""
        base = HAND_DEFAULTS[self.kind]
        return self.model_copy(update={k: v for k, v in base.items() if getattr(self, k) is None})


class BaseSpec(_Strict):
    """Walking (only_arm: false): target base pose and the 'base is moving' flag."""

    # geometry_msgs/TwistStamped (a plain Twist works too) used as a world pose target:
    # linear.x, linear.y, angular.z -> cmd_pos_x, cmd_pos_y, cmd_pos_yaw.
    topic: str = "/cmd_pose_world_synced"
    # ctrl_change_cmd = 1 at frames inside a gap of this topic (no arm command while walking).
    gap_topic: str = "/kuavo_arm_traj"
    # A gap is a pause longer than this; null = the reference's 0.15 * 10 / fps seconds.
    gap_threshold_s: float | None = Field(default=None, gt=0)
    # Arm action inside a gap when the arm action comes from gap_topic itself (no _synced copy).
    # null (default) keeps the nearest command; the reference writes the flag value 999 into the
    # arm dims (set 999.0 for its datasets), which ctrl_change_cmd already carries here, and 999
    # in the arm dims would swamp their normalization statistics (every task shares them).
    gap_arm_fill: float | None = None


class DepthSpec(_Strict):
    """Depth as 3-channel uint8 video (opt-in, as the reference stores it)."""

    enabled: bool = False
    # Clip to this range (mm), then min-max normalise each frame to 0..255.
    range_mm: tuple[float, float] = (0.0, 1500.0)
    cameras: list[CameraSpec] = Field(default_factory=lambda: [
        CameraSpec(name="depth_h", topic="/cam_h/depth/image_raw/compressedDepth"),
        CameraSpec(name="depth_l", topic="/cam_l/depth/image_rect_raw/compressedDepth"),
        CameraSpec(name="depth_r", topic="/cam_r/depth/image_rect_raw/compressedDepth"),
    ])

    @model_validator(mode="after")
    def _range(self) -> DepthSpec:
        if not self.range_mm[0] < self.range_mm[1]:
            raise ValueError(f"range_mm: must be [low, high] with low < high (got {list(self.range_mm)})")
        return self


class SplitSpec(_Strict):
    """Held-out episodes (the last ones, in bag order); the reference writes no split."""

    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    val_episodes: int | None = Field(default=None, ge=0)  # a count; overrides val_fraction


def _default_cameras() -> list[CameraSpec]:
    return [
        CameraSpec(name="head_cam_h", topic="/cam_h/color/image_raw/compressed"),
        CameraSpec(name="wrist_cam_l", topic="/cam_l/color/image_raw/compressed"),
        CameraSpec(name="wrist_cam_r", topic="/cam_r/color/image_raw/compressed"),
    ]


class TopicMap(_Strict):
    fps: int = Field(default=10, gt=0)  # reference train_hz
    main_camera: str = "head_cam_h"  # frames are aligned on this camera's messages
    main_camera_fps: int = Field(default=30, gt=0)  # every (main_camera_fps // fps)-th main frame is kept
    # Main-camera messages dropped at each end BEFORE downsampling (raw frames, not output frames).
    sample_drop: int = Field(default=10, ge=0)
    instruction: str | None = None  # the task string; `--instruction` overrides it
    robot_type: str = "kuavo4pro"
    only_arm: bool = True  # false appends cmd_pos_x, cmd_pos_y, cmd_pos_yaw, ctrl_change_cmd to the action
    # receive = the time the recorder got the message (the reference); header = header.stamp.
    stamp_source: Literal["receive", "header"] = "receive"
    # A bag whose header stamps go back by more than this (seconds) on a topic is rejected; null = no check.
    stamp_order_tolerance_s: float | None = Field(default=0.005, ge=0)
    # [width, height] every image is resized to (reference: 640x480); null keeps the recorded size.
    image_size: tuple[int, int] | None = (640, 480)
    cameras: list[CameraSpec] = Field(default_factory=_default_cameras, min_length=1)
    arm: ArmSpec = Field(default_factory=ArmSpec)
    hand: HandSpec = Field(default_factory=HandSpec)
    base: BaseSpec = Field(default_factory=BaseSpec)
    depth: DepthSpec = Field(default_factory=DepthSpec)
    split: SplitSpec = Field(default_factory=SplitSpec)

    @field_validator("image_size")
    @classmethod
    def _size(cls, v):
        if v is not None and (v[0] < 8 or v[1] < 8):
            raise ValueError(f"must be [width, height], each >= 8 (got {list(v)})")
        return v

    @field_validator("instruction")
    @classmethod
    def _instruction(cls, v):
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TopicMap:
        names = [c.name for c in self.cameras] + ([c.name for c in self.depth.cameras] if self.depth.enabled else [])
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"cameras: camera name {dup[0]!r} is used twice")
        if self.main_camera not in [c.name for c in self.cameras]:
            raise ValueError(f"main_camera: {self.main_camera!r} is not one of cameras ({', '.join(c.name for c in self.cameras)})")
        if self.main_camera_fps < self.fps:
            raise ValueError(f"main_camera_fps: {self.main_camera_fps} must be >= fps ({self.fps})")
        if self.main_camera_fps % self.fps:
            # every (main_camera_fps // fps)-th frame is kept: another ratio gives another rate than fps
            raise ValueError(f"fps: {self.fps} must divide main_camera_fps ({self.main_camera_fps}): every "
                             f"{self.main_camera_fps // self.fps}-th frame would be kept, "
                             f"{self.main_camera_fps / (self.main_camera_fps // self.fps):g} per second")
        return self

    # --- derived values ---
    @property
    def jump(self) -> int:
        return self.main_camera_fps // self.fps

    @property
    def gap_threshold_s(self) -> float:
        return self.base.gap_threshold_s if self.base.gap_threshold_s is not None else 0.15 * 10 / self.fps

    @property
    def hand_resolved(self) -> HandSpec:
        return self.hand.resolved()

    def with_overrides(self, source: str = "overrides", **updates) -> TopicMap:
        """A validated copy with top-level or dotted (`split.val_fraction`) fields replaced;
        a bad value names `source` (e.g. the command-line options) in its error."""
        data = self.model_dump()
        for key, value in updates.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return parse_topic_map(data, source)


def _loc(err: dict) -> str:
    parts = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def parse_topic_map(data, source: str) -> TopicMap:
    """Validate a mapping; the first problem becomes one line naming the field and `source`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RosbagError(f"rosbag map error: {source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return TopicMap.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        loc = _loc(err)
        if err.get("type") == "value_error" and (m := re.match(r"^([a-z_]+): (.*)$", msg)):
            # whole-model checks name their field in the message
            loc, msg = (f"{loc}.{m.group(1)}" if loc else m.group(1)), m.group(2)
        got = err.get("input")
        shown = "" if err.get("type") in ("value_error", "missing") or isinstance(got, dict) else f" (got {got!r})"
        raise RosbagError(f"rosbag map error: {loc}: {msg}{shown} (in {source})") from None


def load_topic_map(path: str | Path | None = None) -> TopicMap:
    """The map from a YAML file (None: the documented defaults file, or the built-in defaults)."""
    import yaml

    if path is None:
        if not DEFAULT_MAP_FILE.is_file():
            return TopicMap()
        path = DEFAULT_MAP_FILE
    path = Path(path)
    if not path.is_file():
        raise RosbagError(f"rosbag map error: {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise RosbagError(f"rosbag map error: {path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RosbagError(f"rosbag map error: {path}: cannot read it ({exc})") from None
    return parse_topic_map(data, str(path))
