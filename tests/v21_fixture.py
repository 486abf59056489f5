"""Test helper: write a small dataset in the LeRobot v2.1 layout, as lerobot 0.3.x wrote it.

The layout follows lerobot v0.3.3 (`src/lerobot/datasets/lerobot_dataset.py`, `utils.py`,
`compute_stats.py`, `video_utils.py`):

    meta/info.json               codebase_version "v2.1", chunk/file path templates, features
                                 (user features first, then timestamp, frame_index, episode_index,
                                 index, task_index), totals, splits {"train": "0:N"}
    meta/episodes.jsonl          {"episode_index", "tasks", "length"} per episode
    meta/tasks.jsonl             {"task_index", "task"}
    meta/episodes_stats.jsonl    {"episode_index", "stats": {feature: {min, max, mean, std, count}}}
                                 for every feature; cameras as (3, 1, 1) stats in [0, 1], computed on
                                 up to 100 evenly spaced raw frames (count = frames sampled)
    data/chunk-000/episode_000000.parquet   one file per episode; the huggingface schema metadata
                                 as `datasets` 3.x wrote it ("Sequence" for fixed-length vectors)
    videos/chunk-000/<camera>/episode_000000.mp4   one file per episode and camera, PyAV,
                                 libsvtav1 / yuv420p / g=2 / crf=30 (lerobot 0.3's defaults)

`video=False` stores cameras as PNG bytes in the parquet files (dtype "image").
No `meta/stats.json`: lerobot 0.3 did not write one for v2.1.

Not part of the package; only the tests import it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"

ARM_NAMES = (
    [f"zarm_l{i}" for i in range(1, 8)] + ["left_claw"] + [f"zarm_r{i}" for i in range(1, 8)] + ["right_claw"]
)
KUAVO_CAMERAS = ("observation.images.head_cam_h", "observation.images.wrist_cam_l", "observation.images.wrist_cam_r")
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


def _names(dim: int) -> list[str]:
    return list(ARM_NAMES) if dim == len(ARM_NAMES) else [f"joint_{i}" for i in range(dim)]


def _sample_positions(n: int) -> np.ndarray:
    """Frames lerobot 0.3 sampled for image stats: about n**0.75, at least min(n, 100), at most 10,000."""
    lo = min(n, 100)
    count = max(lo, min(int(n**0.75), 10_000))
    return np.round(np.linspace(0, n - 1, count)).astype(int)


def _stats(values: np.ndarray, *, image: bool = False) -> dict:
    if image:  # (n, H, W, 3) uint8 -> per channel over samples and pixels, in [0, 1], shape (3, 1, 1)
        chw = values.transpose(0, 3, 1, 2)
        if max(chw.shape[2:]) >= 300:  # lerobot 0.3 downsampled large images before the stats
            step = int(max(chw.shape[2:]) / 150)
            chw = chw[:, :, ::step, ::step]
        axis = (0, 2, 3)
        out = {
            "min": chw.min(axis=axis, keepdims=True),
            "max": chw.max(axis=axis, keepdims=True),
            "mean": chw.mean(axis=axis, keepdims=True),
            "std": chw.std(axis=axis, keepdims=True),
        }
        out = {k: (v / 255.0)[0].tolist() for k, v in out.items()}
        out["count"] = [int(len(chw))]
        return out
    keep = values.ndim == 1
    return {
        "min": np.atleast_1d(values.min(axis=0, keepdims=keep)).tolist(),
        "max": np.atleast_1d(values.max(axis=0, keepdims=keep)).tolist(),
        "mean": np.atleast_1d(values.mean(axis=0, keepdims=keep)).tolist(),
        "std": np.atleast_1d(values.std(axis=0, keepdims=keep)).tolist(),
        "count": [int(len(values))],
    }


def _frames(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """A smooth coloured background with a square moving across it: compresses well, decodes close."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), np.full_like(xx, int(rng.integers(40, 200)))],
        axis=-1,
    ).astype(np.uint8)
    out = np.repeat(base[None], n, axis=0)
    side = max(4, min(height, width) // 4)
    colour = rng.integers(0, 256, size=3).astype(np.uint8)
    for t in range(n):
        x0 = int((width - side) * t / max(n - 1, 1))
        y0 = int((height - side) * (0.5 + 0.4 * np.sin(t / 3.0)))
        out[t, y0 : y0 + side, x0 : x0 + side] = colour
    return out


def _encode_mp4(frames: np.ndarray, path: Path, fps: int) -> dict:
    """Encode (n, H, W, 3) uint8 like lerobot 0.3's `encode_video_frames`; return its `get_video_info`."""
    import av

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner on stderr otherwise
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libsvtav1"
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # a PyAV build without SVT-AV1: lerobot 0.3 also accepted h264
        codec = "h264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, fps, options={"g": "2", "crf": "30"})
        stream.pix_fmt = "yuv420p"
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path), "r") as container:
        vs = container.streams.video[0]
        info = {
            "video.height": vs.height,
            "video.width": vs.width,
            "video.codec": vs.codec_context.codec.canonical_name,
            "video.pix_fmt": vs.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": int(vs.base_rate),
            "video.channels": 3,
            "has_audio": False,
        }
    return info


