"""Kuavo ROS1 bags -> one LeRobot v3.0 dataset (one episode per bag), without ROS.

What happens to a bag follows Leju's own converter (see `topic_map.py`):

1. Read the topics of the topic map with `rosbags` (pure Python). A bag that
   cannot be opened, lacks a topic, or whose header stamps go back is refused
   with one reason; the other bags are still converted.
2. Align on the main (head) camera: drop `sample_drop` of its messages at each
   end, keep every (main_camera_fps // fps)-th one, cut the frames not earlier
   than the first topic's last message, and give every other topic the message
   nearest in time (ties: the earlier one).
3. Build state/action: arm joints (radians) + one gripper value per hand; the
   arm trajectory command converted from degrees; with `only_arm: false` the
   base pose target and the 'walking' flag appended.
4. Decode the JPEG (and optional 16-bit PNG depth) images of the chosen frames.

Steps 1-4 run per bag in a process pool (`jobs`), the decoded frames going to
.npy files in the temporary folder (not through memory); the episodes are
written in bag order in the main process with LeRobot's own writer, into that
temporary folder next to `out`, which is renamed to `out` only when everything
is done. The last episodes form the `val` split in `meta/info.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from kuavo_train.data.demo_world.tasks import JOINT_NAMES
from kuavo_train.data.rosbag.topic_map import RosbagError, TopicMap
from kuavo_train.errors import first_line
from kuavo_train.files import replace_dir, staging_dir

STATE_NAMES: tuple[str, ...] = JOINT_NAMES  # zarm_l1..zarm_l7, left_claw, zarm_r1..zarm_r7, right_claw
BASE_NAMES: tuple[str, ...] = ("cmd_pos_x", "cmd_pos_y", "cmd_pos_yaw", "ctrl_change_cmd")
META_FILE = "kuavo_rosbag.json"
_STAMP = struct.Struct("<II")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BagProblem(Exception):
    """This bag cannot be converted; `str()` is the reason shown next to its name."""


class NothingConverted(RosbagError):
    """No bag could be converted: nothing is written. `failures` says why, per bag."""

    def __init__(self, message: str, failures: list[BagFailure]):
        super().__init__(message)
        self.failures = failures


@dataclass(frozen=True)
class BagFailure:
    bag: Path
    reason: str


@dataclass(frozen=True)
class EpisodeInfo:
    bag: Path
    episode_index: int
    frames: int


@dataclass
class ConvertResult:
    out: Path
    repo_id: str
    fps: int
    episodes: list[EpisodeInfo]
    failures: list[BagFailure]
    splits: dict[str, str]
    notes: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def frames(self) -> int:
        return sum(e.frames for e in self.episodes)


@dataclass
class Episode:
    """One bag, aligned and decoded: everything `add_frame` needs (picklable: images may be files)."""

    bag: Path
    stamps: np.ndarray  # (n,) main-camera time of each frame, seconds
    state: np.ndarray  # (n, 16) float32
    action: np.ndarray  # (n, 16 or 20) float32
    images: dict[str, np.ndarray | Path]  # feature key -> (n, H, W, 3) uint8, or the .npy file holding it
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stamps)

    def frames(self, key: str) -> np.ndarray:
        """A camera's frames (memory-mapped when they were spilled to disk)."""
        v = self.images[key]
        return np.load(v, mmap_mode="r") if isinstance(v, Path) else v


def action_names(topic_map: TopicMap) -> tuple[str, ...]:
    return STATE_NAMES if topic_map.only_arm else STATE_NAMES + BASE_NAMES


def image_keys(topic_map: TopicMap) -> list[str]:
    keys = [f"observation.images.{c.name}" for c in topic_map.cameras]
    if topic_map.depth.enabled:
        keys += [f"observation.{c.name}" for c in topic_map.depth.cameras]
    return keys


def dataset_features(topic_map: TopicMap, episode: Episode, *, use_videos: bool = True) -> dict:
    """LeRobot features; image shapes come from the first converted episode."""
    def vec(names):
        return {"dtype": "float32", "shape": (len(names),), "names": list(names)}

    feats = {"observation.state": vec(STATE_NAMES), "action": vec(action_names(topic_map))}
    for key in image_keys(topic_map):
        feats[key] = {"dtype": "video" if use_videos else "image", "shape": tuple(episode.frames(key).shape[1:]),
                      "names": ["height", "width", "channels"]}
    return feats


