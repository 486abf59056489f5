"""LeRobot v2.1 datasets (what lerobot 0.3.x and Kuavo's own converter wrote) as input.

lerobot 0.6.1 reads only v3.x; its converter (`lerobot.scripts.convert_dataset_v21_to_v30`)
works offline but converts IN PLACE (the original moves to `<root>_old`) and writes no
`val` split. Here the converter always runs on a copy, the result is checked with
LeRobot's own metadata reader and then published with one rename, so a reader sees either
nothing or a complete v3.0 dataset, and the user's original is never touched.

    dataset_version(root)        "v2.1", "v3.0", ... from meta/info.json
    convert_v21(src, dst)        a v3.0 copy of a v2.1 dataset at dst (`kuavo-train convert v21`)
    v3_view(root, cache_dir)     for the pipeline: root itself if v3.x, else a cached converted copy
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from kuavo_train.errors import DataError, first_line
from kuavo_train.files import locked, staging_dir

log = logging.getLogger(__name__)

MARKER = "meta/kuavo_conversion.json"  # provenance of a converted copy; LeRobot ignores it
CACHE_ENV = "KUAVO_V30_CACHE"
_COPIED = ("meta", "data", "videos")  # all that LeRobot's converter reads


def dataset_version(root: str | Path) -> str:
    """`codebase_version` of the LeRobot dataset at `root` ("unknown" when info.json has none)."""
    info_path = Path(root) / "meta" / "info.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise DataError(f"data error: no LeRobot dataset at {root} (missing meta/info.json)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"data error: cannot read {info_path}: {exc}") from None
    version = info.get("codebase_version") if isinstance(info, dict) else None
    return str(version) if version else "unknown"


def default_cache_dir(root: str | Path) -> Path:
    """Where the pipeline keeps v3.0 copies of v2.1 datasets: $KUAVO_V30_CACHE, else `.v30` beside the dataset."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(root).resolve().parent / ".v30"


def _lerobot_dir() -> Path | None:
    spec = importlib.util.find_spec("lerobot")  # imports only lerobot/__init__.py (light)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _unsupported(root: Path, version: str) -> str:
    """What to do with a dataset version that is neither v3.x nor v2.1 (one line)."""
    v = version.lstrip("v")
    if v.startswith("2.0"):
        lr = _lerobot_dir()
        if lr is not None and (lr / "datasets" / "v21" / "convert_dataset_v20_to_v21.py").is_file():
            how = "convert it to v2.1 first with `python -m lerobot.datasets.v21.convert_dataset_v20_to_v21`"
        else:
            how = ("the installed lerobot has no v2.0 -> v2.1 converter: convert it to v2.1 with lerobot 0.3.x "
                   "(`python -m lerobot.datasets.v21.convert_dataset_v20_to_v21 --repo-id=ID`, which works on "
                   "Hugging Face hub datasets)")
        return f"{root} is a LeRobot {version} dataset; {how}, then use it here or run `kuavo-train convert v21`"
    if v.startswith("1."):
        return (f"{root} is a LeRobot {version} dataset, too old to read: convert it with lerobot 0.3.x to v2.0 "
                "(`python -m lerobot.datasets.v2.convert_dataset_v1_to_v2`) and then to v2.1 "
                "(`python -m lerobot.datasets.v21.convert_dataset_v20_to_v21`), then use it here")
    return (f"{root} has LeRobot codebase_version {version!r}, which this lerobot cannot read; "
            "kuavo-train reads v3.x datasets and converts v2.1 ones")


def _check_v21(src: Path) -> None:
    version = dataset_version(src)
    if version.startswith("v3"):
        raise DataError(f"data error: {src} is already a LeRobot {version} dataset; use it as it is")
    if version != "v2.1":
        raise DataError(f"data error: {_unsupported(src, version)}")
    missing = [f for f in _V21_META if not (src / "meta" / f).is_file()]
    if missing:  # else LeRobot's converter fails part-way, naming its own temporary copy
        raise DataError(f"data error: {src} is a LeRobot v2.1 dataset without meta/{', meta/'.join(missing)}, which "
                        "the conversion reads: restore them from the dataset's source (LeRobot v2.1 writes them with "
                        "every dataset)")


