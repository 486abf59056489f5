"""The inference wrapper on the real stage-4 checkpoint of the shared four-stage run."""

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TASK_NAMES, final_pretrained, moved_run

from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper, UnknownInstructionError, WrapperInputError

CAMS = ("head_cam_h", "wrist_cam_l", "wrist_cam_r")


@pytest.fixture(scope="module")
def ckpt(full_run):
    _, run_dir = full_run
    return final_pretrained(run_dir, TASK_NAMES[-1]).parent


@pytest.fixture(scope="module")
def wrapper(ckpt):
    return SmolVLAPolicyWrapper.from_pretrained(ckpt)


def raw_obs(batch=None, seed=0, size=64):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    obs = {f"observation.images.{c}": rng.integers(0, 256, (*lead, size, size, 3), dtype=np.uint8) for c in CAMS}
    obs["observation.state"] = rng.normal(size=(*lead, 16)).astype(np.float32)
    return obs


def test_loads_from_run_checkpoint_and_pretrained_dirs(full_run, ckpt, tmp_path):
    _, run_dir = full_run
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    for path in (run_dir, ckpt, ckpt / "pretrained_model", moved):
        w = SmolVLAPolicyWrapper.from_pretrained(path)
        assert w.instructions == [w.tasks[i]["instruction"] for i in range(4)] and len(w.instructions) == 4
        assert (w.state_dim, w.action_dim, w.chunk_size, w.n_action_steps) == (16, 16, 10, 5)