# ---------------------------------------------------------------- reading one bag
@dataclass
class _Stream:
    """The messages of one role (arm state, a camera, ...) in receive order, kept serialized:
    only the few messages the aligned frames use are ever deserialized."""

    role: str
    topic: str
    extract: object  # msg -> value
    stamps: list[float] = field(default_factory=list)
    header_stamps: list[float] = field(default_factory=list)
    raws: list = field(default_factory=list)
    msgtypes: list[str] = field(default_factory=list)
    store: object = None
    _cache: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.raws)

    def value(self, k: int):
        k = int(k)
        if k not in self._cache:
            try:
                self._cache[k] = self.extract(self.store.deserialize_ros1(self.raws[k], self.msgtypes[k]))
            except BagProblem:
                raise
            except Exception as exc:
                raise BagProblem(f"cannot decode {self.msgtypes[k]} message {k + 1} on {self.topic}: {first_line(exc)}") from None
        return self._cache[k]

    def reorder(self, order: np.ndarray) -> None:
        self.stamps = [self.stamps[i] for i in order]
        self.raws = [self.raws[i] for i in order]
        self.msgtypes = [self.msgtypes[i] for i in order]
        if len(self.header_stamps) == len(order):
            self.header_stamps = [self.header_stamps[i] for i in order]
        self._cache.clear()


def _get(msg, path: str):
    for part in path.split("."):
        msg = getattr(msg, part)
    return msg


def _vector(fields: list[str]):
    def extract(msg):
        return np.concatenate([np.asarray(_get(msg, f), dtype=np.float64).reshape(-1) for f in fields])
    return extract


def _pose(msg) -> np.ndarray:
    twist = msg.twist if hasattr(msg, "twist") else msg  # TwistStamped or a plain Twist
    return np.array([twist.linear.x, twist.linear.y, twist.angular.z], dtype=np.float64)


def _image_bytes(msg) -> np.ndarray:
    return np.asarray(msg.data, dtype=np.uint8)


# The roles of camera streams (`_streams` names them "camera <name>" and "depth <name>").
_CAMERA_ROLES = ("camera ", "depth ")


def _streams(topic_map: TopicMap, present: set[str]) -> tuple[dict[str, _Stream], str, list[str]]:
    """Every role the map needs, and the arm action topic used; BagProblem for a missing topic."""
    hand = topic_map.hand_resolved
    notes: list[str] = []
    roles: list[tuple[str, str, object]] = [
        ("arm state", topic_map.arm.state_topic, _vector([topic_map.arm.state_field])),
        ("hand state", hand.state_topic, _vector(hand.state_fields)),
        ("hand command", hand.action_topic, _vector(hand.action_fields)),
    ]
    roles += [(f"camera {c.name}", c.topic, _image_bytes) for c in topic_map.cameras]
    if topic_map.depth.enabled:
        roles += [(f"depth {c.name}", c.topic, _image_bytes) for c in topic_map.depth.cameras]
    if not topic_map.only_arm:
        roles.append(("base pose command", topic_map.base.topic, _pose))
    arm_topic = next((t for t in topic_map.arm.action_topics if t in present), None)
    missing = [f"{topic} ({role})" for role, topic, _ in roles if topic not in present]
    if arm_topic is None:
        missing.insert(0, f"{' or '.join(topic_map.arm.action_topics)} (arm command)")
    if missing:
        hint = (f"; the topic map's hand.kind is {hand.kind!r}: set it to the bag's hand"
                if any("(hand " in m for m in missing) else "")
        raise BagProblem(f"missing topic{'s' if len(missing) > 1 else ''} {', '.join(missing)}{hint}")
    roles.append(("arm command", arm_topic, _vector([topic_map.arm.action_field])))
    if not topic_map.only_arm:
        if topic_map.base.gap_topic in present:
            roles.append(("walking gaps", topic_map.base.gap_topic, lambda msg: None))
        else:
            notes.append(f"no {topic_map.base.gap_topic}: ctrl_change_cmd is 0 in every frame")
    return {role: _Stream(role, topic, fn) for role, topic, fn in roles}, arm_topic, notes


