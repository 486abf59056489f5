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