def test_actions_for_every_instruction_single_and_batched(wrapper):
    for instr in wrapper.instructions:
        wrapper.reset()
        a = wrapper.select_action({**raw_obs(), "task": instr})
        assert a.shape == (16,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    wrapper.reset()
    batch = wrapper.select_action({**raw_obs(batch=3), "task": wrapper.instructions[:3]})
    assert batch.shape == (3, 16)


def test_input_forms_give_identical_actions(ckpt):
    obs = raw_obs(batch=2, seed=3)
    tasks = [None, None]
    w = SmolVLAPolicyWrapper.from_pretrained(ckpt, seed=7)
    tasks = w.instructions[:2]

    def chunk(o):
        w._generator.manual_seed(7)
        return w.predict_action_chunk({**o, "task": tasks})

    ref = chunk(obs)
    as_torch = {k: torch.from_numpy(v) for k, v in obs.items()}
    as_float_chw = {k: (torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255 if "images" in k else v) for k, v in obs.items()}
    as_dict = {"observation.state": obs["observation.state"], "observation.images": {c: obs[f"observation.images.{c}"] for c in CAMS}}
    stacked = {"observation.state": obs["observation.state"],
               "observation.images": np.stack([obs[f"observation.images.{c}"] for c in CAMS], axis=1)}
    for form in (as_torch, as_float_chw, as_dict, stacked):
        assert torch.equal(chunk(form), ref)
    assert ref.shape == (2, 10, 16)


# Equality with stock LeRobot: tests/test_stock_load.py::test_wrapper_equals_stock_lerobot_loaded_in_a_clean_process
# (the stock side loads in a process of its own that imports no project code, with an empty model cache).


def test_queue_serves_one_chunk_and_switching_instruction_starts_a_new_one(ckpt):
    w = SmolVLAPolicyWrapper.from_pretrained(ckpt, seed=1)
    obs = raw_obs(seed=4)
    t1, t2 = w.instructions[0], w.instructions[1]
    w._generator.manual_seed(1)
    chunk1 = w.predict_action_chunk({**obs, "task": t1})
    w._generator.manual_seed(1)
    w.reset()
    first = [w.select_action({**obs, "task": t1}) for _ in range(2)]
    assert torch.equal(first[0], chunk1[0]) and torch.equal(first[1], chunk1[1])
    # switch mid-chunk: the next action is the first of a fresh chunk for task 2
    state = w._generator.get_state()
    expected = w.predict_action_chunk({**obs, "task": t2})[0]
    w._generator.set_state(state)
    switched = w.select_action({**obs, "task": t2})
    assert torch.equal(switched, expected)
    assert not torch.equal(switched, chunk1[2])
    # n_action_steps calls later a new chunk is computed even for the same instruction
    rest = [w.select_action({**obs, "task": t2}) for _ in range(w.n_action_steps - 1)]
    assert w._next == w.n_action_steps and len(rest) == w.n_action_steps - 1


def _bad(obs_changes, drop=()):
    obs = {**raw_obs(batch=2), "task": None}
    obs.update(obs_changes)
    for k in drop:
        obs.pop(k)
    return obs


@pytest.mark.parametrize("change,drop,key,fragment", [
    ({}, ("observation.images.wrist_cam_l",), "observation.images.wrist_cam_l", "missing camera"),
    ({"observation.images.chest_cam": np.zeros((2, 64, 64, 3), np.uint8)}, (), "observation.images.chest_cam", "unknown camera"),
    ({"observation.state": np.zeros((2, 14), np.float32)}, (), "observation.state", "expected shape (16,) or (B, 16)"),
    ({"observation.state": np.zeros((3, 16), np.float32)}, (), "task", "2 instructions for a batch of 3"),
    ({"observation.images.head_cam_h": np.zeros((3, 64, 64, 3), np.uint8)}, (), "observation.images.head_cam_h", "batch size 3"),
    ({"observation.state": np.full((2, 16), np.nan, np.float32)}, (), "observation.state", "NaN"),
    ({"observation.images.head_cam_h": np.zeros((2, 32, 32, 3), np.uint8)}, (), "observation.images.head_cam_h", "expected 64x64 images (the camera size of the task's data); got 32x32 (strict_image_size=False lets"),
    ({"observation.images.head_cam_h": np.zeros((2, 64, 64, 3), np.int32)}, (), "observation.images.head_cam_h", "uint8"),
    ({}, ("task",), "task", "missing"),
])
def test_bad_inputs_are_refused_by_name(wrapper, change, drop, key, fragment):
    obs = _bad(change, drop)
    if "task" in obs:
        obs["task"] = wrapper.instructions[:2]
    wrapper.reset()
    before = (wrapper._queue, wrapper._tasks, wrapper._next)
    with pytest.raises(WrapperInputError) as e:
        wrapper.select_action(obs)
    msg = str(e.value)
    assert msg.startswith(key) and fragment in msg and "\n" not in msg
    assert (wrapper._queue, wrapper._tasks, wrapper._next) == before


def test_unknown_instruction_refused_or_allowed(ckpt, wrapper):
    with pytest.raises(UnknownInstructionError) as e:
        wrapper.select_action({**raw_obs(), "task": "dance"})
    assert "dance" in str(e.value) and wrapper.instructions[1][:30] in str(e.value)
    lenient = SmolVLAPolicyWrapper.from_pretrained(ckpt, allow_unknown_instructions=True)
    assert lenient.select_action({**raw_obs(), "task": "dance"}).shape == (16,)


def test_truncated_instructions_are_reported_at_load(wrapper):
    # the tiny tokenizer cuts task 3's instruction (58 tokens > 48)
    assert "task3_placement" in wrapper.truncated
    assert wrapper.truncated["task3_placement"].startswith("Pick up a bottle")


def test_not_a_checkpoint(tmp_path):
    from kuavo_train.policy.factory import PolicyLoadError

    with pytest.raises(PolicyLoadError, match="is not a checkpoint"):
        SmolVLAPolicyWrapper.from_pretrained(tmp_path)


def test_infer_command_runs_the_final_model_closed_loop(full_run, python_exe):
    import subprocess

    from conftest import REPO

    _, run_dir = full_run
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "infer", "--run", str(run_dir), "--episodes", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in TASK_NAMES:
        assert any(line.strip().startswith(name) and "success" in line for line in r.stdout.splitlines()), r.stdout


def test_infer_defaults_to_the_runs_final_row_episodes(full_run, python_exe, tmp_path):
    """With neither option, infer runs the episodes and batch size the run's final matrix row was
    evaluated with, so it prints that row's numbers; a bad count is one argparse line."""
    import json
    import shutil
    import subprocess

    from conftest import REPO

    run = tmp_path / "run"
    shutil.copytree(full_run[1], run, symlinks=True)
    state = json.loads((run / "run.json").read_text())
    state["config"]["evaluation"].update(closed_loop_final_episodes=2, closed_loop_batch_size=2)
    (run / "run.json").write_text(json.dumps(state))
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "infer", "--run", str(run)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 held-out scenes per task, 2 at a time)" in r.stdout, r.stdout
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "infer", "--run", str(run), "--episodes", "abc"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "argument --episodes: expected a whole number > 0, got 'abc'" in r.stderr, r.stderr


def test_infer_on_a_folder_that_is_not_a_run(tmp_path, python_exe):
    import subprocess

    from conftest import REPO

    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "infer", "--run", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a kuavo_train run directory" in r.stderr


def test_infer_finds_the_datasets_from_another_folder(full_run, demo_data, python_exe, tmp_path):
    """run.json's relative dataset paths are found from any folder: the run folder's absolute path
    tells where the run was started."""
    import subprocess

    from conftest import REPO

    run = moved_run(full_run[1], demo_data, tmp_path / "origin")
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "infer", "--run", str(run), "--episodes", "1"],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split()[0] for line in r.stdout.splitlines() if "success" in line] == list(TASK_NAMES), r.stdout


def test_infer_with_its_datasets_gone_is_refused_in_one_line(full_run, demo_data, python_exe, tmp_path):
    import subprocess

    from conftest import REPO

    run = moved_run(full_run[1], demo_data, tmp_path / "origin")
    (tmp_path / "origin" / "data").unlink()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "infer", "--run", str(run), "--episodes", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "names datasets that are not here (task1_moving_grasp: " in r.stderr and "data/task1_moving_grasp" in r.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
