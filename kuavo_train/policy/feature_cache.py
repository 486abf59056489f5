"""An exact on-disk cache of SmolVLA's frozen image features.

With `freeze_vision_encoder` the SigLIP encoder never changes, and with
`train_expert_only` neither does the connector after it, yet stock training
recomputes them for every camera of every sample in every epoch, every later
stage's replay and every validation pass (85-87% of a full-size forward,
FINDINGS). In LeRobot's attention masks image tokens never see state or
action tokens, so these features depend only on the frozen weights and the
image: computing each (frame, camera) once is exact.

How it stays exact:
- the namespace is a hash of the frozen weights (vision encoder, + connector
  when it is frozen too), the image resize setting and the cache level, so a
  different model or preprocessing never reads another's features;
- entries live per dataset fingerprint (its metadata plus the size and mtime
  of every data and video file) and global frame index, one file per camera,
  with a sub-folder per autocast precision;
- every entry also stores a digest of the exact image tensor it was computed
  from (after LeRobot's resize and [-1, 1] scaling); an entry is served only
  when the incoming image has the same digest, otherwise it is recomputed;
- it is only used while the cached modules are in eval mode (no dropout).

LeRobot has no hook to supply precomputed image features, so the cache sits
at the one seam it has: `VLAFlowMatching.embed_prefix` calls
`vlm_with_expert.embed_image(img)` once per camera, in the order of
`SmolVLAPolicy.prepare_images`. `attach()` shadows that method on the
instance; everything else is LeRobot's own forward. Nothing like this exists
in LeRobot or accelerate, hence written here.

Storage: numpy memory maps (sparse files: disk use grows with what is
stored) under `<dir>/<namespace>/<precision>/<dataset>/`, with a byte budget
after which new entries are computed but no longer stored. Several processes
(accelerate ranks) may share the files: file creation is locked, an entry's
features are written before its digest, and a half-visible entry only costs a
recomputation.

Disk space: writing into a hole of a memory-mapped file on a full disk kills
the process with SIGBUS, not an exception. So before a store is created or
opened for writing, the free space must hold what this cache can still write
(its stores' unallocated bytes, at most the rest of the budget), and before
each batch of entries, those entries; when it does not, features are computed
and not stored (one warning), which costs time and never correctness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kuavo_train.processes as processes
from kuavo_train.data.frames import NOT_DECODED_KEY
from kuavo_train.errors import KuavoError
from kuavo_train.files import hash_file, locked

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Digest of an image: its dot products with two fixed pseudo-random vectors in
# float64. Any change of any pixel changes them (barring an exact cancellation
# in both), and it costs one pass over the tensor on whatever device it is on.
_DIGEST_SEED = 0x6B756176
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16 stored as raw bits
_TORCH_DTYPES = {v: k for k, v in _NP_DTYPES.items()}
_NPY_HEADER = 4096  # an upper bound of a .npy header
# Left free beyond the counted bytes: file-system metadata (extent and indirect blocks).
_FREE_MARGIN = 64 * 1024


def _existing(path: Path) -> Path:
    return next((p for p in [path, *path.parents] if p.exists()), Path("/"))


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would, once its folders are made)."""
    return shutil.disk_usage(_existing(path)).free


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _unallocated(path: Path) -> int:
    """Bytes a sparse file can still take on disk when its holes are written."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    return max(0, st.st_size - st.st_blocks * 512)


class CacheEntryLost(KuavoError):
    pass


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    bytes_stored: int = 0
    undecoded: int = 0  # rows whose images the loader did not decode

    def summary(self) -> str:
        total = self.hits + self.misses
        rate = 100.0 * self.hits / total if total else 0.0
        return (f"{self.hits:,} hits, {self.misses:,} misses ({rate:.1f}% served from cache), "
                f"{self.stored:,} entries stored ({self.bytes_stored / 2**20:.1f} MiB), "
                f"{self.undecoded:,} frames not decoded")


def cache_level(policy) -> tuple[str | None, str]:
    """What of the image path is frozen, hence cacheable, and why (for the log)."""
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    if any(p.requires_grad for p in vlm.vision_model.parameters()):
        return None, "off: the vision encoder is trained (freeze_vision_encoder=false)"
    if any(p.requires_grad for p in vlm.connector.parameters()):
        return "vision", "on for the vision encoder output; the connector is trained (train_expert_only=false), so it runs live"
    return "connector", "on: vision encoder and connector are frozen, their output is computed once per frame and camera"


def _hash_modules(modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            # bf16 has no numpy dtype: hash the raw bytes through a same-size integer view.
            raw = t.detach().contiguous().cpu()
            raw = raw.view(torch.int16) if raw.dtype == torch.bfloat16 else raw
            h.update(raw.numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(root: str | Path) -> str:
    """Changes whenever the dataset's metadata or any data/video file changes."""
    root = Path(root)
    h = hashlib.sha256()
    meta = root / "meta"
    for f in sorted(meta.rglob("*")) if meta.is_dir() else []:
        if f.is_file():
            h.update(str(f.relative_to(root)).encode())
            hash_file(h, f)
    for sub in ("data", "videos"):
        for f in sorted((root / sub).rglob("*")) if (root / sub).is_dir() else []:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def store_slug(camera: str) -> str:
    return camera.replace("/", "_")