def _read(bag: Path, topic_map: TopicMap) -> tuple[dict[str, _Stream], str, list[str]]:
    """All messages of the needed topics, serialized, with their receive and header stamps."""
    from rosbags.rosbag1 import Reader, ReaderError

    from kuavo_train.data.rosbag.types import types_from_bag_msgdef

    try:
        reader = Reader(bag)
        reader.open()
    except (ReaderError, OSError, ValueError, KeyError, EOFError) as exc:
        # an interrupted recording has no index: rosbag reindex on the robot rebuilds it
        raise BagProblem(f"unreadable: {first_line(exc)} (if the recording was cut off, `rosbag reindex` it "
                         "first)") from None
    try:
        by_topic: dict[str, list] = {}
        for conn in reader.connections:
            by_topic.setdefault(conn.topic, []).append(conn)
        streams, arm_topic, notes = _streams(topic_map, set(by_topic))
        used = {s.topic for s in streams.values()}
        raw_images = [c for s in streams.values() if s.role.startswith(_CAMERA_ROLES)
                      for c in by_topic[s.topic] if not c.msgtype.endswith("CompressedImage")]
        if raw_images:  # their bytes are pixels, not JPEG / PNG
            c = raw_images[0]
            raise BagProblem(f"camera topic {c.topic} carries {c.msgtype}; the converter reads "
                             "sensor_msgs/CompressedImage, as the robot records its cameras: name the compressed "
                             "topic in the topic map's cameras")
        conns = [c for t in sorted(used) for c in by_topic[t]]
        try:
            store = _typestore(tuple(sorted({(c.msgtype, c.msgdef.data) for c in conns})))
        except Exception:  # a definition rosbags cannot parse: name it
            for conn in conns:
                try:
                    types_from_bag_msgdef(conn.msgdef.data, conn.msgtype)
                except Exception as exc:
                    raise BagProblem(f"cannot parse the message definition of {conn.topic} ({conn.msgtype}): "
                                     f"{first_line(exc)}") from None
            raise
        # ROS1 serializes a leading std_msgs/Header as uint32 seq, uint32 sec, uint32 nsec: its stamp
        # can be read without deserializing the message.
        has_header = {c.msgtype: bool(store.fielddefs[c.msgtype][1]) and
                      store.fielddefs[c.msgtype][1][0][1][1:] == ("std_msgs/msg/Header",) for c in conns}
        per_topic = {t: [s for s in streams.values() if s.topic == t] for t in used}
        for s in streams.values():
            s.store = store
        try:
            for conn, t_ns, raw in reader.messages(connections=conns):
                stamp = None
                if has_header[conn.msgtype]:
                    sec, nsec = _STAMP.unpack_from(raw, 4)
                    stamp = sec + nsec * 1e-9
                for s in per_topic[conn.topic]:
                    s.stamps.append(t_ns * 1e-9)
                    s.raws.append(raw)
                    s.msgtypes.append(conn.msgtype)
                    if stamp is not None:
                        s.header_stamps.append(stamp)
        except Exception as exc:  # ReaderError, struct/zlib/lz4 errors of a damaged chunk
            raise BagProblem(f"unreadable: {first_line(exc)}") from None
        return streams, arm_topic, notes
    finally:
        try:
            reader.close()
        except Exception:
            pass


@lru_cache(maxsize=8)
def _typestore(definitions: tuple[tuple[str, str], ...]):
    """One typestore per set of stored definitions: bags of one robot share it, and rosbags
    generates its (de)serializer code only once per store."""
    from rosbags.typesys import Stores, get_typestore

    from kuavo_train.data.rosbag.types import types_from_bag_msgdef

    types: dict = {}
    for msgtype, msgdef in definitions:
        types.update(types_from_bag_msgdef(msgdef, msgtype))
    store = get_typestore(Stores.EMPTY)
    store.register(types)
    return store




def _check_order(streams: dict[str, _Stream], tolerance: float | None) -> None:
    if tolerance is None:
        return
    for s in streams.values():
        if len(s.header_stamps) < 2:
            continue
        d = np.diff(np.asarray(s.header_stamps))
        i = int(np.argmin(d))
        if d[i] < -tolerance:
            raise BagProblem(f"stamps out of order on {s.topic}: header stamp goes back {-d[i]:.3f} s at message "
                             f"{i + 2} of {len(s.header_stamps)}")


def _times(s: _Stream, source: str) -> np.ndarray:
    if source == "header" and len(s.header_stamps) == len(s.stamps):
        return np.asarray(s.header_stamps)
    return np.asarray(s.stamps)


