"""The file helpers every layer shares (kuavo_train/files.py)."""

import hashlib

import pytest

from kuavo_train.files import hash_file


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 3 + 17])
def test_hash_file_gives_the_digest_of_the_whole_file(tmp_path, size):
    # digests of base models and datasets name stored results (shared base rows, feature caches):
    # feeding a file by chunks must not change them
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    whole, chunked = hashlib.sha256(b"prefix"), hashlib.sha256(b"prefix")
    whole.update(f.read_bytes())
    hash_file(chunked, f, chunk=4096)
    assert chunked.hexdigest() == whole.hexdigest()



def test_data_is_on_disk_before_its_name_is(tmp_path, monkeypatch):
    """A power loss after a rename must not leave the new name over an empty file (ext4 can write
    a rename before the data it names): every file and folder moved into place is fsynced first,
    and the folder holding the new name after."""
    import os

    from kuavo_train.files import replace_dir, write_json_atomic

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json_atomic(tmp_path / "run.json", {"a": 1})
    (staged := tmp_path / "staged" / "sub").mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"w" * 100)
    (tmp_path / "ckpt").mkdir()
    replace_dir(tmp_path / "staged", tmp_path / "ckpt")

    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    first = events[renames[0]]  # the json's temporary file, then its folder after the rename
    assert ("fsync", first[1]) in events[:renames[0]] and events[renames[0] + 1] == ("fsync", str(tmp_path))
    before_swap = [e[1] for e in events[renames[0] + 1:renames[1]] if e[0] == "fsync"]
    for p in (staged / "model.safetensors", staged, tmp_path / "staged"):
        assert str(p) in before_swap, (p, events)
    assert len(renames) == 3 and events[renames[2] + 1] == ("fsync", str(tmp_path)), events
    assert (tmp_path / "ckpt" / "sub" / "model.safetensors").read_bytes() == b"w" * 100


def test_staging_clears_what_dead_processes_of_this_machine_left(tmp_path):
    """A conversion or dataset build killed outright (SIGKILL, power loss) leaves its staging folder
    (decoded frames: gigabytes) and perhaps the old copy a swap had set aside: the next build of the
    same name clears them, and leaves live processes' and other machines' folders alone."""
    import os
    import socket
    import subprocess
    import sys

    from kuavo_train.files import staging_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    (tmp_path / f".tmp-ds~{host}~{dead}~abc" / "frames").mkdir(parents=True)
    (tmp_path / f".old-ds~{host}~{dead}" / "meta").mkdir(parents=True)  # killed between the swap's renames
    kept = [tmp_path / f".tmp-ds~{host}~{os.getpid()}~xyz",  # a live process's
            tmp_path / f".tmp-ds~another-host~{dead}~abc",  # another machine's on a shared disk
            tmp_path / f".tmp-ds2~{host}~{dead}~abc"]  # another name's
    for p in kept:
        p.mkdir()
    new = staging_dir(tmp_path, "ds")
    assert (tmp_path / "ds" / "meta").is_dir()  # the whole old one, put back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", new.name, *(p.name for p in kept)])
    assert new.name.startswith(f".tmp-ds~{host}~{os.getpid()}~") and not any(new.iterdir())