def precision_name(device: torch.device | str) -> str:
    """The folder of the entries a forward on `device` reads and writes: its autocast precision."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return f"autocast-{str(torch.get_autocast_dtype(device_type)).removeprefix('torch.')}"
    return "none"


class CachedFrames:
    """Whether all of a frame's camera features are stored: then the loader need not decode its images.

    The dataset fingerprint and the frame index already fix the images, so such a frame is served by
    its key alone (`feature_cache.verify_digest: false`, the default). Picklable into DataLoader
    workers, which see the main process's new entries through the shared memory maps."""

    def __init__(self, digest_files: dict[int, list[Path]]):
        self.digest_files = digest_files  # task id -> one digests file per camera
        self._maps: dict[Path, np.ndarray] = {}

    def __getstate__(self):
        return {"digest_files": self.digest_files}

    def __setstate__(self, state):
        self.__init__(state["digest_files"])

    def __call__(self, task_id: int, index: int) -> bool:
        files = self.digest_files.get(int(task_id))
        if not files:
            return False
        for f in files:
            d = self._maps.get(f)
            if d is None:
                if not f.is_file():
                    return False
                d = self._maps[f] = np.load(f, mmap_mode="r")
            if np.isnan(d[index, 0]):
                return False
        return True


class _Store:
    """One camera of one dataset at one precision: features [N, T, D] + digests [N, digest_width]."""

    def __init__(self, folder: Path, camera: str, num_frames: int, digest_width: int = 2):
        self.folder, self.camera, self.num_frames, self.digest_width = folder, camera, num_frames, digest_width
        self.features = None
        self.digests = None
        self.writable = True  # False once the disk cannot hold what it may still store
        slug = store_slug(camera)
        self.feat_path = folder / f"{slug}.features.npy"
        self.digest_path = folder / f"{slug}.digests.npy"
        if self.digest_path.is_file():
            self._open()

    def _open(self) -> None:
        self.digests = np.load(self.digest_path, mmap_mode="r+")
        if self.feat_path.is_file():
            self.features = np.load(self.feat_path, mmap_mode="r+")

    def unallocated(self) -> int:
        return _unallocated(self.feat_path) + _unallocated(self.digest_path)

    def full_bytes(self, shape_td, np_dtype) -> tuple[int, int]:
        """(features, digests) file sizes."""
        feats = self.num_frames * int(np.prod(shape_td)) * np.dtype(np_dtype).itemsize
        return _NPY_HEADER + feats, _NPY_HEADER + self.num_frames * self.digest_width * 8

    def create(self, shape_td: tuple[int, int], np_dtype) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with locked(self.folder / ".lock"):
            if not self.digest_path.is_file():
                # Features first, digests (NaN = empty) last: a digests file means a complete pair.
                tmps = [p.with_suffix(f".tmp{os.getpid()}.npy") for p in (self.feat_path, self.digest_path)]
                try:
                    np.lib.format.open_memmap(tmps[0], mode="w+", dtype=np_dtype, shape=(self.num_frames, *shape_td)).flush()
                    os.replace(tmps[0], self.feat_path)
                    d = np.lib.format.open_memmap(tmps[1], mode="w+", dtype=np.float64, shape=(self.num_frames, self.digest_width))
                    d[:] = np.nan
                    d.flush()
                    os.replace(tmps[1], self.digest_path)
                except BaseException:
                    for t in tmps:
                        t.unlink(missing_ok=True)
                    raise
        self._open()