def nearest(stamps: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the stamp nearest to each target (sorted stamps; ties go to the earlier one)."""
    i = np.searchsorted(stamps, targets, side="left")
    hi = np.clip(i, 0, len(stamps) - 1)
    lo = np.clip(i - 1, 0, len(stamps) - 1)
    take_hi = np.abs(stamps[hi] - targets) < np.abs(stamps[lo] - targets)
    return np.where(take_hi, hi, lo)


def _check_camera_rate(stamps: np.ndarray, topic_map: TopicMap) -> None:
    """The main camera's measured rate against `main_camera_fps`: every (main_camera_fps // fps)-th
    frame is kept and the dataset says `fps`, so a camera at another rate would give frames
    another time apart than the dataset's fps says."""
    period = float(np.median(np.diff(stamps))) if len(stamps) >= 3 else 0.0
    if period <= 0:  # too few stamps, or repeated ones: nothing to measure
        return
    measured = 1.0 / period
    if abs(measured - topic_map.main_camera_fps) > 0.2 * topic_map.main_camera_fps:
        raise BagProblem(f"the {topic_map.main_camera} camera runs at {measured:.1f} Hz, the topic map says "
                         f"main_camera_fps {topic_map.main_camera_fps}: its frames would be "
                         f"{topic_map.jump / measured:.3f} s apart in a dataset of {topic_map.fps} fps; set "
                         "main_camera_fps to the camera's rate")


def _sensors(times: dict) -> list[str]:
    """The streams a robot publishes all the time (cameras, joint and hand states). Commands may
    pause (the arm command while walking, whose gaps the converter reads; a claw command sent on
    change), so they neither cut the start nor count as stale."""
    return [r for r in times if r.startswith(_CAMERA_ROLES) or r in ("arm state", "hand state")]


def _stale(times: dict, idx: dict, frame_t: np.ndarray, streams: dict, topic_map: TopicMap) -> list[str]:
    """A note per sensor stream whose nearest message is more than two frame periods from a frame
    (a camera that stalled, a state topic with a gap): those frames show old values; and per
    command stream that ended before the last frames, which hold its last message."""
    notes = []
    for role in _sensors(times):
        t = times[role]
        dist = np.abs(t[idx[role]] - frame_t)
        worst = int(np.argmax(dist))
        if dist[worst] > 2.0 / topic_map.fps:
            notes.append(f"{streams[role].topic}: frame {worst} is {dist[worst]:.3f} s from its nearest message "
                         f"({int(np.sum(dist > 2.0 / topic_map.fps))} frames more than two frame periods away)")
    for role in set(times) - set(_sensors(times)):
        held = int(np.sum(frame_t > times[role][-1] + 2.0 / topic_map.fps))
        if held:
            notes.append(f"{streams[role].topic}: its last message is {frame_t[-1] - times[role][-1]:.3f} s before the "
                         f"last frame: the last {held} frames hold it")
    return notes


def main_timeline(raw: np.ndarray, topic_map: TopicMap, end: float) -> np.ndarray:
    """The frame times: main-camera stamps after sample_drop at each end, every `jump`-th, before `end`."""
    drop = topic_map.sample_drop
    if len(raw) < 2 * drop + 1:
        raise BagProblem(f"too short: {len(raw)} {topic_map.main_camera} frames, sample_drop={drop} needs at least {2 * drop + 1}")
    kept = raw[drop:len(raw) - drop][::topic_map.jump]
    return kept[kept < end]


def _decode_jpeg(data: np.ndarray, where: str) -> np.ndarray:
    import cv2

    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise BagProblem(f"cannot decode the image of {where}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _decode_depth(data: np.ndarray, where: str) -> np.ndarray:
    import cv2

    raw = data.tobytes()
    at = raw.find(PNG_MAGIC)
    img = cv2.imdecode(np.frombuffer(raw[at:], np.uint8), cv2.IMREAD_UNCHANGED) if at >= 0 else None
    if img is None:
        raise BagProblem(f"cannot decode the depth image of {where} (no 16-bit PNG in it)")
    return img if img.ndim == 2 else img[..., 0]


def _images(s: _Stream, idx: np.ndarray, topic_map: TopicMap, depth: bool, spill: Path | None) -> np.ndarray | Path:
    """The frames of one camera, (n, H, W, 3) uint8: in memory, or written frame by frame to the
    .npy file `spill` (a long 640x480 episode of three cameras is gigabytes once decoded)."""
    import cv2

    size = topic_map.image_size
    out: np.ndarray | None = None
    last_k, img = None, None
    for row, k in enumerate(idx):
        k = int(k)
        if k != last_k:  # a slower camera repeats its nearest frame: decode it once
            where = f"{s.topic} message {k + 1}"
            img = _decode_depth(s.value(k), where) if depth else _decode_jpeg(s.value(k), where)
            if size is not None and (img.shape[1], img.shape[0]) != tuple(size):
                img = cv2.resize(img, tuple(size), interpolation=cv2.INTER_NEAREST if depth else cv2.INTER_LINEAR)
            if depth:
                lo, hi = topic_map.depth.range_mm
                d = np.clip(img.astype(np.float32), lo, hi)
                d = (d - d.min()) / (d.max() - d.min() + 1e-9)
                img = np.repeat((d * 255).astype(np.uint8)[..., None], 3, axis=-1)
            last_k = k
        if out is None:
            shape = (len(idx), *img.shape)
            out = (np.lib.format.open_memmap(spill, mode="w+", dtype=np.uint8, shape=shape) if spill is not None
                   else np.empty(shape, dtype=np.uint8))
        elif img.shape != out.shape[1:]:
            raise BagProblem(f"{s.topic}: the image size changes within the bag ({out.shape[2]}x{out.shape[1]}, then "
                             f"{img.shape[1]}x{img.shape[0]}); set image_size in the topic map")
        out[row] = img
    if spill is not None:
        out.flush()
        del out
        return spill
    return out


def _hand_values(s: _Stream, idx: np.ndarray, index: tuple[int, int], divisor: float, binary: bool,
                 threshold: float, where: str) -> np.ndarray:
    need = max(index) + 1
    out = np.empty((len(idx), 2), dtype=np.float64)
    for row, k in enumerate(idx):
        v = s.value(k)
        if len(v) < need:
            raise BagProblem(f"{where} has {len(v)} values, the hand index {list(index)} needs {need}")
        out[row] = v[index[0]], v[index[1]]
    return (out > threshold).astype(np.float64) if binary else out / divisor


def read_episode(bag: Path, topic_map: TopicMap, spill_dir: Path | None = None) -> Episode:
    """One bag -> aligned, decoded frames; `BagProblem` says why a bag cannot be converted.

    With `spill_dir`, images go to .npy files there instead of memory (see `Episode.frames`)."""
    bag = Path(bag)
    streams, arm_topic, notes = _read(bag, topic_map)
    _check_order(streams, topic_map.stamp_order_tolerance_s)
    src = topic_map.stamp_source
    times = {}
    for role, s in streams.items():
        t = _times(s, src)
        if src == "header" and len(t) > 1 and np.any(np.diff(t) < 0):  # within the tolerance: sort
            order = np.argsort(t, kind="stable")
            t = t[order]
            s.reorder(order)
        times[role] = t
    empty = [s.topic for s in streams.values() if len(s) == 0]
    if empty:
        raise BagProblem(f"missing topic {empty[0]} (no messages)")
    main = times[f"camera {topic_map.main_camera}"]
    _check_camera_rate(main, topic_map)
    # frames only where every sensor stream has begun and not yet ended: else their values come
    # from the future (a topic that starts late) or the past (one that stops early); a command
    # that stops early stays in force, so its last message is held (and noted)
    end_role = min(_sensors(times), key=lambda r: times[r][-1])
    start_role = max(_sensors(times), key=lambda r: times[r][0])
    frame_t = main_timeline(main, topic_map, times[end_role][-1])
    frame_t = frame_t[frame_t >= times[start_role][0] - 0.5 / topic_map.fps]
    if len(frame_t) == 0:
        raise BagProblem(f"no frame left after alignment: no {topic_map.main_camera} frame left by sample_drop="
                         f"{topic_map.sample_drop} lies between the first message of {streams[start_role].topic} "
                         f"and the last of {streams[end_role].topic}")
    idx = {role: nearest(t, frame_t) for role, t in times.items()}
    notes = notes + _stale(times, idx, frame_t, streams, topic_map)

    # state: arm joints (radians) and one gripper value per hand
    arm, hand = topic_map.arm, topic_map.hand_resolved
    (l0, l1), (r0, r1) = arm.left, arm.right
    q = []
    for k in idx["arm state"]:
        v = streams["arm state"].value(k)
        if len(v) < max(l1, r1):
            raise BagProblem(f"{arm.state_topic} {arm.state_field} has {len(v)} values, the arm slices need {max(l1, r1)}")
        q.append(np.concatenate([v[l0:l1], v[r0:r1]]))
    q = np.asarray(q)
    grip_s = _hand_values(streams["hand state"], idx["hand state"], hand.state_index, hand.state_divisor,
                          hand.binary, hand.binary_state_threshold, f"{hand.state_topic} {'+'.join(hand.state_fields)}")
    grip_a = _hand_values(streams["hand command"], idx["hand command"], hand.action_index, hand.action_divisor,
                          hand.binary, hand.binary_action_threshold, f"{hand.action_topic} {'+'.join(hand.action_fields)}")
    state = np.concatenate([q[:, :7], grip_s[:, :1], q[:, 7:], grip_s[:, 1:]], axis=1)

    # action: arm trajectory command (degrees -> radians) and the same gripper layout
    cmd = []
    for k in idx["arm command"]:
        v = np.asarray(streams["arm command"].value(k), dtype=np.float64)
        if len(v) < 14:
            raise BagProblem(f"{arm_topic} {arm.action_field} has {len(v)} values, the two arms need 14")
        cmd.append(np.deg2rad(v[:14]) if arm.action_in_degrees else v[:14])
    cmd = np.asarray(cmd)
    columns = [cmd[:, :7], grip_a[:, :1], cmd[:, 7:], grip_a[:, 1:]]
    if not topic_map.only_arm:
        walking = np.zeros(len(frame_t), dtype=bool)
        if "walking gaps" in times:
            g = times["walking gaps"]
            for i in np.flatnonzero(np.diff(g) > topic_map.gap_threshold_s):
                walking |= (frame_t > g[i]) & (frame_t < g[i + 1])
            if arm_topic == topic_map.base.gap_topic and topic_map.base.gap_arm_fill is not None:
                columns[0] = np.where(walking[:, None], topic_map.base.gap_arm_fill, columns[0])
                columns[2] = np.where(walking[:, None], topic_map.base.gap_arm_fill, columns[2])
        pose = np.asarray([streams["base pose command"].value(k) for k in idx["base pose command"]])
        columns += [pose, walking[:, None].astype(np.float64)]
    action = np.concatenate(columns, axis=1)

    if not (np.all(np.isfinite(state)) and np.all(np.isfinite(action))):
        raise BagProblem("state or action holds NaN or infinite values")
    images: dict[str, np.ndarray | Path] = {}
    cams = [(f"observation.images.{c.name}", f"camera {c.name}", False) for c in topic_map.cameras]
    if topic_map.depth.enabled:
        cams += [(f"observation.{c.name}", f"depth {c.name}", True) for c in topic_map.depth.cameras]
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
    for key, role, depth in cams:
        spill = Path(spill_dir) / f"{key}.npy" if spill_dir is not None else None
        images[key] = _images(streams[role], idx[role], topic_map, depth=depth, spill=spill)
    return Episode(bag=bag, stamps=frame_t, state=state.astype(np.float32), action=action.astype(np.float32),
                   images=images, notes=notes)


def _process(bag: Path, topic_map: TopicMap, spill_dir: Path | None = None) -> Episode | BagFailure:
    """The pool's task: never raises, so one bad bag cannot stop the others."""
    try:
        return read_episode(bag, topic_map, spill_dir)
    except BagProblem as exc:
        failure = BagFailure(Path(bag), str(exc))
    except MemoryError:
        failure = BagFailure(Path(bag), "out of memory while reading it")
    except Exception as exc:
        failure = BagFailure(Path(bag), f"unexpected error: {type(exc).__name__}: {first_line(exc)}")
    if spill_dir is not None:
        shutil.rmtree(spill_dir, ignore_errors=True)
    return failure


def _episodes(bags: list[Path], topic_map: TopicMap, jobs: int, spill_root: Path) -> Iterator[Episode | BagFailure]:
    """Read the bags in a pool of `jobs` processes; results come back in bag order.

    Decoded frames go to files under `spill_root` (one folder per bag), and at most jobs + 1
    bags are in flight, so neither memory nor disk fills up with waiting episodes."""
    def spill(i: int) -> Path:
        return spill_root / f"{i:06d}"

    if jobs <= 1 or len(bags) <= 1:
        for i, bag in enumerate(bags):
            yield _process(bag, topic_map, spill(i))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # the parent may hold torch; never fork it
    from kuavo_train.processes import die_with_parent

    pool_kw = dict(max_workers=jobs, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),))
    pool = ProcessPoolExecutor(**pool_kw)
    pending: dict[int, object] = {}
    nxt = 0
    try:
        for i, bag in enumerate(bags):
            while nxt < len(bags) and nxt <= i + jobs:
                pending[nxt] = pool.submit(_process, bags[nxt], topic_map, spill(nxt))
                nxt += 1
            try:
                yield pending.pop(i).result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): restart the pool
                shutil.rmtree(spill(i), ignore_errors=True)
                yield BagFailure(bag, "the reading process died (out of memory?)")
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(**pool_kw)
                for j in list(pending):
                    pending[j] = pool.submit(_process, bags[j], topic_map, spill(j))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the dataset
