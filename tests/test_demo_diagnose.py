"""`benchmarks/demo_diagnose.py`: its two measurements, checked against the scripted expert (which
does every task and whose chunk is the reference) and against a constant chunk; then the script
on a trained checkpoint."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, final_pretrained

spec = importlib.util.spec_from_file_location("demo_diagnose", REPO / "benchmarks" / "demo_diagnose.py")
diag = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diag)


def expert_act(envs, obs):
    return np.stack([e.world.expert_action() for e in envs])


def expert_chunk(envs, obs):
    return np.stack([diag.expert_chunk(e.world, 10) for e in envs])


@pytest.mark.parametrize("task", ["task1_moving_grasp", "task3_placement"])
def test_the_expert_succeeds_and_its_chunk_is_the_reference(demo_data, task):
    loop = diag.closed_loop(expert_act, task, str(demo_data / task), 3, 1000)
    assert loop["success"] == 3 and loop["events"] == [loop["of"]] * 3
    assert loop["never_grasped_close_distance"] == [] and loop["never_closed"] == 0
    assert loop["missed_release_distance"] == []
    probe = diag.first_chunk(expert_chunk, task, str(demo_data / task), 8, diag.FRESH_SCENES)
    assert probe["distance"] == 0.0
    assert probe["constant_distance"] > 0.02  # the object's place varies across scenes
    assert all(c == pytest.approx(1.0) for c in probe["correlation"].values()) and probe["correlation"]


def test_a_constant_chunk_scores_the_constant_distance_and_a_missed_grasp_is_measured(demo_data):
    task = "task4_sorting"
    root = str(demo_data / task)
    ref = diag.first_chunk(expert_chunk, task, root, 8, diag.FRESH_SCENES)

    def constant(envs, obs):  # the expert's chunks averaged over the same scenes, for every scene
        return np.repeat(expert_chunk(envs, obs).mean(0, keepdims=True), len(envs), axis=0)

    probe = diag.first_chunk(constant, task, root, 8, diag.FRESH_SCENES)
    assert probe["distance"] == pytest.approx(ref["constant_distance"])
    assert probe["correlation"] == {}

    # closing the claw at home, far from the workpiece: never grasped, and the distance is where it closed
    def close_at_home(envs, obs):
        a = np.stack([e.world.q.copy() for e in envs])
        a[:, 7] = 1.0
        return a

    loop = diag.closed_loop(close_at_home, task, root, 2, 1000)
    assert loop["success"] == 0 and loop["events"] == [0, 0]
    assert len(loop["never_grasped_close_distance"]) == 2 and min(loop["never_grasped_close_distance"]) > 0.07


def test_the_script_on_a_trained_checkpoint(full_run, demo_data):
    ckpt = final_pretrained(full_run[1], "task4_sorting")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_diagnose.py"), str(ckpt), "--tasks",
                        "task2_weighing", "--data-root", str(demo_data), "--episodes", "2", "--scenes", "4"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    lines = lines[lines.index("task2_weighing"):]  # after LeRobot's own loading messages
    assert "closed loop, 2 held-out scenes: success" in lines[1] and "(of 5)" in lines[1]
    assert "first chunk, 4 new scenes: hand targets" in lines[-1] and "correlation with the expert: x" in lines[-1]


def test_a_release_off_the_mark_is_measured(demo_data):
    """The expert until its first grasp, then the claw opened at once: on task 1 the block is let go
    on the belt, where marker A never is, and nothing else is let go."""
    from kuavo_train.data.demo_world.world import PLACE_TOL

    task = "task1_moving_grasp"

    def drop_after_grasp(envs, obs):
        a = np.stack([e.world.expert_action() for e in envs])
        for i, e in enumerate(envs):
            if e.world.holder is not None:
                a[i] = e.world.q.copy()
                a[i, e.world.holder + 7] = 0.0
        return a

    loop = diag.closed_loop(drop_after_grasp, task, str(demo_data / task), 2, 1000)
    assert loop["events"] == [1, 1] and loop["success"] == 0
    assert len(loop["missed_release_distance"]) >= 2 and min(loop["missed_release_distance"]) > PLACE_TOL
    assert min(loop["missed_release_other_mark"]) > PLACE_TOL  # the belt holds no mark
    text = diag.report(task, loop, {"distance": 0.0, "constant_distance": 0.0, "correlation": {}}, 2, 0)
    assert "releases where a place was next and did not count: " in text and f"(a place counts within {PLACE_TOL})" in text
    assert f"within {PLACE_TOL} of one in 0 of them" in text


def test_a_release_on_the_wrong_mark_is_told_apart(demo_data):
    """The expert's motions, but carrying to marker B where A is next: each release lands on another
    mark of the scene, which the report counts; the belt releases above land near none."""
    from kuavo_train.data.demo_world.tasks import RIGHT
    from kuavo_train.data.demo_world.world import PLACE_TOL, _grasp_phases, _place_phases

    task = "task1_moving_grasp"

    def carry_to_b(envs, obs):
        for e in envs:
            if e.world.steps == 0:
                e.world.plan = [*_grasp_phases(RIGHT), *_place_phases(RIGHT, "B")]
        return np.stack([e.world.expert_action() for e in envs])

    loop = diag.closed_loop(carry_to_b, task, str(demo_data / task), 2, 1000)
    assert loop["events"] == [1, 1]
    assert len(loop["missed_release_distance"]) == 2 and min(loop["missed_release_distance"]) > PLACE_TOL
    assert max(loop["missed_release_other_mark"]) < PLACE_TOL
    text = diag.report(task, loop, {"distance": 0.0, "constant_distance": 0.0, "correlation": {}}, 2, 0)
    assert "the nearest other mark of the scene: median " in text and f"within {PLACE_TOL} of one in 2 of them" in text


def test_the_skill_probe_scores_the_expert_exactly_and_a_constant_chunk_as_the_constant():
    """`skill_fit` against the chunks the expert recorded: a planner that returns them scores 0 and a
    correlation of 1, one that returns their mean the constant's distance; frames too near an
    episode's end are left out."""
    from kuavo_train.data.demo_world.pretraining import SKILLS, pretraining_frames

    frames = pretraining_frames(0, 4, 64)
    where = {frames["images"][i, 0].tobytes(): i for i in range(len(frames["images"]))}

    def recorded(batch):  # the expert's next 10 actions from each frame given (found by its head image)
        head = (batch["observation.images.head_cam_h"] * 255).round().byte().permute(0, 2, 3, 1).numpy()
        idx = np.asarray([where[h.tobytes()] for h in head])
        assert [SKILLS[int(frames["skill"][i])].instruction for i in idx] == batch["task"]
        return frames["action"][idx[:, None] + np.arange(10)]

    skill = 2  # pick and place with the right hand: the targets vary in x (the belt) and y (the mark)
    fit = diag.skill_fit(recorded, frames, skill, 10, episodes=4)
    assert fit["n"] == 4 and fit["distance"] == 0.0 and fit["constant_distance"] > 0.05
    assert set(fit["correlation"]) == {"x", "y"} and all(c == pytest.approx(1.0) for c in fit["correlation"].values())

    def constant(batch):  # their mean, for every frame
        return np.repeat(recorded(batch).mean(0, keepdims=True), len(batch["task"]), 0)

    const = diag.skill_fit(constant, frames, skill, 10, 4)
    assert const["distance"] == pytest.approx(fit["constant_distance"]) and const["correlation"] == {}
    assert diag.skill_fit(recorded, frames, skill, 10, episodes=2)["n"] == 2
    assert diag.skill_fit(recorded, frames, skill, 500, episodes=4) is None