# The metadata files of a v2.1 dataset that LeRobot's v3.0 converter reads.
_V21_META = ("tasks.jsonl", "episodes.jsonl", "episodes_stats.jsonl")


class _DropExpected(logging.Filter):
    """LeRobot warns that v2.1's total_chunks/total_videos are unknown to v3.0: expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown fields in DatasetInfo" not in record.getMessage()


@contextlib.contextmanager
def _quiet_converter():
    """The converter logs its temporary paths at INFO on the root logger: keep them out of the user's log."""
    root_logger = logging.getLogger()
    utils_logger = logging.getLogger("lerobot.datasets.utils")
    level = root_logger.level
    flt = _DropExpected()
    root_logger.setLevel(max(level, logging.WARNING))
    utils_logger.addFilter(flt)
    try:
        yield
    finally:
        root_logger.setLevel(level)
        utils_logger.removeFilter(flt)


def _run_lerobot_converter(work: Path, repo_id: str) -> None:
    """LeRobot's own v2.1 -> v3.0 converter on `work` (a private copy: it converts in place)."""
    from lerobot.scripts.convert_dataset_v21_to_v30 import convert_dataset

    with _quiet_converter():
        # with a local root and push_to_hub=False it never contacts the hub
        convert_dataset(repo_id=repo_id, root=str(work), push_to_hub=False)


def _verify(work: Path, repo_id: str, src_info: dict) -> dict:
    """Open the result with LeRobot's metadata reader and compare its totals with the source's."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    for rel in ("meta/info.json", "meta/tasks.parquet", "meta/episodes"):
        if not (work / rel).exists():  # (LeRobot would try the hub for missing metadata)
            raise ValueError(f"the converter wrote no {rel}")
    meta = LeRobotDatasetMetadata(repo_id, root=work)
    version = str(meta.info.codebase_version)
    if not version.startswith("v3"):
        raise ValueError(f"the converter wrote codebase_version {version}")
    for key, got in (("total_episodes", meta.total_episodes), ("total_frames", meta.total_frames)):
        want = src_info.get(key)
        if want is not None and int(want) != int(got):
            raise ValueError(f"{key} is {got} after conversion, {want} in the source")
    return json.loads((work / "meta" / "info.json").read_text())


def _carry_splits(work: Path, src_info: dict, out_info: dict) -> None:
    """Keep the source's `splits` (v2.1 writes {"train": "0:N"}; users may have added "val")."""
    splits = src_info.get("splits")
    if splits and out_info.get("splits") != splits:
        out_info["splits"] = dict(splits)
        (work / "meta" / "info.json").write_text(json.dumps(out_info, indent=4, ensure_ascii=False))


