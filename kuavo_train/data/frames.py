"""Training samples from a LeRobot v3.0 dataset, reading only what a sample needs.

A sample equals what stock `LeRobotDataset(..., delta_timestamps={"action":
[i / fps for i in range(chunk)]})` returns for the keys SmolVLA uses: the
current frame's camera images (float32 CHW in [0, 1]), the state, the action
chunk t..t+chunk-1 (rows past the episode's end repeat its last action and are
flagged in `action_is_pad`), the task string and the index fields.

Why not the stock class: for image-stored data it decodes every camera image of
all `chunk` rows it touches although only the current frame's images are used
(FINDINGS: 5,400 PNG decodes for 50 samples). Here the numeric columns are read
once into numpy, and images are decoded per sample from the parquet bytes of
that one row (video-stored cameras go through LeRobot's own video decoder).
`tests/test_frames.py` checks equality with the stock class sample by sample.
"""

from __future__ import annotations

import bisect
import io
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kuavo_train.errors import DataError, KuavoError, first_line

NUMERIC = ("timestamp", "frame_index", "episode_index", "index", "task_index")
# Which union action dims this sample's task lacks (kuavo_train/data/features.py). The name ends in
# "_is_pad" because LeRobot's processors pass exactly such keys through to the policy.
DIM_PAD_KEY = "action_dim_is_pad"


@dataclass(frozen=True)
class VectorLayout:
    """Where a task's own dims sit in the run's union vector, and what fills the others."""

    index: tuple[int, ...]
    fill: np.ndarray  # union-sized; the union mean, so absent dims normalize to 0

    def scatter(self, own: np.ndarray) -> np.ndarray:
        out = np.broadcast_to(self.fill.astype(np.float32), (*own.shape[:-1], len(self.fill))).copy()
        out[..., list(self.index)] = own
        return out

    def mask(self) -> np.ndarray:
        m = np.zeros(len(self.fill), dtype=bool)
        m[list(self.index)] = True
        return m
ROW_GROUP_CACHE = 4  # row groups of image bytes kept per (file, camera) in each process


# Column of a sample whose images were not decoded (zero placeholders): `cached_frames(task_id, index)`
# said the model's cache holds all its image features (kuavo_train/policy/feature_cache.py).
NOT_DECODED_KEY = "frame_not_decoded"


_META: dict[tuple, object] = {}