def test_the_script_on_a_pretrained_base_with_another_instruction(tmp_path, demo_data, demo_base):
    """An embedded base has no processors: the script normalizes with the statistics of the base's
    own pretraining set (regenerated from base_info.json) and runs the closed loop with the
    instruction given, and with `--skills`. A base without a skills phase has nothing to normalize
    with, and one whose recorded pretraining set this code no longer makes would be normalized
    wrongly: one line each."""
    from kuavo_train.config.schema import DemoSettings
    from kuavo_train.data.demo_world.pretraining import SKILLS, pretraining_frames
    from kuavo_train.policy.base_model import build_base_model
    from kuavo_train.training.pretrain import demo_world_pretraining, skill_stats

    base = build_base_model(tmp_path / "base", instructions=[s.instruction for s in SKILLS], chunk_size=10,
                            n_action_steps=5, seed=0, image_size=64, pretrain=demo_world_pretraining(DemoSettings(
                                pretrain_skill_steps=2, pretrain_skill_batch_size=2, pretrain_episodes_per_skill=1,
                                seed=3)))
    stats = diag.base_skill_stats(str(base))
    want = skill_stats(pretraining_frames(3, 1, 64))
    assert all(torch.equal(stats[k][s], want[k][s]) for k in want for s in want[k])
    assert not torch.equal(stats["action"]["mean"], skill_stats(pretraining_frames(0, 1, 64))["action"]["mean"])
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_diagnose.py"), str(base), "--tasks",
                        "task1_moving_grasp", "--data-root", str(demo_data), "--episodes", "2",
                        "--instruction", SKILLS[2].instruction], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    lines = lines[lines.index(f"task1_moving_grasp, instruction {SKILLS[2].instruction!r}"):]
    assert "closed loop, 2 held-out scenes: success" in lines[1] and "(of 4)" in lines[1]
    assert not any("first chunk" in line for line in lines)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_diagnose.py"), str(base), "--skills", "2",
                        "--frames", "0", "--episodes", "1"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    lines = lines[lines.index(f"skill 2 {SKILLS[2].instruction!r}"):]
    assert lines[1].startswith("  frame 0, own scenes (1): hand targets ") and "best constant chunk 0.000" in lines[1]
    assert lines[2].startswith("  frame 0, fresh scenes (1): hand targets ")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_diagnose.py"), str(base), "--skills", "14"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "--skills: no skill 14 (0..13)"
    # a base built by other pretraining code: its recorded set is not what this code regenerates
    info_file = base.parent / "base_info.json"
    info = json.loads(info_file.read_text())
    info["pretraining"]["frames"] += 1
    info_file.write_text(json.dumps(info))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_diagnose.py"), str(base), "--skills", "2"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    n = info["pretraining"]["frames"]
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"{base}: its pretraining set cannot be regenerated: base_info.json records {n} frames of "
        f"{len(SKILLS)} skills, this code makes {n - 1} of {len(SKILLS)} (the pretraining code changed since the base "
        "was built)")
    with pytest.raises(SystemExit, match="no skills phase recorded in .*base_info.json: no statistics for a base "
                       "without pre/post-processors"):
        diag.base_skill_stats(str(demo_base))
