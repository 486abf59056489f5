"""Configs: the spec's values by default, and every bad value rejected with one line,
a non-zero exit, no traceback and nothing written."""

import json
import shutil
import subprocess

import pytest
from conftest import REPO, stage_plans, tiny_overrides

from kuavo_train.config.loading import load_run_config

SPEC_SCRIPT = ["kuavo_train/train_smolvla_sequential.py", "--config-path=../configs/policy", "--config-name=smolvla_sequential_base"]


def test_defaults_are_the_spec_values():
    cfg = load_run_config()
    p = cfg.policy
    assert p.pretrained_path == "lerobot/smolvla_base"
    assert p.vlm_model_name == "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    assert (p.freeze_vision_encoder, p.train_expert_only, p.train_state_proj) == (True, True, True)
    assert (p.max_state_dim, p.max_action_dim, p.chunk_size, p.n_action_steps) == (32, 32, 50, 8)
    stages = cfg.ordered_stages()
    assert [s.max_epoch for s in stages] == [100, 25, 30, 35]
    plans = stage_plans(cfg)
    assert [plans[s.name].lr for s in stages] == pytest.approx([5e-5, 3.5e-5, 2.5e-5, 2e-5])
    assert [s.resume_from for s in stages] == ["pretrained", "task", "task", "task"]
    assert [s.resume_task_id for s in stages[1:]] == [1, 2, 3]
    assert (stages[0].scheduler_warmup_steps, stages[0].scheduler_decay_steps) == (1500, 25000)
    assert (stages[1].scheduler_warmup_steps, stages[1].scheduler_decay_steps) == (800, 20000)
    assert [plans[s.name].weights for s in stages] == [
        {1: 1.0}, {1: 0.2, 2: 0.8}, {1: 0.1, 2: 0.2, 3: 0.7}, {1: 0.1, 2: 0.1, 3: 0.2, 4: 0.6}]
    o = cfg.optimizer
    assert (o.betas, o.eps, o.weight_decay, o.grad_clip_norm) == ((0.9, 0.999), 1e-8, 5e-7, 1.0)
    assert cfg.scheduler.decay_lr == 1e-6
    d = cfg.dataloader
    assert (d.batch_size, d.num_workers, d.drop_last, d.prefetch_factor, d.persistent_workers) == (64, 16, True, 2, True)
    v = cfg.validation
    assert (v.validation_freq_epoch, v.validation_episodes, v.validate_all_previous_tasks) == (2, 20, True)
    assert v.forgetting_thresholds == (0.7, 1.0)


def test_one_lr_rule_base_times_decay_factor_unless_a_stage_sets_its_own():
    # the shipped task configs set no lr of their own: base_lr alone moves every stage
    plans = stage_plans(load_run_config(["learning_rate.base_lr=1e-4"]))
    assert [p.lr for p in plans.values()] == pytest.approx([1e-4, 0.7e-4, 0.5e-4, 0.4e-4])
    assert all("base_lr" in p.lr_source for p in plans.values())
    # an explicit per-task value replaces the rule for that stage only, and says so
    plans = stage_plans(load_run_config(["learning_rate.base_lr=1e-4", "stages.task3_placement.optimizer_lr=3e-5"]))
    assert [p.lr for p in plans.values()] == pytest.approx([1e-4, 0.7e-4, 3e-5, 0.4e-4])
    assert plans["task3_placement"].lr_source == "stages.task3_placement.optimizer_lr"
    # stages beyond the factors keep the last one
    plans = stage_plans(load_run_config(["learning_rate.decay_factors=[1.0,0.5]"]))
    assert [p.lr for p in plans.values()] == pytest.approx([5e-5, 2.5e-5, 2.5e-5, 2.5e-5])


def test_naive_strategy_uses_first_lr_everywhere():
    plans = stage_plans(load_run_config(["strategy=sequential_naive"]))
    assert {p.lr for p in plans.values()} == {5e-5}