def _metadata(repo_id: str, root: Path):
    """LeRobot's metadata of a dataset, read once per process while its info.json is unchanged.

    Reading it parses every episode's record (over a second for a demo dataset), and one run opens
    each dataset many times: every stage, replay and evaluation row. LeRobot has no such memo."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    try:
        st = (root / "meta" / "info.json").stat()
    except OSError:
        return LeRobotDatasetMetadata(repo_id, root=root)  # LeRobot's own error for a missing dataset
    key = (repo_id, str(root.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _META:
        _META[key] = LeRobotDatasetMetadata(repo_id, root=root)
    return _META[key]


class ChunkedFrameDataset(torch.utils.data.Dataset):
    def __init__(self, repo_id: str, root, *, episodes: list[int], chunk_size: int, camera_keys: list[str],
                 state_key: str = "observation.state", action_key: str = "action", task: str | None = None,
                 task_id: int = 0, image_cache: bool | int = False, camera_map: dict[str, str] | None = None,
                 state_layout: VectorLayout | None = None, action_layout: VectorLayout | None = None,
                 cached_frames=None):
        import pyarrow.parquet as pq

        self.repo_id, self.root = repo_id, Path(root)
        self.meta = _metadata(repo_id, self.root)
        self.chunk_size, self.camera_keys = int(chunk_size), list(camera_keys)
        # output key -> dataset key (renamed cameras); by default each camera keeps its name
        self.camera_map = dict(camera_map) if camera_map else {k: k for k in self.camera_keys}
        self.camera_keys = list(self.camera_map.values())
        self.state_key, self.action_key = state_key, action_key
        self.task, self.task_id = task, int(task_id)
        for key in [state_key, action_key, *self.camera_keys]:
            if key not in self.meta.features:
                raise ValueError(f"{self.root}: no feature {key!r} (has {', '.join(self.meta.features)})")
        self.video_keys = [k for k in self.camera_keys if self.meta.features[k]["dtype"] == "video"]
        self.video_backend = None
        if self.video_keys:
            from lerobot.utils.import_utils import get_safe_default_video_backend

            # Resolved once, as stock LeRobotDataset does: left to decode_video_frames it is
            # re-resolved per call, which re-tries a broken torchcodec import every time.
            self.video_backend = get_safe_default_video_backend()
        n_eps = self.meta.total_episodes
        bad = [e for e in episodes if not 0 <= int(e) < n_eps]
        if bad:
            raise ValueError(f"{self.root}: episode {bad[0]} does not exist (the dataset has episodes 0..{n_eps - 1})")
        self.episodes = [int(e) for e in episodes]
        self.task_names = {int(i): str(t) for t, i in zip(self.meta.tasks.index, self.meta.tasks["task_index"])}

        # Numeric columns of the selected episodes, in the given episode order.
        cols = {k: [] for k in (state_key, action_key, *NUMERIC)}
        self._rows: list[tuple[str, int]] = []  # (data file, row in file) of every item
        self._ep_bounds: list[tuple[int, int]] = []  # [start, end) of each episode in item order
        tables: dict[str, object] = {}
        for ep in self.episodes:
            rel = str(self.meta.get_data_file_path(ep))
            if rel not in tables:
                tables[rel] = pq.read_table(self.root / rel, columns=list(cols))
            t = tables[rel]
            ep_col = t.column("episode_index").to_numpy()
            rows = np.flatnonzero(ep_col == ep)
            rows = rows[np.argsort(t.column("frame_index").to_numpy()[rows], kind="stable")]
            start = len(self._rows)
            self._rows.extend((rel, int(r)) for r in rows)
            self._ep_bounds.append((start, len(self._rows)))
            for k in cols:
                col = t.column(k).take(rows)
                cols[k].append(np.stack(col.to_numpy(zero_copy_only=False)) if k in (state_key, action_key) else col.to_numpy())
        self._data = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in cols.items()}
        self._data[state_key] = self._data[state_key].astype(np.float32)
        self._data[action_key] = self._data[action_key].astype(np.float32)
        if state_layout is not None:
            self._data[state_key] = state_layout.scatter(self._data[state_key])
        self._dim_mask = None
        if action_layout is not None:
            self._data[action_key] = action_layout.scatter(self._data[action_key])
            self._dim_mask = torch.from_numpy(~action_layout.mask())
        self._item_ep = np.repeat(np.arange(len(self._ep_bounds)), [b - a for a, b in self._ep_bounds])
        self._image_cache_size = (1024 if image_cache is True else int(image_cache)) if image_cache else 0
        self.cached_frames = cached_frames
        self._placeholders = {out: _chw_shape(self.meta.features[key]) for out, key in self.camera_map.items()}
        self._reset_process_state()

    # Per-process state (open files, caches) is rebuilt after pickling into a DataLoader worker.
    def _reset_process_state(self) -> None:
        self._files: dict[str, object] = {}
        self._groups: OrderedDict = OrderedDict()
        self._images: OrderedDict = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_files", "_groups", "_images"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_process_state()

    def __len__(self) -> int:
        return len(self._rows)

    def episode_index_array(self) -> np.ndarray:
        return self._data["episode_index"].astype(np.int64)

    # ---- images --------------------------------------------------------------
    def _image_bytes(self, rel: str, row: int, key: str) -> bytes:
        import pyarrow.parquet as pq

        pf = self._files.get(rel)
        if pf is None:
            pf = pq.ParquetFile(self.root / rel)
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]).tolist()
            self._files[rel] = pf = (pf, starts)
        pf, starts = pf
        g = bisect.bisect_right(starts, row) - 1
        cache_key = (rel, g, key)
        col = self._groups.get(cache_key)
        if col is None:
            # One column of one row group: for large files we never hold more than a few groups.
            col = pf.read_row_group(g, columns=[key]).column(key).combine_chunks().field("bytes")
            self._groups[cache_key] = col
            if len(self._groups) > ROW_GROUP_CACHE * max(1, len(self.camera_keys)):
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(cache_key)
        return col[row - starts[g]].as_py()

    def _image(self, i: int, key: str) -> torch.Tensor:
        from PIL import Image

        rel, row = self._rows[i]
        cached = self._images.get((i, key)) if self._image_cache_size else None
        if cached is None:
            try:
                with Image.open(io.BytesIO(self._image_bytes(rel, row, key))) as im:
                    cached = np.array(im.convert("RGB"))
            except Exception as exc:  # PIL and Arrow raise many kinds for damaged bytes
                raise self._damaged(i, key, rel, exc) from None
            if self._image_cache_size:
                self._images[(i, key)] = cached
                if len(self._images) > self._image_cache_size:
                    self._images.popitem(last=False)
        # Same arithmetic as torchvision's ToTensor, so values are bit-identical to stock.
        return torch.from_numpy(cached).permute(2, 0, 1).contiguous().to(torch.float32).div(255)

    def _video_frames(self, i: int) -> dict[str, torch.Tensor]:
        from lerobot.datasets.video_utils import decode_video_frames

        ep = int(self._data["episode_index"][i])
        ts = float(self._data["timestamp"][i])
        meta_ep = self.meta.episodes[ep]
        out = {}
        for key in self.video_keys:
            path = self.root / self.meta.get_video_file_path(ep, key)
            try:
                frames = decode_video_frames(path, [meta_ep[f"videos/{key}/from_timestamp"] + ts], 1e-4, self.video_backend)
            except Exception as exc:  # a damaged or cut video file
                raise self._damaged(i, key, str(self.meta.get_video_file_path(ep, key)), exc) from None
            out[key] = frames.squeeze(0)
        return out

    def _damaged(self, i: int, key: str, rel: str, exc: BaseException) -> DataError:
        """Image bytes that do not decode are found only when a sample is drawn (nothing in the
        metadata shows them): name the dataset, episode, frame, camera and file."""
        ep, frame = int(self._data["episode_index"][i]), int(self._data["frame_index"][i])
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", first_line(exc))  # PIL names the buffer
        return DataError(
            f"data error: dataset {self.repo_id} at {self.root}: cannot decode the {key} image of episode {ep} "
            f"frame {frame} (in {rel}): {reason}; the file is damaged: copy or convert the dataset again, "
            f"or leave episode {ep} out of its train/val episodes"
        )

    # ---- samples -----------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = self._ep_bounds[self._item_ep[i]]
        steps = i + np.arange(self.chunk_size)
        pad = steps >= end
        d = self._data
        item = {
            self.state_key: torch.from_numpy(d[self.state_key][i].copy()),
            self.action_key: torch.from_numpy(d[self.action_key][np.minimum(steps, end - 1)].copy()),
            f"{self.action_key}_is_pad": torch.from_numpy(pad),
            "timestamp": torch.tensor(d["timestamp"][i], dtype=torch.float32),
            "frame_index": torch.tensor(int(d["frame_index"][i])),
            "episode_index": torch.tensor(int(d["episode_index"][i])),
            "index": torch.tensor(int(d["index"][i])),
            "task_index": torch.tensor(int(d["task_index"][i])),
            "task": self.task if self.task is not None else self.task_names[int(d["task_index"][i])],
            "task_id": torch.tensor(self.task_id),
        }
        if self._dim_mask is not None:
            item[DIM_PAD_KEY] = self._dim_mask.clone()
        if self.cached_frames is not None:
            skip = bool(self.cached_frames(self.task_id, int(d["index"][i])))
            item[NOT_DECODED_KEY] = torch.tensor(skip)
            if skip:
                zero = torch.zeros(())
                for out_key, shape in self._placeholders.items():
                    item[out_key] = zero.expand(shape)  # no memory of its own: collation writes the batch once
                return item
        frames = self._video_frames(i) if self.video_keys else {}
        for out_key, key in self.camera_map.items():
            item[out_key] = frames[key] if key in self.video_keys else self._image(i, key)
        return item

    def batch(self, indices) -> dict:
        """Samples `indices` collated, as a DataLoader over them yields one batch (for passes that
        pick their own batches: the validation and end-of-stage passes split between processes)."""
        from torch.utils.data import default_collate

        return default_collate([self[i] for i in indices])


def _chw_shape(feature: dict) -> tuple[int, int, int]:
    """(channels, height, width) of a camera feature, whose metadata names its axes."""
    shape, names = feature["shape"], feature.get("names") or ["height", "width", "channels"]
    axes = dict(zip(names, shape))
    return (int(axes.get("channels", axes.get("channel", 3))), int(axes["height"]), int(axes["width"]))


def camera_sizes(task) -> dict[str, tuple[int, int]]:
    """(height, width) of each policy camera of `task` (a TaskData), as its dataset stores it."""
    cameras = task.camera_map or {k: k for k in task.camera_keys}
    return {policy_key: _chw_shape(task.features[data_key])[1:] for policy_key, data_key in cameras.items()}


def collate_resized(samples: list[dict], *, camera_keys: list[str], size: tuple[int, int]) -> dict:
    """`default_collate`, after bringing each camera's images to `size` (SmolVLA's
    `resize_imgs_with_padding`: width, height) with SmolVLA's own resize-with-padding when the
    batch mixes sizes (replay of tasks whose cameras differ).

    The policy resizes every image to `size` that way anyway, and an image already of that size
    passes its resize unchanged, so the model sees what it would have seen; torch cannot stack
    images of different sizes, hence the resize here."""
    from lerobot.policies.common.vla_utils import resize_with_pad
    from torch.utils.data import default_collate

    width, height = size
    for key in camera_keys:
        if len({tuple(s[key].shape[-2:]) for s in samples if key in s}) > 1:
            for s in samples:
                if key in s:
                    s[key] = resize_with_pad(s[key].unsqueeze(0), height, width, pad_value=0)[0]
    return default_collate(samples)


def fetch_batches(loader):
    """Iterate `loader`; a `KuavoError` raised in a DataLoader worker comes back as its own one line.

    torch re-raises a worker's exception as the same type built from a multi-line text
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), whose first
    line would be all the user sees; the original message is the traceback's last line."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except KuavoError as exc:
            raise from_worker(exc) from None
        yield batch


def from_worker(exc: KuavoError) -> KuavoError:
    lines = str(exc).strip().splitlines()
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return exc  # raised in this process: already one line
    where, _, message = lines[-1].partition(": ")
    if where.rsplit(".", 1)[-1] != type(exc).__name__ or not message:
        return exc
    return type(exc)(message)
