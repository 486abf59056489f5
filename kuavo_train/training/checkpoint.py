"""Checkpoints in LeRobot's layout, written atomically.

    checkpoints/<name>/pretrained_model/   config.json, model.safetensors,
                                          policy_{pre,post}processor*.json/.safetensors
    checkpoints/<name>/training_state/     optimizer, scheduler, RNG, training_step.json
    checkpoints/<name>/kuavo_checkpoint.json  stage, epoch, step, validation losses
    .../pretrained_model/kuavo_tasks.json      the tasks (ids, names, instructions) the
                                              model was trained on, for the inference wrapper
    .../pretrained_model/train_config.json     LeRobot's TrainPipelineConfig of the stage, so that
                                              stock `lerobot-train --resume=true` can continue it
                                              (kuavo_train/training/stock_resume.py)

Every checkpoint is first written into a hidden temporary folder and renamed
into place, so a crash leaves either the old or the new one, never a half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from kuavo_train.policy import vlm_cache
from kuavo_train.policy.factory import PRETRAINED_DIR, replace_dir
from kuavo_train.training import stock_resume

META_FILE = "kuavo_checkpoint.json"
TASKS_FILE = "kuavo_tasks.json"


def write_checkpoint(ckpt_dir: Path, *, policy, preprocessor, postprocessor, optimizer, scheduler, step: int, meta: dict, trained_tasks: list[dict],
                     stock: stock_resume.StockSpec | None = None) -> Path:
    from lerobot.common.train_utils import save_training_state

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir.parent, prefix=f".tmp-{ckpt_dir.name}-"))
    try:
        pretrained = tmp / PRETRAINED_DIR
        policy.save_pretrained(pretrained)
        preprocessor.save_pretrained(pretrained)
        postprocessor.save_pretrained(pretrained)
        vlm_cache.bundle(policy.config.vlm_model_name, pretrained)
        (pretrained / TASKS_FILE).write_text(json.dumps({"tasks": trained_tasks}, indent=2) + "\n")
        if stock is not None:
            meta = {**meta, "stock_resume": stock_resume.write_train_config(pretrained, policy.config, stock)}
        save_training_state(tmp, step, optimizer, scheduler)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
        replace_dir(tmp, ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_dir


def copy_checkpoint(src: Path, dest: Path) -> Path:
    """Atomic copy (used for `best` and the numbered periodic checkpoints)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}-"))
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dest)
    return dest


def read_meta(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / META_FILE).read_text())


def is_complete(ckpt_dir: Path) -> bool:
    d = Path(ckpt_dir)
    return (d / META_FILE).is_file() and (d / PRETRAINED_DIR / "model.safetensors").is_file()


def clean_temporaries(folder: Path) -> None:
    """Remove leftovers of writes that a crash interrupted.

    A swap (`replace_dir`) moves the old checkpoint to `.old-<name>-<pid>` and then renames the
    new one in: a kill between the two renames leaves no `<name>`, so its old copy is put back
    (it is complete: it was the checkpoint before the swap began)."""
    if not Path(folder).is_dir():
        return
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".old-"):
            name = p.name[len(".old-"):].rsplit("-", 1)[0]
            if not (p.parent / name).exists() and is_complete(p):
                os.replace(p, p.parent / name)
                continue
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