def find_bags(inputs: list[str | Path]) -> list[Path]:
    """Bag files in the given order; a folder contributes its `*.bag` files (not recursive), sorted."""
    bags: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.bag"))
            if not found:
                raise RosbagError(f"rosbag error: no *.bag file in folder {p}")
            bags += found
        elif p.is_file():
            bags.append(p)
        else:
            raise RosbagError(f"rosbag error: {p}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for b in bags:
        if b.resolve() not in seen:
            seen.add(b.resolve())
            unique.append(b)
    if not unique:
        raise RosbagError("rosbag error: no bag given")
    return unique


def split_counts(n: int, topic_map: TopicMap) -> dict[str, str]:
    """{"train": "0:N", "val": "N:M"}: the last episodes are held out (none if that would leave no training)."""
    sp = topic_map.split
    if sp.val_episodes is not None:
        n_val = min(sp.val_episodes, n - 1)
    else:
        n_val = int(round(n * sp.val_fraction))
        if sp.val_fraction > 0 and n >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, n - 1)
    n_val = max(n_val, 0)
    splits = {"train": f"0:{n - n_val}"}
    if n_val:
        splits["val"] = f"{n - n_val}:{n}"
    return splits


def _check_out(out: Path, overwrite: bool, bags: list[Path]) -> None:
    if out.exists() and not overwrite:
        raise RosbagError(f"rosbag error: {out} exists already (remove it, choose another --out, or pass --overwrite)")
    if out.exists() and not out.is_dir():
        raise RosbagError(f"rosbag error: {out} exists and is not a folder")
    inside = next((b for b in bags if b.resolve().is_relative_to(out.resolve())), None)
    if inside is not None:
        raise RosbagError(f"rosbag error: --out {out} holds the input bag {inside}: the dataset would replace it; "
                          "choose another --out")
    if out.exists() and not (out / "meta" / "info.json").is_file():
        # --overwrite replaces a dataset; a folder of anything else (a typo of --out) is never deleted
        raise RosbagError(f"rosbag error: --overwrite replaces a LeRobot dataset, and {out} is not one (no "
                          "meta/info.json): remove it yourself or choose another --out")
    probe = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RosbagError(f"rosbag error: cannot write to {out} ({probe} is not a writable folder)")


