"""Bad data and damaged checkpoints: never a silently wrong model, never a traceback.

Data problems are found when a task's data is opened (before anything is written);
a non-finite loss stops the stage before any update; a damaged or NaN checkpoint is
refused by the loader; the wrapper never returns a non-finite action."""

import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FULL_RUN_EXTRA, REPO, FakeHub, final_pretrained, tiny_overrides

from kuavo_train.config.loading import load_run_config
from kuavo_train.errors import KuavoError
from kuavo_train.policy.factory import PolicyLoadError
from kuavo_train.training.pipeline import Pipeline
from kuavo_train.training.stage_trainer import NonFiniteLossError
from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper

CLI = ["-m", "kuavo_train.cli.main"]


def _cli(python_exe, *args, env=None):
    return subprocess.run([python_exe, *CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    return lines[0]


def _data_copy(demo_data, tmp_path, task="task2_weighing"):
    root = tmp_path / "data"
    shutil.copytree(demo_data, root, symlinks=True)
    files = sorted((root / task / "data").rglob("*.parquet"))
    return root, files[0]


def test_nan_in_one_action_value_is_refused_before_training(python_exe, tmp_path, demo_base, demo_data):
    root, f = _data_copy(demo_data, tmp_path)
    t = pq.read_table(f)
    actions = np.stack(t.column("action").to_numpy(zero_copy_only=False)).astype(np.float32)
    actions[7, 3] = np.nan
    col = pa.array(list(actions), type=t.schema.field("action").type)
    pq.write_table(t.set_column(t.schema.get_field_index("action"), "action", col), f)
    run_dir = tmp_path / "run"
    line = _one_line(_cli(python_exe, "train", *tiny_overrides(run_dir, demo_base, root)))
    ep, frame = int(t.column("episode_index")[7].as_py()), int(t.column("frame_index")[7].as_py())
    assert "stages.task2_weighing.dataset.root" in line and f"action is nan at episode {ep} frame {frame}" in line
    assert "dim 3 ('zarm_l4')" in line
    assert not run_dir.exists()


def test_truncated_parquet_is_one_line(python_exe, tmp_path, demo_base, demo_data):
    root, f = _data_copy(demo_data, tmp_path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    run_dir = tmp_path / "run"
    line = _one_line(_cli(python_exe, "train", *tiny_overrides(run_dir, demo_base, root)))
    assert "stages.task2_weighing.dataset.root: cannot read" in line and str(f.name) in line
    assert not run_dir.exists()



CAM = "observation.images.head_cam_h"
GARBAGE = {"garbage": lambda png: b"this is not a png" * 20, "truncated": lambda png: png[: len(png) // 2]}


def _damage_image(f, episode, frame, damage):
    """Replace one camera image (PNG bytes embedded in the data parquet, as the demo world stores
    them) of one frame; the numeric columns, hence everything checked up front, stay valid."""
    t = pq.read_table(f)
    row = int(np.flatnonzero((t.column("episode_index").to_numpy() == episode)
                             & (t.column("frame_index").to_numpy() == frame))[0])
    col = t.column(CAM).combine_chunks()
    images = col.field("bytes").to_pylist()
    images[row] = damage(images[row])
    fixed = pa.StructArray.from_arrays([pa.array(images, type=pa.binary()), col.field("path")], fields=list(col.type))
    pq.write_table(t.set_column(t.schema.get_field_index(CAM), CAM, fixed), f)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", list(GARBAGE))
def test_damaged_image_is_one_data_error_in_and_out_of_workers(tmp_path, demo_data, damage, workers):
    from kuavo_train.data.frames import ChunkedFrameDataset, fetch_batches
    from kuavo_train.errors import DataError

    root, f = _data_copy(demo_data, tmp_path)
    _damage_image(f, 0, 5, GARBAGE[damage])
    ds = ChunkedFrameDataset("t/task2", root / "task2_weighing", episodes=[0], chunk_size=10, camera_keys=[CAM])
    ds[4]  # its neighbour decodes
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [3, 5]), batch_size=1, num_workers=workers)
    with pytest.raises(DataError) as err:
        list(fetch_batches(loader))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data error: dataset t/task2 at "), msg
    assert f"cannot decode the {CAM} image of episode 0 frame 5 (in data/chunk-000/{f.name})" in msg
    assert "copy or convert the dataset again" in msg


def test_damaged_image_mid_training_is_one_line_and_keeps_the_checkpoints(python_exe, tmp_path, demo_base, demo_data):
    """Found only when the frame is drawn (stage 2, in a DataLoader worker): exit 2 with one line;
    stage 1's checkpoints are as they were, stage 2 wrote none."""
    from kuavo_train.training import checkpoint as ckpt

    root, f = _data_copy(demo_data, tmp_path)
    _damage_image(f, 1, 7, GARBAGE["garbage"])
    run_dir = tmp_path / "run"
    line = _one_line(_cli(python_exe, "train", *tiny_overrides(
        run_dir, demo_base, root, "~stages.task3_placement", "~stages.task4_sorting", "evaluation.after_each_stage=false",
        "dataloader.num_workers=2", "dataloader.drop_last=false")))
    assert f"data error: dataset kuavo/task2_weighing at {root / 'task2_weighing'}: cannot decode the {CAM} image of " \
           f"episode 1 frame 7 (in data/chunk-000/{f.name}): cannot identify image file;" in line, line
    state = json.loads((run_dir / "run.json").read_text())
    assert state["stages"]["task1_moving_grasp"]["status"] == "complete"
    assert state["stages"]["task2_weighing"]["status"] == "running"
    stage1 = run_dir / "stage1_task1_moving_grasp" / "checkpoints"
    assert ckpt.is_complete(stage1 / "last") and ckpt.is_complete(stage1 / "best")
    SmolVLAPolicyWrapper.from_pretrained(stage1 / "last" / "pretrained_model")
    assert not (run_dir / "stage2_task2_weighing" / "checkpoints").exists() or not any(
        (run_dir / "stage2_task2_weighing" / "checkpoints").iterdir())


def test_batch_larger_than_an_epoch_is_refused(tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data, "dataloader.batch_size=4096"))
    with pytest.raises(KuavoError, match=r"dataloader\.batch_size: 4096 x 1 process\(es\) is more than the \d+ samples "
                                         r"of an epoch of stage task1_moving_grasp"):
        Pipeline(cfg).run()
    assert not run_dir.exists()



def test_keeping_the_last_small_batch_is_refused_with_several_processes(tmp_path, demo_base, demo_data, monkeypatch):
    """With several processes accelerate pads each one's last batch with samples from the epoch's
    start: more steps than each stage plans (and resumes by), and samples seen twice. Refused by
    the checks every process makes before they meet (WORLD_SIZE is what the launcher sets; the
    launch itself is not made here)."""
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data, "dataloader.drop_last=false"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KuavoError, match=r"dataloader\.drop_last: false needs one process \(2 launched\): set it true"):
        Pipeline(cfg).prepare()
    assert not run_dir.exists()

def test_diverging_stage_stops_before_any_update(tmp_path, demo_base, demo_data):
    """An absurd learning rate blows the weights up: the stage stops at the first non-finite
    loss or gradient, naming the step and the batch's frames; nothing NaN is ever saved."""
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data, "~stages.task3_placement", "~stages.task4_sorting",
                                         "stages.task1_moving_grasp.max_epoch=30", "stages.task1_moving_grasp.optimizer_lr=1e30",
                                         "stages.task1_moving_grasp.scheduler_warmup_steps=0", "evaluation.after_each_stage=false"))
    with pytest.raises(NonFiniteLossError) as err:
        Pipeline(cfg).run()
    msg = str(err.value)
    assert "\n" not in msg and "stage task1_moving_grasp epoch" in msg and "task1_moving_grasp ep " in msg
    state = json.loads((run_dir / "run.json").read_text())
    assert state["stages"]["task1_moving_grasp"]["status"] == "running"
    last = run_dir / "stage1_task1_moving_grasp" / "checkpoints" / "last" / "pretrained_model"
    if last.is_dir():  # an earlier epoch's checkpoint is intact and finite
        SmolVLAPolicyWrapper.from_pretrained(last)


