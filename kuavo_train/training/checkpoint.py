"""Checkpoints in LeRobot's layout, written atomically.

    checkpoints/<name>/pretrained_model/   config.json, model.safetensors,
                                          policy_{pre,post}processor*.json/.safetensors
    checkpoints/<name>/training_state/     optimizer, scheduler, RNG, training_step.json
    checkpoints/<name>/kuavo_checkpoint.json  stage, epoch, step, validation losses
    checkpoints/<name>/strategy_state.safetensors  what the run's strategy kept from earlier stages
                                              (only when it keeps anything; kuavo_train/strategies/)
    checkpoints/last/strategy_state_final.safetensors  the same, this stage included (end of stage)
    .../pretrained_model/adapters/task<k>/    per-task LoRA adapters in PEFT's layout, beside the base
                                              (strategy lora_per_task; kuavo_train/policy/adapters.py)
    .../pretrained_model/kuavo_tasks.json      the tasks (ids, names, instructions) the
                                              model was trained on, for the inference wrapper
    .../pretrained_model/train_config.json     LeRobot's TrainPipelineConfig of the stage, so that
                                              stock `lerobot-train --resume=true` can continue it
                                              (kuavo_train/training/stock_resume.py)

Every checkpoint is first written into a hidden temporary folder and renamed
into place, so a crash leaves either the old or the new one, never a half.
Free space is checked before writing (the bytes needed are estimated from the
tensors or the source tree), and a disk that fills up anyway is reported as a
one-line `DiskFullError`; either way the temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import kuavo_train.processes as processes
from kuavo_train.errors import KuavoError
from kuavo_train.files import atomic_path, replace_dir, staging_dir
from kuavo_train.policy import vlm_cache
from kuavo_train.policy.feature_cache import free_bytes
from kuavo_train.policy.factory import PRETRAINED_DIR, save_policy
from kuavo_train.training import stock_resume
from kuavo_train.training.optim import stock_param_groups

META_FILE = "kuavo_checkpoint.json"
TASKS_FILE = "kuavo_tasks.json"
STRATEGY_FILE = "strategy_state.safetensors"
STRATEGY_FINAL_FILE = "strategy_state_final.safetensors"
# Room for what the tensors do not count (configs, processor stats, RNG state, task lists: tens of KB).
SMALL_FILES_BYTES = 1 << 20


class DiskFullError(KuavoError):
    """Not enough space for a checkpoint; the earlier checkpoints are intact, nothing half-written is left."""


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def _tensors_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def tree_bytes(path) -> int:
    """Bytes of the files under `path` (symlinks followed, as the copy does)."""
    if path is None or not Path(path).is_dir():
        return 0
    return sum(os.stat(Path(d) / f).st_size for d, _, files in os.walk(path, followlinks=True) for f in files)


def checkpoint_bytes(policy, optimizer) -> int:
    """About what `write_checkpoint` writes: the weights, the optimizer's state tensors, the bundled VLM."""
    total = _tensors_bytes(policy.state_dict().values())
    for state in getattr(optimizer, "optimizer", optimizer).state.values():  # accelerate wraps the optimizer
        total += _tensors_bytes(state.values())
    name = policy.config.vlm_model_name
    if vlm_cache.is_embedded(name):
        total += tree_bytes(vlm_cache.cached_snapshot(name))
    return total + SMALL_FILES_BYTES


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT however it arrives: an OSError, shutil.Error's list, or safetensors' SafetensorError."""
    for _ in range(8):  # the cause/context chain
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(k in text for k in ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full_message(dest: Path, needed: int, reason: str = "") -> str:
    free = free_bytes(dest.parent)
    return (f"disk full: cannot write the checkpoint {dest}{reason}: it needs about {_size(needed)}, {_size(free)} "
            "are free there; free some space (or move run_dir to a larger disk) and rerun: the earlier checkpoints "
            "are intact")


def _ensure_space(dest: Path, needed: int) -> None:
    if needed > free_bytes(dest.parent):
        raise DiskFullError(_disk_full_message(dest, needed))


@contextlib.contextmanager
def _disk_full_is_one_line(dest: Path, needed: int):
    """The estimate can be short (or another process fills the disk meanwhile): translate the write error
    too. Runs after the temporary folder was removed, so the free space shown is what the user has."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not _disk_full(exc):
            raise
        raise DiskFullError(_disk_full_message(dest, needed, " (no space left on device)")) from None