def _shape_problem(ep: Episode, features: dict) -> str | None:
    for key in ep.images:
        arr = ep.frames(key)
        want = tuple(features[key]["shape"])
        if tuple(arr.shape[1:]) != want:
            h, w = arr.shape[1:3]
            return (f"{key} is {w}x{h} but the dataset's first episode made it {want[1]}x{want[0]}; "
                    "set image_size in the topic map")
    return None


def _create_dataset(repo_id: str, root: Path, topic_map: TopicMap, features: dict, use_videos: bool):
    import datasets

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()  # one "Map" bar per episode is noise, not progress
    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder prints a 20-line banner per video otherwise
    return LeRobotDataset.create(repo_id=repo_id, fps=topic_map.fps, features=features, root=root,
                                 robot_type=topic_map.robot_type, use_videos=use_videos, streaming_encoding=use_videos)


def _write_episode(ds, ep: Episode, instruction: str) -> str | None:
    """Add and save one episode; the reason if LeRobot refused it (the episode is then discarded)."""
    try:
        cams = {key: ep.frames(key) for key in ep.images}
        for i in range(len(ep)):
            frame = {"observation.state": ep.state[i], "action": ep.action[i], "task": instruction}
            frame.update({key: np.array(arr[i]) for key, arr in cams.items()})  # a copy: the file goes soon
            ds.add_frame(frame)
        del cams
        ds.save_episode()
    except Exception as exc:
        ds.clear_episode_buffer()
        return f"could not be written: {type(exc).__name__}: {first_line(exc)}"
    return None