@pytest.fixture(scope="module")
def checkpoint(full_run, tmp_path_factory):
    _, run_dir = full_run
    return final_pretrained(run_dir, "task4_sorting")


def _damaged(checkpoint, tmp_path, damage):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return copy


def _truncate(name):
    def damage(d):
        f = next(d.glob(name))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return damage


DAMAGES = {
    "weights truncated": (_truncate("model.safetensors"), "cannot load policy weights"),
    "weights empty": (lambda d: (d / "model.safetensors").write_bytes(b""), "cannot load policy weights"),
    "config.json corrupt": (lambda d: (d / "config.json").write_text('{"type": "smolvla", '), "config.json"),
    "stats truncated": (_truncate("policy_preprocessor_step_*normalizer*.safetensors"), "pre/post-processors"),
    "tasks file corrupt": (lambda d: (d / "kuavo_tasks.json").write_text("{"), "kuavo_tasks.json is corrupt"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_checkpoint_is_one_line(checkpoint, tmp_path, case):
    damage, expected = DAMAGES[case]
    with pytest.raises(PolicyLoadError) as err:
        SmolVLAPolicyWrapper.from_pretrained(_damaged(checkpoint, tmp_path, damage))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_nan_weights_are_refused(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    def poison(d):
        w = load_file(d / "model.safetensors")
        name = next(k for k, v in w.items() if v.is_floating_point() and "action_out_proj" in k)
        w[name][0] = float("nan")
        save_file(w, d / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(PolicyLoadError, match="non-finite weights"):
        SmolVLAPolicyWrapper.from_pretrained(_damaged(checkpoint, tmp_path, poison))


def test_damaged_run_in_the_infer_command(python_exe, full_run, tmp_path):
    _, run_dir = full_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    weights = final_pretrained(copy, "task4_sorting") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = _one_line(_cli(python_exe, "infer", "--run", str(copy), "--episodes", "1"))
    assert "cannot load policy weights" in line


@pytest.mark.parametrize("damage, says", [
    ("truncated run.json", "run.json is damaged (Unterminated string"),
    ("run.json without stages", "is not a kuavo_train run state (no \"stages\" object)"),
    ("statistics missing", "normalization_stats.json is missing: a run's normalization statistics"),
    ("statistics damaged", "normalization_stats.json is damaged (JSONDecodeError"),
])
def test_damaged_run_files_are_one_line_in_evaluate_infer_and_train(python_exe, full_run, demo_base, demo_data,
                                                                     tmp_path, damage, says):
    """A run folder whose run.json or statistics were damaged (by hand, or another tool's copy):
    `evaluate --run`, `infer --run` and a resumed `train` each stop in one line, and change nothing."""
    _, run_dir = full_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    state, stats = copy / "run.json", copy / "normalization_stats.json"
    if damage == "truncated run.json":
        state.write_text(state.read_text()[:300])
    elif damage == "run.json without stages":
        state.write_text(json.dumps({"config": json.loads(state.read_text())["config"]}))
    elif damage == "statistics missing":
        stats.unlink()
    else:
        stats.write_text(stats.read_text()[:50])
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    commands = [("evaluate", "--run", str(copy))]
    if "run.json" in damage:  # infer reads the statistics saved with the checkpoint, not the run's
        commands.append(("infer", "--run", str(copy), "--episodes", "1"))
    if damage != "statistics missing":  # train computes a missing statistics file again
        commands.append(("train", *tiny_overrides(copy, demo_base, demo_data, *FULL_RUN_EXTRA)))
    for command in commands:
        line = _one_line(_cli(python_exe, *command))
        assert says in line, (command, line)
    if "run.json" in damage:  # the wrapper given the run folder
        with pytest.raises(KuavoError, match=says.split(" (")[0]):
            SmolVLAPolicyWrapper.from_pretrained(copy)
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_a_run_whose_final_checkpoint_is_gone_is_one_line_in_the_wrapper(full_run, tmp_path):
    _, run_dir = full_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(final_pretrained(copy, "task4_sorting").parent)
    with pytest.raises(PolicyLoadError, match=r"its final checkpoint .* is missing \(deleted or moved\)") as err:
        SmolVLAPolicyWrapper.from_pretrained(copy)
    assert "hub id" not in str(err.value)


def test_wrapper_never_asks_a_hub_for_a_bundled_checkpoint(python_exe, checkpoint, tmp_path):
    """The README snippet, run as written without HF_HUB_OFFLINE on an empty model cache: the tiny
    VLM is bundled, so no hub is ever asked."""
    code = ("from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper; "
            f"p = SmolVLAPolicyWrapper.from_pretrained({str(checkpoint)!r}); print(len(p.instructions))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with FakeHub() as hub:
        env.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", HF_ENDPOINT=hub.url)
        r = subprocess.run([python_exe, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "4"
    assert hub.connections == 0, f"{hub.connections} connection(s) to the hub"


# Runs `replace_dir` (the checkpoint swap) in a process that SIGKILLs itself just before its
# k-th file-system step: 1 = move the old `last` aside, 2 = rename the new one in, 3 = delete the old.
_SWAP_KILLER = """
import os, shutil, signal, sys
from pathlib import Path
from kuavo_train.files import replace_dir

kill_before, calls = int(sys.argv[1]), [0]

def step(fn):
    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return run

os.replace, shutil.rmtree = step(os.replace), step(shutil.rmtree)
replace_dir(Path(sys.argv[2]), Path(sys.argv[3]))
"""


@pytest.mark.parametrize("kill_before", [1, 2, 3, 4])
def test_a_kill_at_any_point_of_a_checkpoint_swap_keeps_a_loadable_last(full_run, tmp_path, python_exe, kill_before):
    """A process killed anywhere inside the swap of `last` (4 = not killed) leaves, after the
    restart's clean-up, a whole `last`: the old one before the new one is renamed in, the new one after."""
    from kuavo_train.training import checkpoint as ckpt

    _, run_dir = full_run
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "stage4_task4_sorting" / "checkpoints" / "last", ckpts / "last")
    new = ckpts / ".tmp-last-new"
    shutil.copytree(run_dir / "stage3_task3_placement" / "checkpoints" / "last", new)
    old_stage, new_stage = ckpt.read_meta(ckpts / "last")["stage"], ckpt.read_meta(new)["stage"]
    r = subprocess.run([python_exe, "-c", _SWAP_KILLER, str(kill_before), str(new), str(ckpts / "last")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == (0 if kill_before == 4 else -9), r.stderr[-2000:]
    if kill_before == 2:  # the moment the issue named: the old `last` aside, the new one not yet in
        assert not (ckpts / "last").exists()
    ckpt.clean_temporaries(ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"]
    assert ckpt.is_complete(ckpts / "last")
    assert ckpt.read_meta(ckpts / "last")["stage"] == (old_stage if kill_before <= 2 else new_stage)
    SmolVLAPolicyWrapper.from_pretrained(ckpts / "last")


def test_register_vlm_of_a_checkpoint_without_its_vlm_is_one_line(python_exe, checkpoint, tmp_path):
    """A checkpoint that names the embedded VLM but does not bundle it (stock lerobot-train writes
    such), on a machine whose model cache lacks it: one line saying where the VLM can come from."""
    copy = tmp_path / "stock_written" / "pretrained_model"
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("vlm"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    line = _one_line(_cli(python_exe, "register-vlm", str(copy.parent), env={"HF_HOME": str(tmp_path / "hf")}))
    assert "is neither in this machine's Hugging Face cache nor bundled in" in line and "register-vlm" in line, line
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before



def test_register_vlm_of_a_hub_vlm_claims_nothing_it_did_not_do(python_exe, checkpoint, tmp_path):
    """A checkpoint of a real SmolVLA names a hub VLM, which no checkpoint bundles: register-vlm
    says there is nothing to register and whether this machine's cache has it, not that stock
    LeRobot can now load it."""
    copy = tmp_path / "real_vlm" / "pretrained_model"
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("vlm"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"}))
    r = _cli(python_exe, "register-vlm", str(copy.parent), env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("VLM HuggingFaceTB/SmolVLM2-500M-Video-Instruct is a hub model, not bundled (nothing to register); not in "
            "this machine's model cache: stock LeRobot downloads it") in r.stdout, r.stdout
    assert "can load it now" not in r.stdout

def test_checkpoints_and_the_base_follow_the_users_umask(full_run, demo_base):
    """Staged folders come from mkdtemp (0700) and safetensors writes 0600: published checkpoints,
    their `best` copies and the base get the modes a plain mkdir / open gives under the umask, so
    that another user (a robot runtime, a container) can load them."""
    mask = os.umask(0)
    os.umask(mask)
    _, run_dir = full_run
    folders = [p for p in run_dir.rglob("checkpoints/*") if p.is_dir()] + [demo_base.parent]
    assert len(folders) > 4
    for folder in folders:
        for p in [folder, *folder.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777), oct(want))
