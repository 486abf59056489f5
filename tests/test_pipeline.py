"""The sequential pipeline end to end on real tiny data: four stages, checkpoints that stock
LeRobot loads, one set of stats, frozen weights untouched, deterministic validation,
the lr schedule, and kill-and-resume matching an uninterrupted run."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FULL_RUN_EXTRA, REPO, TASK_NAMES, final_pretrained, kill_after_first_checkpoint, tiny_overrides
from safetensors.torch import load_file


SPEC_SCRIPT = ["kuavo_train/train_smolvla_sequential.py", "--config-path=../configs/policy", "--config-name=smolvla_sequential_base"]




def test_run_layout(full_run):
    cfg, run_dir = full_run
    state = json.loads((run_dir / "run.json").read_text())
    assert [state["stages"][n]["status"] for n in TASK_NAMES] == ["complete"] * 4
    for k, name in enumerate(TASK_NAMES, start=1):
        ck = run_dir / f"stage{k}_{name}" / "checkpoints"
        assert (ck / "last" / "pretrained_model" / "model.safetensors").is_file()
        assert (ck / "last" / "training_state" / "training_step.json").is_file()
        assert (ck / "best" / "pretrained_model" / "config.json").is_file()
        tasks = json.loads((ck / "last" / "pretrained_model" / "kuavo_tasks.json").read_text())["tasks"]
        assert [t["name"] for t in tasks] == TASK_NAMES[:k]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob(".tmp-*"))


def test_every_cell_of_a_fine_tuning_run_is_evaluated_on_its_own_model(full_run):
    # the expert changes in every stage, so no cell may stand for another (a cell is reused only
    # when the tensors its task runs on are the same; see the lora_per_task tests for reuse)
    _, run_dir = full_run
    ev = json.loads((run_dir / "evaluation.json").read_text())
    keys = [k for row in ev["rows"].values() for k in row["cells"]]
    assert len(keys) == len(set(keys)) == 5 * len(TASK_NAMES)
    assert all(ev["cells"][k]["row"] == int(r) for r, row in ev["rows"].items() for k in row["cells"])


def test_validation_log_covers_tasks_so_far_on_held_out_data(full_run):
    cfg, run_dir = full_run
    records = [json.loads(l) for l in (run_dir / "validation.jsonl").read_text().splitlines()]
    for k in range(1, 5):
        seen = {r["task_id"] for r in records if r["stage"] == k}
        assert seen == set(range(1, k + 1))
    assert all(math.isfinite(r["loss"]) for r in records)


def test_stock_lerobot_loads_every_stage(full_run):
    """Every weight of every stage's file, no key missing or extra (stock loading is strict=False and
    would only log them). The model cache is this session's; tests/test_stock_load.py starts empty."""
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    _, run_dir = full_run
    for name in TASK_NAMES:
        path = final_pretrained(run_dir, name)
        policy = SmolVLAPolicy.from_pretrained(str(path))
        saved, loaded = load_file(str(path / "model.safetensors")), policy.state_dict()
        assert saved.keys() == loaded.keys(), (name, sorted(saved.keys() ^ loaded.keys())[:5])
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
        pre, post = make_pre_post_processors(policy.config, pretrained_path=str(path))
        assert policy.config.chunk_size == 10 and pre is not None and post is not None