class FrozenFeatureCache:
    """Serve frozen image features by (dataset, frame, camera); see the module docstring."""

    DIGEST_WIDTH = 2

    def __init__(self, policy, root: str | Path, *, max_bytes: int, level: str, resize=None):
        self.policy = policy
        self.level = level
        self.max_bytes = int(max_bytes)
        self.stats = CacheStats()
        self._vlm_expert = policy.model.vlm_with_expert
        frozen = self._frozen(level)
        self._frozen_modules = frozen
        # host: entries are written through memory maps, whose pages reach a disk shared by several
        # machines (NFS) in no set order, and a page holds parts of neighbouring entries; on one
        # machine the page cache keeps them whole. So each machine keeps its own entries.
        key = {"format": FORMAT_VERSION, "level": level, "weights": _hash_modules(frozen),
               "resize": list(resize) if resize is not None else None, "host": socket.gethostname(),
               **self._key_extra()}
        self.namespace = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.root = Path(root) / self.namespace
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "key.json").write_text(json.dumps(key, indent=2) + "\n")
        self._datasets: dict[int, tuple[str, int]] = {}  # task id -> (fingerprint, total frames)
        self._stores: dict[tuple, _Store] = {}
        self._bytes_used: int | None = None
        self._counted = 0  # the folder's entries when _bytes_used was first counted
        self._rows: list[tuple[int, int]] | None = None
        self._trusted: list[bool] = []
        self._batch: dict | None = None
        self._cameras: list[str] = []
        self._call = 0
        self._original = None
        self._w: dict[tuple, torch.Tensor] = {}
        self._writes_off = False  # the disk filled up under the cache: compute, store nothing more
        self._warned = False

    def _frozen(self, level: str) -> list:
        """The modules whose weights the entries depend on."""
        vlm = self._vlm_expert.get_vlm_model()
        return [vlm.vision_model] + ([vlm.connector] if level == "connector" else [])

    def _key_extra(self) -> dict:
        return {}

    # ---- set-up ------------------------------------------------------------------
    @classmethod
    def create(cls, policy, settings, *, log_prefix: str = "") -> FrozenFeatureCache | None:
        """The cache if `settings.enabled` and the model allows it exactly, else None; logs which and why."""
        if not settings.enabled:
            log.info("%sfrozen-feature cache: off (feature_cache.enabled=false)", log_prefix)
            return None
        level, why = cache_level(policy)
        log.info("%sfrozen-feature cache: %s", log_prefix, why)
        if level is None:
            return None
        try:
            cache = cls(policy, settings.dir, max_bytes=int(settings.max_gb * 2**30), level=level,
                        resize=policy.config.resize_imgs_with_padding)
        except OSError as exc:  # a full or read-only disk: the cache is an optimisation, training goes on
            log.warning("%sfrozen-feature cache: off, cannot write to %s (%s); features are computed",
                        log_prefix, settings.dir, exc.strerror or exc)
            return None
        log.info("%sfrozen-feature cache at %s (budget %.1f GiB)", log_prefix, cache.root, settings.max_gb)
        return cache

    def register_dataset(self, task_id: int, root: str | Path) -> None:
        info = json.loads((Path(root) / "meta" / "info.json").read_text())
        self.register(task_id, dataset_fingerprint(root), int(info["total_frames"]))

    def register(self, task_id: int, fingerprint: str, num_frames: int) -> None:
        """Rows with this task id are frames 0..num_frames-1 of the dataset with this fingerprint."""
        self._datasets[int(task_id)] = (str(fingerprint), int(num_frames))

    def attach(self) -> None:
        if self._original is None:
            self._original = self._vlm_expert.embed_image
            self._vlm_expert.embed_image = self._embed_image

    def detach(self) -> None:
        if self._original is not None:
            del self._vlm_expert.embed_image  # drop the instance attribute: the class method shows again
            self._original = None

    def summary(self) -> str:
        return f"{self.stats.summary()} at the {self.level} level"

    # ---- one forward ---------------------------------------------------------------
    @contextlib.contextmanager
    def serving(self, task_ids, indices, model_batch: dict, not_decoded=None):
        """Around one `policy.forward(model_batch)` whose rows are frames `indices` of tasks `task_ids`.
        `not_decoded[r]`: the loader left row r's images undecoded (`CachedFrames`); serve them by key."""
        tids = [int(t) for t in task_ids]
        idx = [int(i) for i in indices]
        unknown = sorted({t for t in tids if t not in self._datasets})
        if unknown:
            raise KeyError(f"feature cache: no dataset registered for task id(s) {unknown}")
        self._rows, self._cameras, self._call = list(zip(tids, idx)), self._store_names(model_batch), 0
        self._batch = model_batch
        self._trusted = [bool(x) for x in not_decoded] if not_decoded is not None else [False] * len(tids)
        self.stats.undecoded += sum(self._trusted)
        try:
            yield self
        finally:
            self._rows, self._batch = None, None

    def _store_names(self, model_batch: dict) -> list[str]:
        """The stores a forward of `model_batch` reads, in call order: one per camera image."""
        cfg = self.policy.config
        present = [k for k in cfg.image_features if k in model_batch]
        missing = [k for k in cfg.image_features if k not in model_batch][: cfg.empty_cameras]
        return present + missing

    def _precision(self, device: torch.device) -> str:
        return precision_name(device)

    def cached_frames(self, precision: str, cameras: dict[int, list[str]]) -> CachedFrames:
        """The loader's test for frames whose features of all their task's `cameras` are stored at `precision`."""
        return CachedFrames({t: [self.root / precision / fp / f"{store_slug(c)}.digests.npy" for c in cameras[t]]
                             for t, (fp, _) in self._datasets.items() if t in cameras})

    def _digest(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.detach().flatten(1)
        k = (flat.shape[1], flat.device)
        w = self._w.get(k)
        if w is None:
            g = torch.Generator().manual_seed(_DIGEST_SEED)
            w = torch.randn(flat.shape[1], 2, generator=g, dtype=torch.float64).to(flat.device)
            self._w[k] = w
        return (flat.to(torch.float64) @ w).cpu()

    def _image_digests(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """[B, 2]: each decoded row's digest of its image tensors `parts` (each [B, ...]); NaN for the rows
        the loader left undecoded, whose frame key fixes their images."""
        out = torch.full((len(self._trusted), 2), float("nan"), dtype=torch.float64)
        check = [r for r, t in enumerate(self._trusted) if not t]
        if check:
            out[check] = self._digest(torch.cat([p[check].flatten(1).to(torch.float64) for p in parts], dim=1))
        return out

    def _hits(self, stores, digests: torch.Tensor) -> list[bool]:
        """Whether each row's stored entry is served: all its digest columns match; for an undecoded row,
        the entry exists and the columns after the image digest (2) match (none at the vision level)."""
        return [st.digests is not None and (
                    not np.isnan(st.digests[i, 0]) and np.array_equal(st.digests[i, 2:], digests[r, 2:].numpy())
                    if trusted else np.array_equal(st.digests[i], digests[r].numpy()))
                for r, (st, (_, i), trusted) in enumerate(zip(stores, self._rows, self._trusted))]

    def _store(self, precision: str, task_id: int, camera: str) -> _Store:
        fp, n = self._datasets[task_id]
        key = (precision, fp, camera)
        st = self._stores.get(key)
        if st is None:
            st = self._stores[key] = _Store(self.root / precision / fp, camera, n, self.DIGEST_WIDTH)
            if st.features is not None:
                entry = int(np.prod(st.features.shape[1:])) * st.features.itemsize
                st.writable = self._room(st, self._writable_unallocated(), entry)
        return st

    # ---- disk space ------------------------------------------------------------------
    def _writable_unallocated(self) -> int:
        """What the stores open for writing can still take on disk (their files' holes)."""
        return sum(st.unallocated() for st in self._stores.values() if st.writable and st.features is not None)

    def _room(self, st: _Store, unallocated: int, entry: int, extra: int = 0) -> bool:
        """Whether the disk holds what this cache can still write into `unallocated` bytes of holes:
        at most the rest of the budget, each entry's pages rounded up at both ends."""
        left = max(0, self._limit() - self._used_bytes())
        page = max(4096, os.statvfs(_existing(st.folder)).f_bsize)
        need = min(unallocated, left + -(-left // max(entry, 1)) * 2 * page) + extra + _FREE_MARGIN
        free = free_bytes(st.folder)
        if need <= free:
            return True
        self._warn(f"{_size(free)} free in {st.folder.parent}, {_size(need)} needed for {st.camera}")
        return False

    def _warn(self, why: str) -> None:
        # one warning per cache: every later store or batch that does not fit says the same
        (log.debug if self._warned else log.warning)(
            "frozen-feature cache: not enough disk space (%s): those features are computed, not stored; free "
            "space or point feature_cache.dir at a larger disk", why)
        self._warned = True

    def _used_bytes(self) -> int:
        """The folder's entries when first counted, then plus this process's own stores."""
        if self._bytes_used is None:
            total = 0
            for f in self.root.rglob("*.digests.npy"):
                d = np.load(f, mmap_mode="r")
                feats = np.load(str(f).replace(".digests.npy", ".features.npy"), mmap_mode="r")
                total += int((~np.isnan(d[:, 0])).sum()) * int(np.prod(feats.shape[1:])) * feats.itemsize
            self._bytes_used = self._counted = total
        return self._bytes_used

    def _limit(self) -> int:
        """This process's share of `max_bytes`: the processes of a launch on one machine fill this
        folder at once and each counts only its own stores after counting it, so each may take
        its part of the room that was left (else together they would store that many times
        the budget)."""
        self._used_bytes()
        return self._counted + max(0, self.max_bytes - self._counted) // processes.local_count()

    def _compute(self, images: torch.Tensor) -> torch.Tensor:
        if self.level == "connector":
            return self._original(images)
        vision = self._vlm_expert.get_vlm_model().vision_model
        return vision(pixel_values=images.to(dtype=vision.dtype)).last_hidden_state

    def _finish(self, feats: torch.Tensor) -> torch.Tensor:
        if self.level == "connector":
            return feats
        # Same two steps as LeRobot's embed_image after the encoder: the live connector.
        return self._vlm_expert.get_vlm_model().connector(feats)

    def _embed_image(self, image: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        if rows is None or self._call >= len(self._cameras) or any(m.training for m in self._frozen_modules):
            return self._original(image)
        camera = self._cameras[self._call]
        self._call += 1
        precision = self._precision(image.device)
        digests = self._image_digests([image])
        stores = [self._store(precision, t, camera) for t, _ in rows]
        hit = self._hits(stores, digests)
        miss = [r for r, h in enumerate(hit) if not h]
        lost = [rows[r] for r in miss if self._trusted[r]]
        if lost:
            raise CacheEntryLost(f"feature cache: the {camera} features of frame {lost[0][1]} (task {lost[0][0]}) were "
                                 f"stored when the loader skipped decoding it, and are gone now (was {self.root} "
                                 "deleted during training?); run the command again to resume")
        computed = None
        if miss:
            with torch.no_grad():
                computed = self._compute(image[miss])
        hits = [r for r, h in enumerate(hit) if h]
        out = self._assemble(stores, rows, miss, hits, computed, image.device)
        if miss:
            self._save(stores, rows, miss, computed, digests)
        self.stats.hits += len(hits)
        self.stats.misses += len(miss)
        return self._finish(out)

    def _assemble(self, stores, rows, miss, hits, computed: torch.Tensor | None, device) -> torch.Tensor:
        """The batch's entries: rows `miss` from `computed`, rows `hits` read from their stores."""
        if computed is not None:
            out = torch.empty((len(rows), *computed.shape[1:]), dtype=computed.dtype, device=device)
            out[miss] = computed
        else:
            st = stores[0]
            out = torch.empty((len(rows), *st.features.shape[1:]), dtype=_TORCH_DTYPES[st.features.dtype.type],
                              device=device)
        if hits:
            t = torch.from_numpy(np.stack([stores[r].features[rows[r][1]] for r in hits]))
            out[hits] = (t.view(torch.bfloat16) if out.dtype == torch.bfloat16 else t).to(out.device)
        return out

    def _save(self, stores, rows, miss, computed: torch.Tensor, digests: torch.Tensor) -> None:
        cpu = computed.detach().cpu()
        np_dtype = _NP_DTYPES.get(cpu.dtype)
        if np_dtype is None or self._writes_off:
            return
        arr = (cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu).numpy().view(np_dtype)
        entry = int(np.prod(arr.shape[1:])) * arr.itemsize
        writes = sum(stores[r].writable for r in miss)
        if not writes or self._used_bytes() + entry > self._limit():
            return
        # The stores' space was there when they were opened; something else (checkpoints, other jobs)
        # may have taken it since. A write into a hole without space is a SIGBUS: check these entries.
        page = max(4096, os.statvfs(_existing(self.root)).f_bsize)
        need = writes * (entry + 2 * page) + _FREE_MARGIN
        free = free_bytes(self.root)
        if need > free:
            self._writes_off = True
            self._warn(f"{_size(free)} free in {self.root}, {_size(need)} needed for a batch of entries")
            return
        for j, r in enumerate(miss):
            if self._used_bytes() + entry > self._limit():
                return
            st, i = stores[r], rows[r][1]
            if not st.writable:
                continue
            if st.digests is None:
                feats, digest_bytes = st.full_bytes(tuple(arr.shape[1:]), np_dtype)
                if not self._room(st, self._writable_unallocated() + feats, entry, extra=digest_bytes):
                    st.writable = False
                    continue
                try:
                    st.create(tuple(arr.shape[1:]), np_dtype)
                except OSError as exc:  # ENOSPC while writing a header (plain writes, not the map)
                    st.writable = False
                    self._warn(f"creating {st.feat_path}: {exc.strerror or exc}")
                    continue
            if st.features.shape[1:] != arr.shape[1:] or st.features.dtype != np_dtype:
                continue
            was_empty = bool(np.isnan(st.digests[i, 0]))
            if not was_empty and np.array_equal(st.digests[i], digests[r].numpy()):
                # another process stored this very entry meanwhile; invalidating it to write it again
                # would fail a loader of that process that found it stored and skipped decoding
                continue
            st.digests[i] = np.nan  # invalidate before overwriting, so no reader pairs old digest + new features
            st.features[i] = arr[j]
            st.digests[i] = digests[r].numpy()
            if was_empty:
                self._bytes_used += entry
                self.stats.stored += 1
                self.stats.bytes_stored += entry


def serving(cache: FrozenFeatureCache | None, raw_batch: dict, model_batch: dict):
    """`cache.serving(...)` for a loader batch (its task_id + index columns), or a no-op without a cache."""
    if cache is None:
        return contextlib.nullcontext()
    return cache.serving(raw_batch["task_id"], raw_batch["index"], model_batch, raw_batch.get(NOT_DECODED_KEY))
