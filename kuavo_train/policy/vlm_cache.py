"""Make a locally generated VLM resolvable by name, like a downloaded one.

SmolVLA stores `vlm_model_name` in its config.json and every loader (ours and
stock LeRobot's) passes that string to `AutoConfig/AutoProcessor.from_pretrained`.
An absolute path breaks as soon as the folder moves, so the embedded tiny VLM
gets a hub-style repo id instead, and its files are placed in the local
Hugging Face hub cache exactly where a download would put them. With
`HF_HUB_OFFLINE=1` transformers then resolves it with no network, from any
working directory. huggingface_hub has no public "add a local folder to the
cache" call, hence this small hand-written writer of its documented layout
(`models--{org}--{name}/snapshots/{revision}/...` + `refs/main`).

Every checkpoint also carries a copy of the VLM folder (`vlm/`), so a
checkpoint copied to another machine can re-register it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from kuavo_train.errors import KuavoError
from kuavo_train.files import hash_file, settle_modes, sync_tree, write_text_atomic

REPO_PREFIX = "kuavo-train/tiny-smolvlm-"
BUNDLED_DIR = "vlm"
# Files that define the backbone for `load_vlm_weights=False`.
_FILES = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "kuavo_tiny_vlm.json")


class VLMNotFoundError(KuavoError):
    """A checkpoint names an embedded VLM this machine cannot resolve; `str()` is one line."""


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def content_revision(vlm_dir: Path) -> str:
    """A 40-hex revision derived from the files, so equal content gets equal ids."""
    h = hashlib.sha1()
    for name in _FILES:
        f = vlm_dir / name
        if f.is_file():
            h.update(name.encode())
            hash_file(h, f)
    return h.hexdigest()


def repo_id_for(vlm_dir: Path) -> str:
    return REPO_PREFIX + content_revision(Path(vlm_dir))[:12]


def is_embedded(vlm_model_name: str | None) -> bool:
    return bool(vlm_model_name) and vlm_model_name.startswith(REPO_PREFIX)


def cached_snapshot(repo_id: str) -> Path | None:
    repo_dir = _hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    snap = repo_dir / "snapshots" / ref.read_text().strip()
    return snap if (snap / "config.json").is_file() else None


def register(vlm_dir: str | Path) -> str:
    """Place `vlm_dir` in the hub cache (idempotent, atomic) and return its repo id."""
    vlm_dir = Path(vlm_dir)
    repo_id = repo_id_for(vlm_dir)
    if cached_snapshot(repo_id) is not None:
        return repo_id
    revision = content_revision(vlm_dir)
    repo_dir = _hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    snap.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=snap.parent, prefix=".tmp-"))
    for name in _FILES:
        if (vlm_dir / name).is_file():
            shutil.copy2(vlm_dir / name, tmp / name)
    settle_modes(tmp)  # a model cache other users may read
    sync_tree(tmp)  # its files on disk before the refs name it
    try:
        os.replace(tmp, snap)
    except OSError:  # another process registered it first
        shutil.rmtree(tmp, ignore_errors=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    write_text_atomic(repo_dir / "refs" / "main", revision)
    return repo_id


def _go_offline() -> None:
    from huggingface_hub import constants

    # huggingface_hub reads this flag at every request (is_offline_mode), so setting it late works
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def bundle(vlm_model_name: str, pretrained_dir: str | Path) -> None:
    """Copy the embedded VLM's files next to a saved policy (no-op for real VLMs)."""
    if not is_embedded(vlm_model_name):
        return
    snap = cached_snapshot(vlm_model_name)
    if snap is None:
        return
    dest = Path(pretrained_dir) / BUNDLED_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for f in snap.iterdir():
        shutil.copy2(f, dest / f.name)


def ensure_available(vlm_model_name: str | None, pretrained_dir: str | Path | None) -> None:
    """Re-register a checkpoint's bundled VLM when this machine's cache lacks it.

    An embedded VLM exists on no hub: every lookup of it is local, so the process goes
    offline (without it, each lookup retries an unreachable host for minutes)."""
    if not is_embedded(vlm_model_name):
        return
    _go_offline()
    if cached_snapshot(vlm_model_name) is not None:
        return
    bundled = Path(pretrained_dir) / BUNDLED_DIR if pretrained_dir else None
    if bundled is None or not (bundled / "config.json").is_file():
        raise VLMNotFoundError(
            f"the embedded VLM {vlm_model_name!r} is neither in this machine's Hugging Face cache nor bundled in "
            f"{bundled}: load or `kuavo-train register-vlm` a checkpoint of the same base that bundles it (ours do; "
            "stock lerobot-train's do not), or rebuild the base with `kuavo-train build-base`"
        )
    registered = register(bundled)
    if registered != vlm_model_name:
        raise VLMNotFoundError(f"bundled VLM in {bundled} does not match {vlm_model_name!r} (got {registered!r})")
