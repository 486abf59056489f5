"""Continuing one of our stage checkpoints with STOCK `lerobot-train --resume=true`.

Every checkpoint carries LeRobot's own `train_config.json`; the real `lerobot-train` entry
point resumes from it at our step, keeps our ONE set of normalization statistics (not the
single dataset's `meta/stats.json`, whose task-1 std is 0 on several dims) and so starts at
our loss. Stages that stock cannot continue get no train_config.json and say why."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import final_pretrained
from safetensors.torch import load_file

TASK = "task1_moving_grasp"


def _processor_state(pretrained: Path, prefix: str) -> dict:
    files = sorted(pretrained.glob(f"{prefix}_step_*_*normalizer_processor.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _our_train_loss(run_dir: Path, step: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}[step]  # stage 1: global step == stage step


def test_train_config_is_lerobots_own(full_run):
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    cfg, run_dir = full_run
    pretrained = final_pretrained(run_dir, TASK)
    meta = json.loads((pretrained.parent / "kuavo_checkpoint.json").read_text())
    state = json.loads((run_dir / "run.json").read_text())["stages"][TASK]
    stage_dir = pretrained.parents[2]
    assert meta["stock_resume"]["supported"] is True
    tc = TrainPipelineConfig.from_pretrained(pretrained)  # LeRobot's own reader
    assert isinstance(tc.policy, SmolVLAConfig) and tc.policy.train_expert_only and not tc.policy.push_to_hub
    assert tc.dataset.repo_id == cfg.stages[TASK].dataset.repo_id
    assert Path(tc.dataset.root) == Path(cfg.stages[TASK].dataset.root).resolve()
    assert tc.dataset.episodes == [0, 1, 2]  # the 3 training episodes; the 2 held-out ones are not trained on
    assert tc.steps == state["total_steps"] == meta["step"]
    assert tc.batch_size == cfg.dataloader.batch_size and tc.seed == cfg.seed
    # the launch that wrote it, which stock compares with its own when it continues
    from lerobot.common.train_utils import load_training_batch_size, load_training_num_processes

    assert load_training_num_processes(pretrained.parent) == 1
    assert load_training_batch_size(pretrained.parent) == cfg.dataloader.batch_size
    assert tc.optimizer.lr == pytest.approx(state["lr"]) and tc.scheduler.peak_lr == pytest.approx(state["lr"])
    assert not tc.wandb.enable and not tc.resume
    # stock re-points a `checkpoints/last` symlink inside output_dir: never our own stage folder
    assert tc.output_dir == (stage_dir / "lerobot_train").resolve()


def test_stock_lerobot_train_resumes_with_our_stats(full_run, tmp_path):
    cfg, run_dir = full_run
    ours = final_pretrained(run_dir, TASK)
    step = json.loads((ours.parent / "kuavo_checkpoint.json").read_text())["step"]
    # a copy of the stage checkpoint in our layout, and stock's output beside it
    stage = tmp_path / ours.parents[2].name
    ckpt = stage / "checkpoints" / "last"
    shutil.copytree(ours.parent, ckpt)
    out = stage / "lerobot_train"
    # the data seen from elsewhere (a moved run, another machine): --dataset.root replaces the recorded path
    moved = tmp_path / "moved_data"
    moved.symlink_to(Path(cfg.stages[TASK].dataset.root).resolve(), target_is_directory=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    assert env.get("HF_HOME"), "conftest sets the session's HF_HOME (the tiny VLM is registered there)"
    cmd = [str(Path(sys.executable).parent / "lerobot-train"),
           f"--config_path={ckpt / 'pretrained_model' / 'train_config.json'}", "--resume=true",
           f"--steps={step + 2}", f"--output_dir={out}", f"--dataset.root={moved}", "--num_workers=0", "--log_freq=1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    print(f"stock lerobot-train resume: {time.perf_counter() - t0:.1f} s")

    # resumed at our step: its first logged update is step+1, its checkpoint is step+2
    logged = [(int(s), float(v)) for s, v in re.findall(r"step:(\d+) .*?loss:([0-9.]+)", log)]
    assert [s for s, _ in logged] == [step + 1, step + 2], log[-3000:]
    written = out / "checkpoints" / f"{step + 2:06d}"
    assert json.loads((written / "training_state" / "training_step.json").read_text())["step"] == step + 2
    assert (out / "checkpoints" / "last").resolve() == written.resolve()
    theirs = written / "pretrained_model"
    assert json.loads((theirs / "train_config.json").read_text())["dataset"]["root"] == str(moved)

    # our statistics, bit for bit, in what stock wrote (pre- and post-processor) ...
    for prefix in ("policy_preprocessor", "policy_postprocessor"):
        a, b = _processor_state(ours, prefix), _processor_state(theirs, prefix)
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), prefix
    # ... which are not the single dataset's (stock's choice without --resume)
    ds_stats = json.loads((Path(cfg.stages[TASK].dataset.root) / "meta" / "stats.json").read_text())
    pre = _processor_state(ours, "policy_preprocessor")
    assert not np.allclose(np.asarray(ds_stats["action"]["std"]), pre["action.std"].numpy())

    # and so the loss goes on where ours was (with the dataset's stats it starts ~30x higher here)
    first, last_ours = logged[0][1], _our_train_loss(run_dir, step)
    assert last_ours / 3 < first < 3 * last_ours, (first, last_ours)


def _spec_inputs(tmp_path, *, task_names=("a", "b", "c"), dataset_tasks=("pick it",), name="t1", strategy=None):
    from types import SimpleNamespace

    from kuavo_train.data.features import FeatureSpace
    from kuavo_train.data.task_data import TaskData

    task = TaskData(task_id=1, name=name, instruction="pick it", repo_id="x/t1", root=tmp_path, fps=10, features={},
                    camera_keys=("observation.images.cam",), train_episodes=(0, 1), val_episodes=(2,),
                    dataset_tasks=dataset_tasks, camera_map={"observation.images.cam": "observation.images.cam"})
    own = {"observation.state": tuple(range(len(task_names))), "action": tuple(range(len(task_names)))}
    space = FeatureSpace(names={"observation.state": ("a", "b", "c"), "action": ("a", "b", "c")}, index={1: own},
                         task_names={1: {k: task_names for k in own}})
    cfg = SimpleNamespace(dataloader=SimpleNamespace(batch_size=4, num_workers=0), seed=0,
                          logging=SimpleNamespace(log_freq_steps=1), checkpoint=SimpleNamespace(save_freq_epoch=1))
    stage = SimpleNamespace(name=name, task_id=1, max_epoch=2)
    plan = SimpleNamespace(stage=stage, stock_unsupported=None)
    if strategy is not None:  # that strategy's own plan says whether stock can continue its stage
        from kuavo_train.config.loading import load_run_config
        from kuavo_train.strategies import get_strategy

        [first, *_] = get_strategy(load_run_config([f"strategy={strategy}"])).plan({t: 100 for t in (1, 2, 3, 4)})
        plan = SimpleNamespace(stage=stage, stock_unsupported=first.stock_unsupported)
    return cfg, plan, {1: task}, space, tmp_path / "stage1_t1", 10


@pytest.mark.parametrize("case, words", [
    ({"task_names": ("a", "b")}, "whole state/action vector"),  # a task with fewer dims than the model's union
    ({"dataset_tasks": ("something else",)}, "dataset's text"),  # stock would train on the dataset's instruction
    ({"strategy": "joint"}, "one dataset"),  # the joint baseline mixes every task's dataset
])
def test_stages_stock_cannot_continue_get_no_train_config(tmp_path, case, words):
    from kuavo_train.training.stock_resume import StockSpec, write_train_config

    spec = StockSpec.for_stage(*_spec_inputs(tmp_path, **case))
    assert spec.unsupported and words in spec.unsupported
    assert spec.output_dir == str((tmp_path / "stage1_t1" / "lerobot_train").resolve())
    pretrained = tmp_path / "pretrained_model"
    pretrained.mkdir()
    info = write_train_config(pretrained, None, spec)  # the policy config is never needed for a refusal
    assert info == {"supported": False, "reason": spec.unsupported}
    assert not (pretrained / "train_config.json").exists()