def test_step_counts_and_replay_mix_follow_the_epoch_definition(full_run):
    """run.json's steps and realised mix against the README's definition, counted from the datasets'
    own episode lengths: an epoch = every training frame of task k once + replay, round(n_k / w_k)
    samples, batch_size-sized batches (drop_last)."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    from kuavo_train.data.task_data import open_task_data

    cfg, run_dir = full_run
    state = json.loads((run_dir / "run.json").read_text())
    assert cfg.dataloader.drop_last
    for stage in cfg.ordered_stages():
        meta = LeRobotDatasetMetadata(stage.dataset.repo_id, root=stage.dataset.root)
        train_eps = list(open_task_data(stage).train_episodes)
        frames = sum(int(meta.episodes[e]["length"]) for e in train_eps)
        w = stage.replay_weights  # as configured (the demo's shares sum to 1)
        samples = round(frames / (w[stage.task_id] / sum(w.values())))
        rec = state["stages"][stage.name]
        assert rec["total_steps"] == samples // cfg.dataloader.batch_size * stage.max_epoch, stage.name
        assert rec["replay_mix"][stage.name] == frames and sum(rec["replay_mix"].values()) == samples, rec["replay_mix"]


def _processor_stats(path: Path) -> dict:
    files = sorted(path.glob("policy_preprocessor*normalizer*.safetensors"))
    assert files, list(path.iterdir())
    return load_file(str(files[0]))


def test_stats_identical_in_every_checkpoint(full_run):
    _, run_dir = full_run
    ref = _processor_stats(final_pretrained(run_dir, TASK_NAMES[0]))
    assert any("observation.state" in k for k in ref) and any("action" in k for k in ref)
    for name in TASK_NAMES[1:]:
        other = _processor_stats(final_pretrained(run_dir, name))
        assert ref.keys() == other.keys()
        assert all(torch.equal(ref[k], other[k]) for k in ref)


def test_frozen_parameters_bit_identical_from_base_to_stage4(full_run, demo_base):
    _, run_dir = full_run
    base = load_file(str(demo_base / "model.safetensors"))
    final = load_file(str(final_pretrained(run_dir, TASK_NAMES[-1]) / "model.safetensors"))
    vlm_keys = [k for k in base if ".vlm." in k]
    expert_keys = [k for k in base if "lm_expert" in k or "action_out_proj" in k]
    assert vlm_keys and expert_keys
    assert all(torch.equal(base[k], final[k]) for k in vlm_keys)
    # ...while the action expert did train.
    assert any(not torch.equal(base[k], final[k]) for k in expert_keys)


def test_lr_schedule_of_each_stage(full_run):
    """Logged lr per step = linear warmup then cosine decay to decay_lr (LeRobot's schedule, scaled to the stage)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir = full_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    state = json.loads((run_dir / "run.json").read_text())
    offset = 0
    for name in TASK_NAMES:
        st = cfg.stages[name]
        total = state["stages"][name]["total_steps"]
        peak, low = cfg.learning_rate.base_lr * cfg.learning_rate.decay_factors[st.task_id - 1], cfg.scheduler.decay_lr
        warm, decay = st.scheduler_warmup_steps, st.scheduler_decay_steps
        if total < decay:
            warm, decay = int(warm * total / decay), total
        for step in range(1, total + 1):
            # the lr logged after optimizer step `step` is the one for the next step
            s = step
            if s < warm:
                expect = peak * ((1 / (warm + 1) - 1) * (1 - s / warm) + 1)
            else:
                c = 0.5 * (1 + math.cos(math.pi * min(s, decay) / decay))
                expect = peak * ((1 - low / peak) * c + low / peak)
            assert lrs[offset + step] == pytest.approx(expect, rel=1e-5), (name, step)
        assert state["stages"][name]["lr"] == pytest.approx(peak)
        offset += total


def test_validation_is_deterministic(full_run):
    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.evaluation.validation import validation_frames, validation_loss
    from kuavo_train.policy import factory
    from kuavo_train.data.features import make_task_dataset

    cfg, run_dir = full_run
    path = final_pretrained(run_dir, TASK_NAMES[1])
    pcfg = factory.read_pretrained_config(path)
    policy = factory.load_policy(path, pcfg)
    pre, _ = factory.make_processors(pcfg, pretrained_path=path)
    task = open_task_data(cfg.stages[TASK_NAMES[0]])
    ds = make_task_dataset(task, task.val_episodes, pcfg.chunk_size)
    idx = validation_frames(ds, list(task.val_episodes), 10)
    a = validation_loss(policy, pre, ds, idx, task_id=1, seed=5, batch_size=4, device="cpu")
    b = validation_loss(policy, pre, ds, idx, task_id=1, seed=5, batch_size=7, device="cpu")
    c = validation_loss(policy, pre, ds, idx, task_id=1, seed=6, batch_size=4, device="cpu")
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert a != c


def test_rerun_skips_complete_stages(full_run, python_exe, tmp_path):
    cfg, shared_dir = full_run
    run_dir = tmp_path / "run"  # a copy: the shared run is read by other workers meanwhile
    shutil.copytree(shared_dir, run_dir)
    before = (run_dir / "run.json").read_text()
    # as a crash during the evaluation after the last stage leaves it: stage 4 complete, its row and
    # the report missing
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    row4 = evaluation["rows"].pop("4")
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    (run_dir / "report.md").unlink()
    overrides = tiny_overrides(run_dir, Path(cfg.policy.pretrained_path), Path(cfg.data_root), *FULL_RUN_EXTRA)
    r = subprocess.run([python_exe, *SPEC_SCRIPT, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("is complete already: skipped") == 4
    assert json.loads((run_dir / "run.json").read_text())["stages"] == json.loads(before)["stages"]
    assert json.loads((run_dir / "evaluation.json").read_text())["rows"]["4"] == row4  # deterministic
    assert "after stage 4" in (run_dir / "report.md").read_text()


def test_a_crash_before_best_was_copied_is_made_good_on_resume(full_run, tmp_path):
    """Killed after writing `last` and before copying it to `best` (the final epoch, whose loss is the
    lowest): the rerun has nothing left to train, and must still make `best` that epoch's."""
    cfg, shared_dir = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(shared_dir, run_dir)
    stage_dir = run_dir / f"stage1_{TASK_NAMES[0]}" / "checkpoints"
    last = json.loads((stage_dir / "last" / "kuavo_checkpoint.json").read_text())
    assert last["epoch"] == 2 and last["current_task_val_loss"] is not None
    # as the crash leaves it: best is an earlier epoch's, with a higher loss, and the stage is running
    best = {**last, "epoch": 1, "current_task_val_loss": last["current_task_val_loss"] + 1.0}
    (stage_dir / "best" / "kuavo_checkpoint.json").write_text(json.dumps(best))
    state = json.loads((run_dir / "run.json").read_text())
    state["stages"][TASK_NAMES[0]]["status"] = "running"
    (run_dir / "run.json").write_text(json.dumps(state))
    overrides = tiny_overrides(run_dir, Path(cfg.policy.pretrained_path), Path(cfg.data_root), *FULL_RUN_EXTRA,
                               f"task=tasks/{TASK_NAMES[0]}")
    r = subprocess.run([sys.executable, "-m", "kuavo_train.cli.main", "train", *overrides], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((stage_dir / "best" / "kuavo_checkpoint.json").read_text()) == last
    assert (stage_dir / "best" / "pretrained_model" / "model.safetensors").read_bytes() == \
        (stage_dir / "last" / "pretrained_model" / "model.safetensors").read_bytes()
    assert json.loads((run_dir / "run.json").read_text())["stages"][TASK_NAMES[0]]["status"] == "complete"


def test_statistics_left_before_any_stage_began_are_computed_again(full_run, tmp_path):
    """A launch stopped between writing the statistics and beginning stage 1 (a one-line error in
    between, a crash) leaves them; the next may have other data or settings, so they are made again."""
    cfg, shared_dir = full_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stats = json.loads((shared_dir / "normalization_stats.json").read_text())
    stale = json.loads(json.dumps(stats))
    stale["action"]["mean"][0] += 9.5  # as if computed from other data
    (run_dir / "normalization_stats.json").write_text(json.dumps(stale))
    (run_dir / "run.json").write_text(json.dumps({"stages": {}}))
    overrides = tiny_overrides(run_dir, Path(cfg.policy.pretrained_path), Path(cfg.data_root), *FULL_RUN_EXTRA,
                               f"task=tasks/{TASK_NAMES[0]}", "evaluation.after_each_stage=false")
    r = subprocess.run([sys.executable, "-m", "kuavo_train.cli.main", "train", *overrides], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run_dir / "normalization_stats.json").read_text()) == stats  # the same data: the same values
    assert "no stage has begun: the normalization statistics are computed again" in (run_dir / "train.log").read_text()


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, demo_base, demo_data, python_exe):
    """SIGKILL stage 1 after its first epoch's checkpoint; the rerun must end with the same weights."""
    extra = ("task=tasks/task1_moving_grasp", "stages.task1_moving_grasp.max_epoch=3", "evaluation.after_each_stage=false")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = subprocess.run([python_exe, *SPEC_SCRIPT, *tiny_overrides(ref_dir, demo_base, demo_data, *extra)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    kill_after_first_checkpoint([python_exe, *SPEC_SCRIPT, *tiny_overrides(cut_dir, demo_base, demo_data, *extra)],
                                cut_dir / "stage1_task1_moving_grasp" / "checkpoints" / "last" / "kuavo_checkpoint.json", 3)
    state = json.loads((cut_dir / "run.json").read_text())
    assert state["stages"]["task1_moving_grasp"]["status"] == "running"
    assert state["stages"]["task1_moving_grasp"]["processes"] == 1

    # resumed by a launch of another size: refused in one line before anything runs (its steps per
    # epoch, and so the epoch it would resume at, would be another's)
    other = subprocess.run([python_exe, *SPEC_SCRIPT, *tiny_overrides(cut_dir, demo_base, demo_data, *extra)], cwd=REPO,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr[-2000:]
    assert "stage task1_moving_grasp of" in other.stderr and "was begun with 1 process(es) and this launch has 2" in other.stderr
    assert json.loads((cut_dir / "run.json").read_text()) == state
    # resumed with another setting: refused, and the way out keeps the stages before it
    other = subprocess.run([python_exe, *SPEC_SCRIPT, *tiny_overrides(cut_dir, demo_base, demo_data, *extra),
                            "learning_rate.base_lr=3e-3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "was begun with 0.002, this config says 0.003" in other.stderr, other.stderr[-2000:]
    assert f"or delete {cut_dir / 'stage1_task1_moving_grasp'} to begin the stage again" in other.stderr
    # ...or another held-out set: its `best` so far was chosen on the old one (a finished stage may
    # be validated otherwise: test_bad_inputs.py::test_a_stage_is_never_reused_or_resumed_with_other_settings_cli)
    other = subprocess.run([python_exe, *SPEC_SCRIPT, *tiny_overrides(cut_dir, demo_base, demo_data, *extra),
                            "validation.validation_episodes=1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "validation.validation_episodes: stage task1_moving_grasp" in other.stderr
    assert "was begun with 2, this config says 1" in other.stderr, other.stderr[-2000:]
    assert json.loads((cut_dir / "run.json").read_text()) == state

    # what the killed launch may have logged after its checkpoint, which the rerun logs again
    from torch.utils.tensorboard import SummaryWriter

    saved = json.loads((cut_dir / "stage1_task1_moving_grasp" / "checkpoints" / "last" / "kuavo_checkpoint.json")
                       .read_text())["step"]
    with SummaryWriter(str(cut_dir / "tensorboard")) as w:
        w.add_scalar("train/loss", 123.0, saved + 1)
    with open(cut_dir / "validation.jsonl", "a") as f:  # and a line it was writing when killed
        f.write('{"stage": 1, "epoch": 2, "st')

    resumed = subprocess.run([python_exe, *SPEC_SCRIPT, *tiny_overrides(cut_dir, demo_base, demo_data, *extra)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from last" in resumed.stdout
    # TensorBoard shows each step once, with the values of the uninterrupted run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(run_dir):
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    assert losses(cut_dir) == losses(ref_dir) and len(losses(ref_dir)) > saved + 1
    # run.json counts the samples of the launch that finished the stage, and says from which step
    ref_stage, cut_stage = (json.loads((d / "run.json").read_text())["stages"]["task1_moving_grasp"]
                            for d in (ref_dir, cut_dir))
    assert ref_stage["samples_per_process"] == [ref_stage["total_steps"] * 16] and ref_stage["samples_counted_from_step"] == 0
    assert cut_stage["samples_per_process"] == [(cut_stage["total_steps"] - saved) * 16]
    assert cut_stage["samples_counted_from_step"] == saved
    a = load_file(str(final_pretrained(ref_dir, "task1_moving_grasp") / "model.safetensors"))
    b = load_file(str(final_pretrained(cut_dir, "task1_moving_grasp") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va = [json.loads(l) for l in (ref_dir / "validation.jsonl").read_text().splitlines()]
    vb = [json.loads(l) for l in (cut_dir / "validation.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["task_id"], r["loss"]) for r in va] == [(r["epoch"], r["task_id"], r["loss"]) for r in vb]


def _by_hand(R, higher_is_better):
    """ACC, BWT, FWT of a (T+1) x T matrix as the README defines them (signs flipped when lower is better)."""
    T, sign = len(R[0]), (1 if higher_is_better else -1)
    acc = sum(R[T]) / T
    bwt = sign * sum(R[T][j] - R[j + 1][j] for j in range(T - 1)) / (T - 1)
    fwt = sign * sum(R[j][j] - R[0][j] for j in range(1, T)) / (T - 1)
    return acc, bwt, fwt


def test_run_report_has_every_matrix_row_and_metric(full_run):
    """The shared run's report: rows 0..4 of every measured matrix, metrics equal to the README's
    formulas on those rows (and printed in report.md), figures that are real images."""
    import matplotlib.image

    _, run_dir = full_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task_names"] == TASK_NAMES
    md = (run_dir / "report.md").read_text()
    for m in ("val_loss", "action_error"):
        rows = report["matrices"][m]
        assert len(rows) == 5 and all(len(r) == 4 and all(v is not None for v in r) for r in rows)
        assert report["directions"][m] is False  # lower is better for losses and errors
        met = report["metrics"][m]
        acc, bwt, fwt = _by_hand(rows, higher_is_better=False)
        assert (met["acc"], met["bwt"], met["fwt"]) == (pytest.approx(acc), pytest.approx(bwt), pytest.approx(fwt))
        assert f"| {acc:.3f} | {bwt:.3f} | {fwt:.3f} |" in md, m  # the metrics row as printed
        assert f"| after stage 4 | {' | '.join(f'{v:.3f}' for v in rows[4])} |" in md
    assert "success" not in report["matrices"]  # no closed-loop episodes in the tiny run
    assert report["versions"]["lerobot"] == "0.6.1" and report["seed"] == 42
    for png in ("heatmap_val_loss.png", "heatmap_action_error.png", "validation_curves.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png
        img = matplotlib.image.imread(run_dir / png)
        assert img.ndim == 3 and min(img.shape[:2]) > 100 and float(img[..., :3].std()) > 0.01, png  # not blank
        assert f"]({png})" in md, png
    assert set(report["figures"].values()) >= {"heatmap_val_loss.png", "heatmap_action_error.png", "validation_curves.png"}


def test_base_row_is_evaluated_once_for_runs_that_share_its_inputs(full_run, tmp_path, demo_base, demo_data, caplog):
    """Row 0 (the base model) depends on no strategy and no seed: with evaluation.base_row_dir,
    a second run reads it instead of evaluating it, and gets exactly what it would compute; a
    changed input (the validation seed, the statistics) is a different key."""
    import logging

    from kuavo_train.config.loading import load_run_config
    from kuavo_train.data.stats import STATS_FILE
    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.evaluation.run_evaluation import evaluate_run, shared_base_row

    _, run_dir = full_run
    rows = tmp_path / "rows"

    def config(name, *extra):
        d = tmp_path / name
        if not d.is_dir():
            d.mkdir()
            shutil.copy(run_dir / STATS_FILE, d / STATS_FILE)  # no run.json: only row 0 is evaluated
        # two of the four tasks: enough to show the row is shared, half the evaluation
        return load_run_config(tiny_overrides(d, demo_base, demo_data, "~stages.task3_placement",
                                              "~stages.task4_sorting", "evaluation.closed_loop_episodes=1", *extra))

    def row0(name, *extra):
        with caplog.at_level(logging.INFO, logger="kuavo_train.evaluation.run_evaluation"):
            caplog.clear()
            evaluate_run(config(name, *extra))
        return json.loads((tmp_path / name / "evaluation.json").read_text())["rows"]["0"], caplog.text

    first, log1 = row0("a", f"evaluation.base_row_dir={rows}")
    assert "evaluating the base model" in log1 and len(list(rows.iterdir())) == 1
    assert first["success"] and all(v is not None for v in first["success"] + first["val_loss"])
    shared = next(rows.iterdir())
    written = shared.stat().st_mtime_ns
    second, log2 = row0("b", f"evaluation.base_row_dir={rows}", "seed=7", "strategy=sequential_naive")
    assert "evaluating the base model" not in log2 and str(shared) in log2
    assert second == first and shared.stat().st_mtime_ns == written
    own, _ = row0("c", "seed=7", "strategy=sequential_naive")  # evaluated by the run itself
    assert own == first

    def key(name, *extra):
        cfg = config(name, f"evaluation.base_row_dir={rows}", *extra)
        return shared_base_row(cfg, {s.task_id: open_task_data(s) for s in cfg.ordered_stages()})

    assert key("b") == shared and key("d", "validation.seed=3") != shared
    stats = tmp_path / "e" / STATS_FILE
    key("e")
    stats.write_text(stats.read_text().replace("1", "2", 1))
    assert key("e") != shared


def test_truncated_instruction_is_warned_at_training_start(full_run):
    # the embedded tiny tokenizer cuts task 3's instruction (58 tokens > 48); the log shows what is kept
    cfg, run_dir = full_run
    line = next(l for l in (run_dir / "train.log").read_text().splitlines() if "instruction of task3_placement has" in l)
    assert f"the tokenizer keeps {cfg.policy.tokenizer_max_length}" in line and "'Pick up a bottle" in line


def test_bf16_stage_trains_with_finite_losses_and_its_own_cache_entries(tmp_path, demo_base, demo_data, python_exe):
    """`policy.mixed_precision=bf16` through the CLI (accelerate's autocast, in a process of its own:
    accelerate allows one precision per process): a tiny stage 1 trains, losses stay finite, and
    its cached features go to the bf16 folder of the cache only."""
    run_dir, cache_dir = tmp_path / "run", tmp_path / "features"
    overrides = tiny_overrides(run_dir, demo_base, demo_data, "task=tasks/task1_moving_grasp", "policy.mixed_precision=bf16",
                               "evaluation.after_each_stage=false", f"feature_cache.dir={cache_dir}")
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "train", *overrides], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((run_dir / "run.json").read_text())
    assert state["config"]["policy"]["mixed_precision"] == "bf16"
    assert state["stages"]["task1_moving_grasp"]["status"] == "complete"
    epochs = re.findall(r"stage 1 epoch \d+/\d+: (\d+) steps, mean loss (\S+),", (run_dir / "train.log").read_text())
    assert epochs and all(int(n) > 0 and math.isfinite(float(loss)) for n, loss in epochs), epochs
    val = [json.loads(l)["loss"] for l in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert val and all(math.isfinite(v) for v in val)
    precisions = {p.name for p in cache_dir.glob("*/*") if p.is_dir()}
    assert precisions == {"autocast-bfloat16"}, precisions


def test_fp16_on_the_cpu_is_said_to_do_nothing(python_exe, tmp_path, demo_base, demo_data):
    """accelerate runs fp16 as plain fp32 on the CPU (no autocast, no loss scaler): the run says so
    rather than let a user believe the stages trained in half precision. In a process of its own:
    accelerate allows one precision per process."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from kuavo_train.config.loading import load_run_config\n"
            "from kuavo_train.training.stage_trainer import make_accelerator\n"
            "acc = make_accelerator(load_run_config(sys.argv[1:]))\n"
            "print('scaler', acc.scaler, acc.device.type)\n")
    for precision, warned in (("fp16", True), ("bf16", False)):
        overrides = tiny_overrides(tmp_path / "run", demo_base, demo_data, f"policy.mixed_precision={precision}")
        r = subprocess.run([python_exe, "-c", code, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "scaler None cpu" in r.stdout
        assert ("policy.mixed_precision=fp16 does nothing on the CPU" in r.stdout) == warned, r.stdout


def test_a_run_trained_on_a_gpu_is_evaluated_on_a_machine_without_one(full_run, tmp_path, demo_base, demo_data):
    """Checkpoints written on a GPU name `cuda` in their config and their preprocessor (LeRobot's
    postprocessor always hands actions back on the CPU); evaluating
    them here (no CUDA) runs on the CPU and gives the numbers of the same run trained here."""
    from kuavo_train.config.loading import load_run_config
    from kuavo_train.evaluation.run_evaluation import evaluate_run

    _, run_dir = full_run
    gpu_run = tmp_path / "gpu_run"
    shutil.copytree(run_dir, gpu_run)
    (gpu_run / "evaluation.json").unlink()
    named = 0
    for f in [*gpu_run.glob("stage*/checkpoints/*/pretrained_model/config.json"),
              *gpu_run.glob("stage*/checkpoints/*/pretrained_model/policy_preprocessor.json")]:
        text = f.read_text()
        if '"device": "cpu"' in text:
            f.write_text(text.replace('"device": "cpu"', '"device": "cuda"'))
            named += 1
    assert named >= 8  # config and preprocessor of every stage's checkpoints
    report = evaluate_run(load_run_config(tiny_overrides(gpu_run, demo_base, demo_data, *FULL_RUN_EXTRA, "policy.device=cuda")))
    assert report["matrices"] == json.loads((run_dir / "report.json").read_text())["matrices"]