def convert_v21(src: str | Path, dst: str | Path, *, repo_id: str | None = None) -> Path:
    """Write a LeRobot v3.0 copy of the v2.1 dataset `src` at `dst` (which must not exist); return `dst`.

    LeRobot's converter runs on a copy in a temporary folder next to `dst`; the result is
    checked with `LeRobotDatasetMetadata` and renamed into place. `src` is only read.
    Failures raise a one-line `DataError` and leave nothing at `dst`.
    """
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if not src.is_dir():
        raise DataError(f"data error: no LeRobot dataset at {src} (not a folder)")
    _check_v21(src)
    if dst.exists():
        raise DataError(f"data error: {dst} already exists; give a new folder for the v3.0 copy (or remove it)")
    if dst == src or src in dst.parents:
        raise DataError(f"data error: the v3.0 copy {dst} cannot be inside the source dataset {src}")
    src_info = json.loads((src / "meta" / "info.json").read_text())
    repo_id = repo_id or f"local/{src.name}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(dst.parent, dst.name)
    except OSError as exc:
        raise DataError(f"data error: cannot write next to {dst}: {first_line(exc)}") from None
    try:
        work = tmp / "dataset"
        work.mkdir()
        for part in _COPIED:
            if (src / part).is_dir():
                shutil.copytree(src / part, work / part, symlinks=False)
        try:
            _run_lerobot_converter(work, repo_id)
            out_info = _verify(work, repo_id, src_info)
        except Exception as exc:  # LeRobot raises many kinds on a broken dataset
            raise DataError(f"data error: cannot convert the LeRobot v2.1 dataset at {src}: {first_line(exc)}") from None
        _carry_splits(work, src_info, out_info)
        (work / MARKER).write_text(json.dumps({
            "source": str(src),
            "source_codebase_version": src_info.get("codebase_version"),
            "converter": "lerobot.scripts.convert_dataset_v21_to_v30",
            "lerobot_version": _lerobot_version(),
        }, indent=2))
        shutil.rmtree(tmp / "dataset_old", ignore_errors=True)  # the converter's moved-away copy
        if dst.exists():  # someone else published meanwhile: never replace it
            raise DataError(f"data error: {dst} appeared while converting {src}; remove one of them")
        os.rename(work, dst)
    except OSError as exc:
        raise DataError(f"data error: cannot convert the LeRobot v2.1 dataset at {src}: {first_line(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _lerobot_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lerobot")
    except Exception:
        return None


def fingerprint(root: str | Path) -> str:
    """Hash of info.json and of every file's path, size and mtime: changes when the dataset does."""
    root = Path(root)
    h = hashlib.sha256((root / "meta" / "info.json").read_bytes())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.stat()
            h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def v3_view(root: str | Path, cache_dir: str | Path, *, label: str | None = None) -> Path:
    """A LeRobot v3.x dataset with the content of `root`.

    v3.x: `root` itself. v2.1: a converted copy in `cache_dir/<name>-<fingerprint>`, made on
    first use and reused while the source is unchanged. Other versions: a one-line
    `DataError` saying what to do (`label`, e.g. the config field, prefixes the message).
    """
    root = Path(root)
    prefix = f"data error: {label}: " if label else "data error: "
    try:
        version = dataset_version(root)
    except DataError as exc:
        raise DataError(prefix + str(exc).removeprefix("data error: ")) from None
    if version.startswith("v3"):
        return root
    if version != "v2.1":
        raise DataError(prefix + _unsupported(root, version))
    target = Path(cache_dir) / f"{root.name}-{fingerprint(root)}"
    if _is_converted(target):
        log.debug("using the v3.0 copy of %s in %s", root, target)
        return target
    try:
        _check_v21(root)  # a dataset refused leaves no cache folder behind
        with _converting(target):  # the processes of a launch open every dataset at once: one converts
            if _is_converted(target):
                return target
            log.info("converting the LeRobot v2.1 dataset at %s to v3.0 in %s (the original is left unchanged)",
                     root, target)
            return convert_v21(root, target)
    except DataError as exc:
        if _is_converted(target):  # another process converted it at the same time
            return target
        msg = str(exc).removeprefix("data error: ")
        if msg.startswith("cannot write next to"):
            msg += f" (set {CACHE_ENV} to a writable folder for converted copies)"
        raise DataError(prefix + msg) from None


@contextlib.contextmanager
def _converting(target: Path):
    """A lock beside the converted copy, held while one process writes it."""
    lock = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as exc:
        raise DataError(f"data error: cannot write next to {target}: {first_line(exc)}") from None
    with locked(lock):
        yield


def _is_converted(path: Path) -> bool:
    try:
        return (path / MARKER).is_file() and dataset_version(path).startswith("v3")
    except DataError:
        return False