def convert_bags(bags: list[Path], out: Path, topic_map: TopicMap, *, repo_id: str | None = None, jobs: int = 1,
                 progress: bool = True, overwrite: bool = False, use_videos: bool = True) -> ConvertResult:
    """Convert `bags` (one episode each, in this order) into the LeRobot dataset `out`.

    Bad bags are reported in the result and skipped; `NothingConverted` (nothing written)
    when no bag converts. `use_videos=False` stores PNG images instead of AV1 video."""
    t0 = time.monotonic()
    bags = [Path(b) for b in bags]
    out = Path(out)
    if not bags:
        raise RosbagError("rosbag error: no bag given")
    missing = [b for b in bags if not b.is_file()]
    if missing:
        raise RosbagError(f"rosbag error: {missing[0]}: no such file")
    if not topic_map.instruction:
        raise RosbagError("rosbag error: no instruction: give --instruction TEXT or set `instruction:` in the topic map")
    if jobs < 1:
        raise RosbagError(f"rosbag error: --jobs must be >= 1 (got {jobs})")
    _check_out(out, overwrite, bags)
    repo_id = repo_id or f"kuavo/{out.name}"

    from tqdm import tqdm

    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # removed again if nothing is published
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out.parent, out.name)
    failures: list[BagFailure] = []
    episodes: list[EpisodeInfo] = []
    notes: list[tuple[Path, str]] = []
    ds = None
    features: dict = {}
    results = _episodes(bags, topic_map, jobs, tmp / "frames")
    try:
        root = tmp / out.name
        bar = tqdm(total=len(bags), unit="bag", desc="converting", disable=not progress, file=sys.stdout)
        for i, (bag, res) in enumerate(zip(bags, results)):
            bar.update(1)
            if isinstance(res, BagFailure):
                failures.append(res)
                continue
            if ds is None:  # LeRobot (seconds to import) only once there is something to write
                features = dataset_features(topic_map, res, use_videos=use_videos)
                ds = _create_dataset(repo_id, root, topic_map, features, use_videos)
            problem = _shape_problem(res, features) or _write_episode(ds, res, topic_map.instruction)
            shutil.rmtree(tmp / "frames" / f"{i:06d}", ignore_errors=True)
            if problem:
                failures.append(BagFailure(bag, problem))
                continue
            episodes.append(EpisodeInfo(bag, len(episodes), len(res)))
            notes += [(bag, n) for n in res.notes]
        bar.close()
        if not episodes:
            if ds is not None:
                ds.finalize()
            raise NothingConverted(f"rosbag error: none of the {len(bags)} bags could be converted "
                                   f"(first: {failures[0].bag.name}: {failures[0].reason})", failures)
        ds.finalize()
        splits = split_counts(len(episodes), topic_map)
        info_path = root / "meta" / "info.json"
        info = json.loads(info_path.read_text())
        info["splits"] = splits
        info_path.write_text(json.dumps(info, indent=4))
        provenance = {
            "converter": "kuavo-train convert rosbag",
            # the bag's file name, and its path: bags of several folders may share names
            "episodes": [{"episode_index": e.episode_index, "bag": e.bag.name, "path": str(e.bag.resolve()),
                          "frames": e.frames} for e in episodes],
            "failed": [{"bag": f.bag.name, "path": str(f.bag.resolve()), "reason": f.reason} for f in failures],
            "topic_map": topic_map.model_dump(mode="json"),
        }
        (root / "meta" / META_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        replace_dir(root, out)  # --overwrite: the old dataset goes only once the new one is in place
    finally:
        results.close()  # stops the reading processes if anything above failed
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            for p in made:
                try:
                    p.rmdir()
                except OSError:
                    break
    return ConvertResult(out=out, repo_id=repo_id, fps=topic_map.fps, episodes=episodes, failures=failures,
                         splits=splits, notes=notes, seconds=time.monotonic() - t0)