def _run_spec_script(python_exe, *overrides):
    return subprocess.run([python_exe, *SPEC_SCRIPT, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)


BAD_CONFIGS = [
    (["+stages.task2_weighing.typo=1"], "stages.task2_weighing.typo: unknown key", "task2_weighing.yaml"),
    (["+policy.chunksize=3"], "policy.chunksize: unknown key", "smolvla_sequential_base.yaml"),
    (["stages.task3_placement.replay_weights.2=-0.5"], "stages.task3_placement.replay_weights.2: weight must be >= 0", "task3_placement.yaml"),
    (["+stages.task2_weighing.replay_weights.3=0.5"], "replay_weights.3: task 3 comes after this stage", "task2_weighing.yaml"),
    (["+stages.task4_sorting.replay_weights.9=0.5"], "replay_weights.9: unknown task id 9", "task4_sorting.yaml"),
    (["stages.task2_weighing.replay_weights.1=0", "stages.task2_weighing.replay_weights.2=0"], "replay_weights: weights sum to 0", "task2_weighing.yaml"),
    (["stages.task2_weighing.optimizer_lr=0"], "stages.task2_weighing.optimizer_lr: must be > 0", "task2_weighing.yaml"),
    (["stages.task1_moving_grasp.optimizer_lr=-1e-4"], "stages.task1_moving_grasp.optimizer_lr: must be > 0", "task1_moving_grasp.yaml"),
    (["policy.n_action_steps=60"], "policy.n_action_steps: 60 exceeds policy.chunk_size (50)", "smolvla_sequential_base.yaml"),
    (["stages.task2_weighing.resume_task_id=3"], "stages.task2_weighing.resume_task_id: must name an earlier task", "task2_weighing.yaml"),
    (["stages.task1_moving_grasp.dataset.train_episodes=[0,10]", "stages.task1_moving_grasp.dataset.val_episodes=[5,12]"],
     "val_episodes: [5, 12] overlaps train_episodes", "task1_moving_grasp.yaml"),
    (["task=tasks/task9_dancing"], "task: unknown task 'tasks/task9_dancing'", "smolvla_sequential_base.yaml"),
    (["strategy=magic"], "strategy: unknown strategy 'magic'", "smolvla_sequential_base.yaml"),
    (["feature_cache.max_gb=-1"], "feature_cache.max_gb: must be >= 0, got -1.0", "smolvla_sequential_base.yaml"),
    (["feature_cache.prefix_max_gb=-2"], "feature_cache.prefix_max_gb: must be >= 0, got -2.0", "smolvla_sequential_base.yaml"),
    (["profile=demo", "demo.pretrain_vision_steps=-5"], "demo.pretrain_vision_steps: must be >= 0, got -5", "profile/demo.yaml"),
    (["profile=demo", "demo.pretrain_skill_batch_size=0"], "demo.pretrain_skill_batch_size: must be > 0", "profile/demo.yaml"),
    (["feature_cache.enabled=maybe"], "feature_cache.enabled: expected true/false", "smolvla_sequential_base.yaml"),
]


@pytest.mark.parametrize("overrides,message,source", BAD_CONFIGS, ids=[m.split(":")[0] for _, m, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_and_writes_nothing(python_exe, tmp_path, overrides, message, source):
    run_dir = tmp_path / "run"
    r = _run_spec_script(python_exe, f"run_dir={run_dir}", *overrides)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and source in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not run_dir.exists()


def _data_error(python_exe, tmp_path, demo_base, data_root, *extra):
    run_dir = tmp_path / "run"
    r = _run_spec_script(python_exe, *tiny_overrides(run_dir, demo_base, data_root, *extra))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not run_dir.exists()
    return lines[0]


def test_missing_dataset_root(python_exe, tmp_path, demo_base):
    msg = _data_error(python_exe, tmp_path, demo_base, tmp_path / "nowhere")
    assert "stages.task1_moving_grasp.dataset.root" in msg and "no LeRobot dataset" in msg


def test_missing_pretrained_model(python_exe, tmp_path, demo_data, demo_base):
    msg = _data_error(python_exe, tmp_path, demo_base, demo_data, f"policy.pretrained_path={tmp_path / 'no_base'}")
    assert "pretrained model" in msg and "does not exist" in msg



def test_a_missing_relative_folder_that_looks_like_a_hub_id_is_named_as_both(tmp_path, monkeypatch):
    """`models/smolvla_base` is a hub id and a relative folder alike: offline, the line says both."""
    from kuavo_train.policy.factory import PolicyLoadError, read_pretrained_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PolicyLoadError) as e:
        read_pretrained_config("models/smolvla_base")
    msg = str(e.value)
    assert "\n" not in msg and "if it is a hub id" in msg, msg
    assert msg.endswith(f"if it is a folder: there is no {tmp_path.resolve() / 'models' / 'smolvla_base'})"), msg


def _copy_with_info(demo_data, tmp_path, task, edit):
    root = tmp_path / "datasets"
    shutil.copytree(demo_data, root)
    info_path = root / task / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    edit(info)
    info_path.write_text(json.dumps(info))
    return root


def test_features_that_differ_between_tasks(python_exe, tmp_path, demo_data, demo_base):
    def drop_camera(info):
        del info["features"]["observation.images.wrist_cam_r"]

    root = _copy_with_info(demo_data, tmp_path, "task3_placement", drop_camera)
    msg = _data_error(python_exe, tmp_path, demo_base, root)
    assert "stages.task3_placement.cameras" in msg and "wrist_cam_r" in msg


def test_state_dim_above_max_dim(python_exe, tmp_path, demo_data, demo_base):
    msg = _data_error(python_exe, tmp_path, demo_base, demo_data, "policy.max_state_dim=8")
    assert "policy.max_state_dim" in msg and "16-dim state" in msg


def test_episode_range_beyond_dataset(python_exe, tmp_path, demo_data, demo_base):
    msg = _data_error(python_exe, tmp_path, demo_base, demo_data, "stages.task2_weighing.dataset.train_episodes=[0,99]")
    assert "stages.task2_weighing.dataset.train_episodes" in msg and "exceeds" in msg


def test_instructions_identical_after_truncation_are_refused(tmp_path, demo_data, demo_base):
    """Checked with the embedded base's tokenizer (the real SmolVLM tokenizer needs the hub): task 3's
    instruction is cut at 48 tokens, so one that differs only after that point reads the same to the model."""
    from conftest import task_instruction

    from kuavo_train.policy.factory import read_pretrained_config
    from kuavo_train.training.pipeline import InstructionError, Pipeline, check_instructions

    task3 = task_instruction("task3_placement")
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data,
                                         f"stages.task4_sorting.instruction='{task3}, then wave'"))
    with pytest.raises(InstructionError) as e:
        Pipeline(cfg).run()
    msg = str(e.value)
    assert "\n" not in msg and "stages.task4_sorting.instruction" in msg and "task3_placement" in msg, msg
    assert f"after truncation to {cfg.policy.tokenizer_max_length} tokens" in msg
    assert "in configs/policy/tasks/task4_sorting.yaml or its overrides" in msg
    assert not run_dir.exists()
    # Control: also cut, but different within the kept tokens, so it is accepted.
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data,
                                         f"stages.task4_sorting.instruction='Then wave. {task3}'"))
    report = check_instructions(read_pretrained_config(demo_base).vlm_model_name, cfg.ordered_stages(),
                                cfg.policy.tokenizer_max_length)
    assert not report["task4_sorting"]["kept"] and not report["task3_placement"]["kept"]