def _hf_metadata(columns: dict[str, dict]) -> bytes:
    """The `huggingface` schema metadata of a parquet file written by `datasets` 3.x."""
    feats = {}
    for key, ft in columns.items():
        if ft["dtype"] == "image":
            feats[key] = {"_type": "Image"}
        elif list(ft["shape"]) == [1]:
            feats[key] = {"dtype": ft["dtype"], "_type": "Value"}
        else:
            feats[key] = {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": int(ft["shape"][0]), "_type": "Sequence"}
    return json.dumps({"info": {"features": feats}}).encode()


def _write_parquet(path: Path, columns: dict[str, dict], values: dict[str, object]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, fields = [], []
    for key, ft in columns.items():
        v = values[key]
        if ft["dtype"] == "image":
            typ = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            arr = pa.array(v, type=typ)
        elif list(ft["shape"]) == [1]:
            typ = pa.from_numpy_dtype(np.dtype(ft["dtype"]))
            arr = pa.array(np.asarray(v).astype(ft["dtype"]), type=typ)
        else:
            flat = np.asarray(v, dtype=ft["dtype"])
            typ = pa.list_(pa.from_numpy_dtype(np.dtype(ft["dtype"])), int(ft["shape"][0]))
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), int(ft["shape"][0]))
        arrays.append(arr)
        fields.append(pa.field(key, typ))
    schema = pa.schema(fields, metadata={b"huggingface": _hf_metadata(columns)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def write_v21_dataset(
    root: str | Path,
    *,
    n_episodes: int,
    frames_per_episode: int | Sequence[int],
    state_dim: int = 16,
    action_dim: int = 16,
    cameras: Sequence[str] = KUAVO_CAMERAS[:1],
    fps: int = 10,
    task: str = "pick up the object and place it in the box",
    seed: int = 0,
    video: bool = True,
    height: int = 48,
    width: int = 64,
    robot_type: str = "kuavo4pro",
    kuavo_style: bool = False,
) -> Path:
    """Write a LeRobot v2.1 dataset at `root` (must not exist) and return `root`.

    `frames_per_episode`: one length for all episodes or one per episode.
    `kuavo_style`: feature declarations as Kuavo's own converter (kuavo_data_challenge, on
    lerobot 0.3) wrote them: names {"motors": [...]}, cameras (3, H, W) named
    ["channels", "height", "width"]. Default: lerobot 0.3's own convention, (H, W, 3) named
    ["height", "width", "channels"] and a plain list of joint names.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=False)
    lengths = [int(frames_per_episode)] * n_episodes if isinstance(frames_per_episode, int) else [int(x) for x in frames_per_episode]
    if len(lengths) != n_episodes:
        raise ValueError(f"frames_per_episode has {len(lengths)} entries for {n_episodes} episodes")
    rng = np.random.default_rng(seed)
    cam_dtype = "video" if video else "image"

    def vec(dim):
        names = _names(dim)
        return {"dtype": "float32", "shape": [dim], "names": {"motors": names} if kuavo_style else names}

    features: dict[str, dict] = {"observation.state": vec(state_dim), "action": vec(action_dim)}
    for cam in cameras:
        if kuavo_style:
            features[cam] = {"dtype": cam_dtype, "shape": [3, height, width], "names": ["channels", "height", "width"]}
        else:
            features[cam] = {"dtype": cam_dtype, "shape": [height, width, 3], "names": ["height", "width", "channels"]}
    features.update({k: dict(v) for k, v in INDEX_FEATURES.items()})
    columns = {k: ft for k, ft in features.items() if ft["dtype"] != "video"}

    info = {
        "codebase_version": "v2.1",
        "robot_type": robot_type,
        "total_episodes": 0,
        "total_frames": 0,
        "total_tasks": 1,
        "total_videos": 0,
        "total_chunks": 0,
        "chunks_size": CHUNKS_SIZE,
        "fps": fps,
        "splits": {},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if video else None,
        "features": features,
    }
    meta = root / "meta"
    meta.mkdir()
    (meta / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": task}, ensure_ascii=False) + "\n")
    episodes_lines, stats_lines = [], []
    global_index = 0
    for ep, n in enumerate(lengths):
        chunk = ep // CHUNKS_SIZE
        # a smooth joint trajectory, the action leading the state by one step
        t = np.arange(n + 1, dtype=np.float64)[:, None]
        phase = rng.uniform(0, 2 * np.pi, size=(1, max(state_dim, action_dim)))
        traj = (0.5 * np.sin(t / 5.0 + phase)).astype(np.float32)
        state = traj[:n, :state_dim]
        action = traj[1:, :action_dim] + rng.normal(0, 0.01, size=(n, action_dim)).astype(np.float32)
        values: dict[str, object] = {
            "observation.state": state,
            "action": action,
            "timestamp": np.arange(n, dtype=np.float64) / fps,
            "frame_index": np.arange(n, dtype=np.int64),
            "episode_index": np.full(n, ep, dtype=np.int64),
            "index": np.arange(global_index, global_index + n, dtype=np.int64),
            "task_index": np.zeros(n, dtype=np.int64),
        }
        ep_stats = {}
        for key in ("observation.state", "action"):
            ep_stats[key] = _stats(values[key])
        for cam in cameras:
            frames = _frames(rng, n, height, width)
            ep_stats[cam] = _stats(frames[_sample_positions(n)], image=True)
            if video:
                vinfo = _encode_mp4(frames, root / VIDEO_PATH.format(episode_chunk=chunk, video_key=cam, episode_index=ep), fps)
                if ep == 0:
                    features[cam]["info"] = vinfo
            else:
                values[cam] = [{"bytes": _png(f), "path": f"frame_{i:06d}.png"} for i, f in enumerate(frames)]
        for key in INDEX_FEATURES:
            ep_stats[key] = _stats(values[key])
        ordered = {k: ep_stats[k] for k in features if k in ep_stats}
        _write_parquet(root / DATA_PATH.format(episode_chunk=chunk, episode_index=ep), columns, values)
        episodes_lines.append(json.dumps({"episode_index": ep, "tasks": [task], "length": n}, ensure_ascii=False))
        stats_lines.append(json.dumps({"episode_index": ep, "stats": ordered}))
        global_index += n
        info["total_episodes"] += 1
        info["total_frames"] += n
        info["total_chunks"] = max(info["total_chunks"], chunk + 1)
        info["total_videos"] += len(cameras) if video else 0
        info["splits"] = {"train": f"0:{info['total_episodes']}"}
    (meta / "episodes.jsonl").write_text("\n".join(episodes_lines) + "\n")
    (meta / "episodes_stats.jsonl").write_text("\n".join(stats_lines) + "\n")
    (meta / "info.json").write_text(json.dumps(info, indent=4, ensure_ascii=False))
    return root