def write_checkpoint(ckpt_dir: Path, *, policy, preprocessor, postprocessor, optimizer, scheduler, step: int, meta: dict, trained_tasks: list[dict],
                     stock: stock_resume.StockSpec | None = None, strategy_state: dict | None = None) -> Path:
    from lerobot.common.train_utils import save_training_state

    ckpt_dir = Path(ckpt_dir)
    needed = checkpoint_bytes(policy, optimizer)
    with _disk_full_is_one_line(ckpt_dir, needed):
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        _ensure_space(ckpt_dir, needed)
        tmp = staging_dir(ckpt_dir.parent, ckpt_dir.name)
        try:
            pretrained = tmp / PRETRAINED_DIR
            save_policy(policy, pretrained)
            preprocessor.save_pretrained(pretrained)
            postprocessor.save_pretrained(pretrained)
            vlm_cache.bundle(policy.config.vlm_model_name, pretrained)
            (pretrained / TASKS_FILE).write_text(json.dumps({"tasks": trained_tasks}, indent=2) + "\n")
            if stock is not None:
                meta = {**meta, "stock_resume": stock_resume.write_train_config(pretrained, policy.config, stock)}
            with stock_param_groups(optimizer):
                # the launch's size and batch: stock warns when it continues with others
                save_training_state(tmp, step, optimizer, scheduler, num_processes=processes.count(),
                                    batch_size=stock.batch_size if stock is not None else None)
            (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
            if strategy_state:
                _save_tensors(strategy_state, tmp / STRATEGY_FILE)
            replace_dir(tmp, ckpt_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ckpt_dir


def copy_checkpoint(src: Path, dest: Path) -> Path:
    """Atomic copy (used for `best` and the numbered periodic checkpoints)."""
    dest = Path(dest)
    needed = tree_bytes(src)
    with _disk_full_is_one_line(dest, needed):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _ensure_space(dest, needed)
        tmp = staging_dir(dest.parent, dest.name)
        tmp.rmdir()  # copytree makes it
        try:
            shutil.copytree(src, tmp)
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_final_strategy_state(ckpt_dir: Path, state: dict) -> None:
    """Add the strategy's end-of-stage state to the stage's complete final checkpoint, beside the state
    the stage started from (kept, so that a rerun after a crash here computes the end state again
    from the same start instead of adding the stage twice)."""
    if state:
        with atomic_path(Path(ckpt_dir) / STRATEGY_FINAL_FILE) as tmp:
            _save_tensors(state, tmp)


def read_strategy_state(ckpt_dir: Path, *, final: bool) -> dict:
    """The strategy state a checkpoint holds: the stage's start state, or (final) its end state."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / (STRATEGY_FINAL_FILE if final else STRATEGY_FILE)
    return load_file(str(path)) if path.is_file() else {}


def read_meta(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / META_FILE).read_text())


def is_complete(ckpt_dir: Path) -> bool:
    d = Path(ckpt_dir)
    return (d / META_FILE).is_file() and (d / PRETRAINED_DIR / "model.safetensors").is_file()


def clean_temporaries(folder: Path) -> None:
    """Remove leftovers of writes that a crash interrupted.

    A swap (`replace_dir`) moves the old checkpoint to `.old-<name>~<host>~<pid>` and then renames the
    new one in: a kill between the two renames leaves no `<name>`, so its old copy is put back
    (it is complete: it was the checkpoint before the swap began)."""
    if not Path(folder).is_dir():
        return
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".old-"):
            name = p.name[len(".old-"):].split("~")[0]
            if not (p.parent / name).exists() and is_complete(p):
                os.replace(p, p.parent / name)
                continue
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
