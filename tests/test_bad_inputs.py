"""Bad inputs that the config alone reveals: exit code 2, ONE line on stderr naming the field
(or file and line) and the file, and nothing written under run_dir.

Value checks run in-process through `load_run_config`; the cases that involve the file
system or the run state (YAML syntax, run_dir, a stage resuming from an untrained one) go
through the real `kuavo-train` CLI and the spec's entry point in subprocesses."""

import json
import logging
import os
import shutil
import subprocess

import pytest
from conftest import REPO, TASK_NAMES, stage_plans, tiny_overrides

from kuavo_train.config.loading import check_run_dir, load_run_config
from kuavo_train.config.schema import ConfigError
from kuavo_train.errors import KuavoError
from kuavo_train.strategies import get_strategy

SPEC_SCRIPT = ["kuavo_train/train_smolvla_sequential.py", "--config-path=../configs/policy", "--config-name=smolvla_sequential_base"]
CLI = ["-m", "kuavo_train.cli.main"]
TASK2_FILE = "configs/policy/tasks/task2_weighing.yaml"
TASK3_FILE = "configs/policy/tasks/task3_placement.yaml"
BASE_FILE = "configs/policy/smolvla_sequential_base.yaml"


def _run(python_exe, *args):
    return subprocess.run([python_exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line_error(r, run_dir) -> str:
    """Exit code 2, one line on stderr, no traceback, run_dir not created; returns the line."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not run_dir.exists()
    return lines[0]


# ---- values: in-process -----------------------------------------------------------------------

BAD_VALUES = [
    # 1. empty or blank instruction
    (["stages.task2_weighing.instruction=''"], "stages.task2_weighing.instruction: must not be empty or blank, got ''", TASK2_FILE),
    (["stages.task2_weighing.instruction='   '"], "stages.task2_weighing.instruction: must not be empty or blank, got '   '", TASK2_FILE),
    # the deployed model tells tasks apart by instruction alone
    (["stages.task1_moving_grasp.instruction='pick it up'", "stages.task3_placement.instruction='pick it up'"],
     "stages.task3_placement.instruction: the same as stage 'task1_moving_grasp''s", TASK3_FILE),
    # 2. decay_lr at or above a stage's lr (demo lrs: 2e-3, 1.4e-3, 1e-3, 8e-4)
    (["scheduler.decay_lr=1e-3"], "scheduler.decay_lr: 0.001 >= the learning rate 0.001 of stage task3_placement", BASE_FILE),
    (["scheduler.decay_lr=3e-3"], "scheduler.decay_lr: 0.003 >= the learning rate 0.002 of stage task1_moving_grasp", BASE_FILE),
    (["stages.task4_sorting.optimizer_lr=1e-6"], "scheduler.decay_lr: 1e-06 >= the learning rate 1e-06 of stage task4_sorting", BASE_FILE),
    # 6. policy / optimizer values
    (["policy.resize_imgs_with_padding=[0,0]"], "policy.resize_imgs_with_padding: sizes must be > 0, got [0, 0]", BASE_FILE),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay: must be >= 0, got -1.0", BASE_FILE),
    (["optimizer.betas=[1.5,0.999]"], "optimizer.betas: each must be in [0, 1), got [1.5, 0.999]", BASE_FILE),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas: each must be in [0, 1), got [0.9, 1.0]", BASE_FILE),
    (["optimizer.eps=0"], "optimizer.eps: must be > 0, got 0.0", BASE_FILE),
    (["optimizer.eps=-1e-8"], "optimizer.eps: must be > 0, got -1e-08", BASE_FILE),
    (["evaluation.closed_loop_batch_size=0"], "evaluation.closed_loop_batch_size: must be > 0, got 0", BASE_FILE),
]


@pytest.mark.parametrize("overrides,message,source", BAD_VALUES, ids=[" ".join(o) for o, _, _ in BAD_VALUES])
def test_bad_value_is_a_one_line_config_error(overrides, message, source):
    with pytest.raises(ConfigError) as e:
        get_strategy(load_run_config(["profile=demo", *overrides]))  # the strategy decides each stage's lr
    msg = str(e.value)
    assert isinstance(e.value, KuavoError)
    assert "\n" not in msg and message in msg and source in msg, msg


def test_decay_lr_below_every_stage_lr_is_fine():
    cfg = load_run_config(["profile=demo", "scheduler.decay_lr=3.9e-4"])
    assert cfg.scheduler.decay_lr < min(p.lr for p in stage_plans(cfg).values())


def test_blank_instruction_through_the_cli(python_exe, tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    r = _run(python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data, "stages.task2_weighing.instruction='  '"))
    msg = _one_line_error(r, run_dir)
    assert "stages.task2_weighing.instruction: must not be empty or blank" in msg and "task2_weighing.yaml" in msg


def test_decay_lr_through_the_spec_entry_point(python_exe, tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    r = _run(python_exe, *SPEC_SCRIPT, *tiny_overrides(run_dir, demo_base, demo_data, "scheduler.decay_lr=1.4e-3"))
    msg = _one_line_error(r, run_dir)
    assert "scheduler.decay_lr: 0.0014 >= the learning rate 0.0014 of stage task2_weighing" in msg and BASE_FILE in msg


@pytest.mark.parametrize("override, expected", [
    ("stages.task1_moving_grasp.max_epochs=3", "Could not override 'stages.task1_moving_grasp.max_epochs'"),
    ("profile=nonexistent", "Could not find 'profile/nonexistent'"),
])
def test_a_key_or_group_the_config_lacks_spec_entry_point(python_exe, tmp_path, demo_base, demo_data, override, expected):
    """Hydra reports these itself in several lines with exit code 1; the spec's entry point composes
    first, as the CLI does, for the same one line."""
    run_dir = tmp_path / "run"
    msg = _one_line_error(_run(python_exe, *SPEC_SCRIPT, *tiny_overrides(run_dir, demo_base, demo_data, override)), run_dir)
    assert expected in msg and BASE_FILE in msg, msg
    cli = _one_line_error(_run(python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data, override)), run_dir)
    assert cli == msg


# ---- 3. replay shares that do not sum to 1: accepted, renormalised, one warning line -----------

def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("kuavo_train")]


def test_replay_shares_not_summing_to_one_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="kuavo_train"):
        plans = stage_plans(load_run_config(["profile=demo", "stages.task2_weighing.replay_weights.1=0.7"]))
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "stages.task2_weighing.replay_weights sum to 1.5" in warnings[0] and "task2_weighing.yaml" in warnings[0]
    assert plans["task2_weighing"].weights == pytest.approx({1: 0.7 / 1.5, 2: 0.8 / 1.5})


def test_several_stages_off_still_one_warning_and_none_for_the_defaults(caplog):
    with caplog.at_level(logging.WARNING, logger="kuavo_train"):
        stage_plans(load_run_config(["profile=demo"]))
        stage_plans(load_run_config([]))  # the spec's shares: 0.1 + 0.2 + 0.7 has float noise, no warning
        assert not _warnings(caplog)
        stage_plans(load_run_config(["profile=demo", "stages.task2_weighing.replay_weights.1=0.7",
                                     "stages.task4_sorting.replay_weights.4=0.1"]))
    assert len(_warnings(caplog)) == 1
    msg = _warnings(caplog)[0]
    assert "task2_weighing.replay_weights sum to 1.5" in msg and "task4_sorting.replay_weights sum to 0.5" in msg


def test_no_replay_warning_when_shares_are_not_used(caplog):
    with caplog.at_level(logging.WARNING, logger="kuavo_train"):
        stage_plans(load_run_config(["profile=demo", "stages.task2_weighing.replay_weights.1=0.7", "strategy=sequential_naive"]))
        stage_plans(load_run_config(["profile=demo", "stages.task2_weighing.replay_weights.1=0.7", "replay.use_replay_buffer=false"]))
    assert not _warnings(caplog)


# ---- 4. YAML syntax error in a task file: real CLI and spec entry point ---------------------------

@pytest.fixture
def broken_configs(tmp_path):
    cfg_dir = tmp_path / "configs"
    shutil.copytree(REPO / "configs" / "policy", cfg_dir)
    task2 = cfg_dir / "tasks" / "task2_weighing.yaml"
    lines = task2.read_text().splitlines()
    line_no = next(i for i, ln in enumerate(lines) if ln.startswith("max_epoch:")) + 1
    lines[line_no - 1] = "max_epoch: [1"
    task2.write_text("\n".join(lines) + "\n")
    return cfg_dir, task2, line_no


def test_yaml_syntax_error_cli(python_exe, tmp_path, demo_base, demo_data, broken_configs):
    cfg_dir, task2, line_no = broken_configs
    run_dir = tmp_path / "run"
    r = _run(python_exe, *CLI, "--config-dir", str(cfg_dir), "train", *tiny_overrides(run_dir, demo_base, demo_data))
    msg = _one_line_error(r, run_dir)
    assert f"{task2}, line {line_no}: YAML syntax error" in msg, msg


def test_yaml_syntax_error_spec_entry_point(python_exe, tmp_path, demo_base, demo_data, broken_configs):
    cfg_dir, task2, line_no = broken_configs
    run_dir = tmp_path / "run"
    r = _run(python_exe, SPEC_SCRIPT[0], f"--config-path={cfg_dir}", SPEC_SCRIPT[2], *tiny_overrides(run_dir, demo_base, demo_data))
    msg = _one_line_error(r, run_dir)
    assert f"{task2}, line {line_no}: YAML syntax error" in msg, msg


def test_yaml_syntax_error_in_process(broken_configs):
    cfg_dir, task2, line_no = broken_configs
    with pytest.raises(ConfigError, match=f"line {line_no}: YAML syntax error"):
        load_run_config([], cfg_dir)


# ---- 5. run_dir that cannot be a writable folder ---------------------------------------------------

def test_run_dir_under_a_file_cli(python_exe, tmp_path, demo_base, demo_data):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    run_dir = a_file / "sub"
    r = _run(python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data))
    msg = _one_line_error(r, run_dir)
    assert f"run_dir: cannot create {run_dir}: {a_file} is a file, not a folder" in msg and BASE_FILE in msg
    assert a_file.read_text() == "not a folder\n"


def test_run_dir_is_an_existing_file_spec_entry_point(python_exe, tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    run_dir.write_text("a file\n")
    r = _run(python_exe, *SPEC_SCRIPT, *tiny_overrides(run_dir, demo_base, demo_data))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert f"run_dir: {run_dir} is an existing file, not a folder" in r.stderr and BASE_FILE in r.stderr
    assert run_dir.read_text() == "a file\n" and [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into chmod 555 folders, so a read-only folder cannot be simulated")
def test_run_dir_in_a_read_only_folder_cli(python_exe, tmp_path, demo_base, demo_data):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        run_dir = ro / "run"
        r = _run(python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data))
        msg = _one_line_error(r, run_dir)
        assert f"run_dir: cannot create {run_dir}: {ro} is not writable" in msg
        with pytest.raises(ConfigError, match="run_dir: .* is not writable"):
            check_run_dir(ro)
    finally:
        ro.chmod(0o755)


def test_run_dir_checks_in_process(tmp_path):
    check_run_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    check_run_dir(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is an existing file"):
        check_run_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_run_dir(tmp_path / "f" / "a" / "b")


# ---- 6b. a GPU index under accelerate launch ------------------------------------------------------

def test_a_gpu_index_under_a_launch_is_refused_cli(python_exe, tmp_path, demo_base, demo_data):
    """Each launched process takes cuda:LOCAL_RANK; `cuda:1` would send every process's evaluation to
    GPU 1. The launcher's variables alone reveal it: the error comes before any process group."""
    run_dir = tmp_path / "run"
    r = subprocess.run([python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data), "policy.device=cuda:1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    msg = _one_line_error(r, run_dir)
    assert "policy.device: 'cuda:1' under accelerate launch" in msg and "CUDA_VISIBLE_DEVICES" in msg and BASE_FILE in msg
    # one process may name its GPU
    assert load_run_config(tiny_overrides(run_dir, demo_base, demo_data, "policy.device=cuda:1")).policy.device == "cuda:1"


# ---- 7. a stage resuming from a stage this run never trained ----------------------------------------

def test_stage_resuming_from_untrained_stage_cli(python_exe, tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    r = _run(python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data, "task=tasks/task2_weighing"))
    msg = _one_line_error(r, run_dir)
    assert "stages.task2_weighing.resume_task_id: stage task2_weighing starts from task 1 (task1_moving_grasp)" in msg, msg
    assert "task=tasks/task1_moving_grasp or task=all" in msg and "task2_weighing.yaml" in msg


def _write_run_json(run_dir, complete):
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = {name: {"task_id": TASK_NAMES.index(name) + 1, "status": "complete", "final_checkpoint": f"{name}/final"}
              for name in complete}
    (run_dir / "run.json").write_text(json.dumps({"stages": stages}))


def test_resume_sources_against_run_json(tmp_path):
    from kuavo_train.run_state import ResumeSourceError, check_resume_sources

    def check(task, run_dir):
        cfg = load_run_config(["profile=demo", f"task={task}", f"run_dir={run_dir}"])
        stages = cfg.ordered_stages() if task == "all" else [cfg.stages[task.split("/")[-1]]]
        check_resume_sources(cfg, stages, run_dir)

    fresh = tmp_path / "fresh"
    check("all", fresh)  # every source is trained first by this invocation
    check("tasks/task1_moving_grasp", fresh)  # starts from the pretrained model
    _write_run_json(tmp_path / "one", ["task1_moving_grasp"])
    with pytest.raises(ResumeSourceError, match=r"task 2 \(task2_weighing\)'s final model, which is not complete in .*run.json"):
        check("tasks/task3_placement", tmp_path / "one")
    check("tasks/task2_weighing", tmp_path / "one")
    assert not fresh.exists()


def _tree(run_dir):
    """Every file under run_dir with its bytes (what a refused invocation must leave as it was)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_stage_is_never_reused_or_resumed_with_other_settings_cli(python_exe, tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    stage1 = tiny_overrides(run_dir, demo_base, demo_data, "task=tasks/task1_moving_grasp", "evaluation.after_each_stage=false")
    r = _run(python_exe, *CLI, "train", *stage1)
    assert r.returncode == 0, r.stderr[-3000:]
    before = _tree(run_dir)
    # stage 2 under another base rate: stage 1, done at the old one, would be reused silently
    r = _run(python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data, "task=all", "learning_rate.base_lr=3e-3"))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert lines[0].startswith("error: config error: learning_rate.base_lr: stage task1_moving_grasp of "), lines[0]
    assert "was trained with 0.002, this config says 0.003 (and 1 more setting(s))" in lines[0], lines[0]
    assert "choose another run_dir" in lines[0] and BASE_FILE in lines[0], lines[0]
    assert _tree(run_dir) == before  # nothing written, nothing lost
    # a strategy option names the strategy's file
    r = _run(python_exe, *CLI, "train", *stage1, "strategy=lora_per_task", "strategy.rank=4")
    assert r.returncode == 2 and "config error: strategy." in r.stderr, r.stderr[-3000:]
    assert "configs/policy/strategy/lora_per_task.yaml" in r.stderr and _tree(run_dir).keys() == before.keys()
    # what does not decide the weights may change, the old name of the strategy is the same strategy,
    # and a base copied elsewhere is the same base
    copy = shutil.copytree(demo_base, tmp_path / "moved_base")
    r = _run(python_exe, *CLI, "train", *tiny_overrides(run_dir, copy, demo_data, "task=tasks/task1_moving_grasp"),
             "strategy=sequential_spec", "logging.log_freq_steps=5", "evaluation.after_each_stage=false",
             "evaluation.closed_loop_episodes=1", "validation.validation_episodes=1", "dataloader.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 1 task1_moving_grasp is complete already: skipped" in r.stdout + r.stderr
    # a stage begun with other settings and stopped before its first checkpoint trained nothing to
    # mix with: it starts again with the config's
    state = json.loads((run_dir / "run.json").read_text())
    state["stages"]["task2_weighing"] = {"task_id": 2, "status": "running", "processes": 2,
                                         "settings": {"stages.task2_weighing.max_epoch": 7}}
    (run_dir / "run.json").write_text(json.dumps(state))
    r = _run(python_exe, *CLI, "train", *tiny_overrides(run_dir, demo_base, demo_data, "task=tasks/task2_weighing",
                                                         "evaluation.after_each_stage=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    stage2 = json.loads((run_dir / "run.json").read_text())["stages"]["task2_weighing"]
    assert stage2["status"] == "complete" and stage2["settings"]["stages.task2_weighing.max_epoch"] == 1


# ---- 8. the inference wrapper's refusal of an unknown instruction --------------------------------------

def _known():
    cfg = load_run_config(["profile=demo"])
    return {s.name: s.instruction for s in cfg.ordered_stages()}


def test_unknown_instruction_message_shows_it_whole_and_marks_the_first_difference():
    from kuavo_train.wrapper.policy.smolvla import unknown_instruction_message

    known = _known()
    right = known["task2_weighing"]
    typo = right.replace("storage container", "storage containr")
    msg = unknown_instruction_message(typo, known)
    pos = right.index("container") + len("contain") + 1  # 1-based position of the 'e' that became 'r'
    assert "\n" not in msg and repr(typo) in msg, msg
    assert f"differs from task2_weighing's at character {pos} ('r' instead of 'e')" in msg, msg
    assert "storage contain^er'" in msg, msg
    shorter = unknown_instruction_message(right[:-len(" container")], known)
    assert "stops at character" in shorter and "task2_weighing's goes on" in shorter and "storage^ container'" in shorter
    longer = unknown_instruction_message(right + " now", known)
    assert f"goes on at character {len(right) + 1} where task2_weighing's ends" in longer
    assert unknown_instruction_message("dance", {}) == "task: 'dance' is not an instruction this model was trained on"
    # the beginning of an instruction, typed alone, is that instruction's (similarity alone picked another)
    for name, text in known.items():
        start = text[:16]
        assert f"stops at character 17 where {name}'s goes on" in unknown_instruction_message(start, known), (name, start)


def test_wrapper_refuses_unknown_instruction_in_one_line():
    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper, UnknownInstructionError

    known = _known()
    w = SmolVLAPolicyWrapper.__new__(SmolVLAPolicyWrapper)  # only the instruction check: no model needed
    w.tasks = [{"name": n, "instruction": i} for n, i in known.items()]
    w.allow_unknown_instructions, w._warned = False, set()
    assert w._instructions({"task": known["task3_placement"]}) == [known["task3_placement"]]
    typo = known["task2_weighing"].replace("electronic scale", "electronic scales")
    with pytest.raises(UnknownInstructionError) as e:
        w._instructions({"task": [known["task1_moving_grasp"], typo]})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"task: {typo!r} is not an instruction") and len(typo) > 60
    assert "differs from task2_weighing's at character" in msg and "electronic scale^, then" in msg, msg


def test_a_vlm_whose_tokenizer_cannot_be_loaded_is_one_line(python_exe, demo_base, demo_data, tmp_path):
    """policy.vlm_model_name naming a VLM this machine does not have (offline, empty model cache)."""
    run_dir = tmp_path / "run"
    r = subprocess.run([python_exe, *CLI, "train", f"data_root={demo_data}", f"policy.pretrained_path={demo_base}",
                        "policy.vlm_model_name=HuggingFaceTB/SmolVLM2-500M-Video-Instruct", f"run_dir={run_dir}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    line = _one_line_error(r, run_dir)
    assert "policy.vlm_model_name: cannot load the tokenizer of 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct'" in line
    assert "HF_ENDPOINT" in line and "HF_HUB_OFFLINE" in line


def test_training_one_stage_without_a_later_tasks_data_says_why_it_is_read(python_exe, demo_base, demo_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / TASK_NAMES[0]).symlink_to(demo_data / TASK_NAMES[0], target_is_directory=True)
    run_dir = tmp_path / "run"
    line = _one_line_error(_run(python_exe, *CLI, "train", f"data_root={data}", f"policy.pretrained_path={demo_base}",
                                f"task=tasks/{TASK_NAMES[0]}", f"run_dir={run_dir}"), run_dir)
    assert f"stages.{TASK_NAMES[1]}.dataset.root: no LeRobot dataset at {data / TASK_NAMES[1]}" in line, line
    assert f"task=tasks/{TASK_NAMES[0]} reads every stage's dataset too" in line, line


@pytest.mark.parametrize("strategy, option, expected", [
    ("ewc", "strategy.ewc_lambda=-1", "strategy.ewc_lambda: must be >= 0, got -1.0 (in configs/policy/strategy/ewc.yaml"),
    ("lora_per_task", "strategy.dropout=1.0", "strategy.dropout: must be < 1, got 1.0"),
    # the strategy's rate, not the recipe's, is what decay_lr must stay below
    ("lora_per_task", "strategy.lr=1e-7", "scheduler.decay_lr: 1e-06 >= the learning rate 1e-07 of stage "
                                          "task1_moving_grasp (strategy.lr of lora_per_task, strategy lora_per_task)"),
])
def test_bad_strategy_options_before_the_demo_inputs_are_built(python_exe, tmp_path, strategy, option, expected):
    """On a fresh machine `train profile=demo` builds the embedded base and the datasets first (minutes):
    a bad strategy option is refused in one line before that, and nothing is built."""
    run_dir, base, data = tmp_path / "run", tmp_path / "base", tmp_path / "datasets"
    msg = _one_line_error(_run(python_exe, *CLI, "train", "profile=demo", f"strategy={strategy}", option,
                               f"demo.base_dir={base}", f"policy.pretrained_path={base / 'pretrained_model'}",
                               f"data_root={data}", f"run_dir={run_dir}"), run_dir)
    assert expected in msg, msg
    assert not base.exists() and not data.exists()


@pytest.mark.parametrize("made", ["nothing", "empty folder"])
def test_a_missing_base_elsewhere_than_the_demos_is_one_line_and_nothing_is_built(python_exe, tmp_path, made):
    """`train profile=demo policy.pretrained_path=<a base not built yet, or a typo>`: the embedded base is
    built only where demo.base_dir says; another missing model is the user's, named in one line."""
    run_dir, base, data = tmp_path / "run", tmp_path / "base", tmp_path / "datasets"
    other = tmp_path / "base_s1" / "pretrained_model"
    if made == "empty folder":
        other.mkdir(parents=True)
    msg = _one_line_error(_run(python_exe, *CLI, "train", "profile=demo", f"demo.base_dir={base}",
                               f"policy.pretrained_path={other}", f"data_root={data}", f"run_dir={run_dir}"), run_dir)
    expected = "has no model.safetensors (`kuavo-train build-base --out" if other.exists() else "does not exist"
    assert f"pretrained model {str(other)!r} " in msg and expected in msg, msg
    assert not base.exists() and not data.exists()


def test_every_command_is_listed_and_described_in_its_help():
    """`kuavo-train --help` lists every subcommand, and each subcommand's --help says what it does."""
    import argparse

    from kuavo_train.cli.main import build_parser

    def subcommands(parser):
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    def check(sp, name):
        assert sp.description, name
        for action in sp._actions:
            if action.option_strings and action.dest not in ("help", "config_dir"):
                assert action.help, f"{name} {action.option_strings[0]} has no help"
        for child, csp in subcommands(sp).items():
            check(csp, f"{name} {child}")

    parser = build_parser()
    top = parser.format_help()
    for name, sp in subcommands(parser).items():
        assert f"kuavo-train {name}" in top, name
        check(sp, name)



def test_each_commands_help_offers_overrides_it_reads():
    """The overrides a command's --help offers are keys of the config, and those of training
    (run_dir=, strategy=, task=) are not offered where nothing is trained."""
    import re

    from omegaconf import OmegaConf

    from kuavo_train.cli.main import build_parser
    from kuavo_train.config.loading import compose

    cfg = compose(["profile=demo"])
    choices = next(a.choices for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    for name, sp in choices.items():
        keys = set(re.findall(r"(?:^ +|, )([a-z_.]+)=", sp.epilog or "", flags=re.M))
        for key in keys - {"profile", "task", "strategy"}:  # config groups, not fields
            assert OmegaConf.select(cfg, key, default="absent") != "absent", f"{name}: {key}"
        if name in ("build-base", "make-data", "evaluate"):
            assert not keys & {"strategy", "task", "seed"}, name
        if name in ("build-base", "make-data"):
            assert "run_dir" not in keys, name
    assert {"run_dir", "strategy", "task"} <= set(re.findall(r"^ +([a-z_.]+)=", choices["train"].epilog, flags=re.M))

def test_a_config_path_without_the_base_config_is_one_line_naming_the_flag(python_exe, tmp_path):
    """`--config-path` is relative to kuavo_train/, not to the current folder (Hydra's rule): a path
    written from the repository root finds nothing, and the line says which flag and why."""
    run_dir = tmp_path / "run"
    line = _one_line_error(_run(python_exe, SPEC_SCRIPT[0], "--config-path=configs/policy", SPEC_SCRIPT[2],
                                f"run_dir={run_dir}"), run_dir)
    assert "config error: --config-path: no smolvla_sequential_base.yaml in " in line, line
    assert "relative to " in line and line.count("kuavo_train") >= 2, line
