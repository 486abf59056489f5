"""Atomic file writes: the one helper every layer uses, so that a crash, a power loss or a full
disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; when the block ends without error it is renamed to
    `path`, otherwise removed. For writers that want a file name (savefig, safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _sync(tmp)
        os.replace(tmp, path)
        _sync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk. A rename can reach the disk before the
    data it names (ext4's delayed allocation): after a power loss the new name would hold an empty
    or short file where the old whole one was."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: str | Path) -> None:
    """`_sync` every file and folder under `root`, before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(p := os.path.join(folder, name)):
                _sync(Path(p))
        _sync(Path(folder))


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def hash_file(h, path: str | Path, chunk: int = 1 << 20) -> None:
    """Feed a file's bytes into the hash `h` a chunk at a time: the digest of reading it whole,
    without holding a base model's weights (about 1 GB for smolvla_base) in memory."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def hash_folder(h, folder: str | Path) -> None:
    """Feed every file under `folder` (relative path, then bytes; sorted) into the hash `h`."""
    folder = Path(folder)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        hash_file(h, f)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def settle_modes(root: str | Path) -> None:
    """Give a staged folder and everything in it the modes a plain mkdir / open would have given
    under the user's umask. The staging folder comes from tempfile.mkdtemp (0700) and safetensors
    writes its files 0600, so a checkpoint would otherwise be unreadable to every other user (a
    robot runtime, a container, a colleague on a shared disk)."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o100 else 0o666) & ~mask)


def _owner() -> str:
    return f"{socket.gethostname()}~{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def staging_dir(parent: str | Path, name: str) -> Path:
    """A new empty folder in `parent` to build `parent/name` in before `replace_dir` moves it there,
    named after this process (`.tmp-<name>~<host>~<pid>~<random>`). First the leftovers of earlier
    processes of this machine that died (SIGKILL, power loss: no clean-up ran) for the same name are
    cleared: their staging folders removed (a conversion's decoded frames can be gigabytes), and an old
    `name` a swap had set aside put back if the swap never finished. Folders of live processes, or of
    other machines sharing the disk, are left alone."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for p in list(parent.iterdir()):
        for kind in (".tmp-", ".old-"):
            if not p.name.startswith(f"{kind}{name}~"):
                continue
            host, _, pid = p.name[len(kind) + len(name) + 1:].partition("~")
            pid = pid.split("~")[0]
            if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == ".old-" and not (parent / name).exists():
                os.replace(p, parent / name)  # the swap moved the whole old one aside, then died
            else:
                shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}~{_owner()}~"))


def replace_dir(src: Path, dest: Path) -> None:
    """Move the staged folder `src` to `dest` (its modes settled first), replacing an old `dest`
    so that a crash leaves one of the two whole."""
    src, dest = Path(src), Path(dest)
    settle_modes(src)
    sync_tree(src)
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}~{_owner()}")
        os.replace(dest, old)
    os.replace(src, dest)
    _sync(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def locked(path: str | Path):
    """Hold an exclusive lock on the file `path` (created if missing) for the block: processes
    building the same thing at once wait for the first. Released when the file closes, so also
    when its process dies."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
