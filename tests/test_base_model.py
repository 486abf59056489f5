"""The embedded base: real SmolVLA classes, LeRobot layout, self-contained after a move."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

from conftest import REPO

# Stock loading is strict=False (it only logs key problems): compare with the file ourselves.
STOCK_LOAD = """
import sys, torch
from safetensors.torch import load_file
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
p = SmolVLAPolicy.from_pretrained(sys.argv[1])
saved, loaded = load_file(sys.argv[1] + "/model.safetensors"), p.state_dict()
print("keys", "equal" if saved.keys() == loaded.keys() else sorted(saved.keys() ^ loaded.keys())[:5])
print("values", "equal" if all(torch.equal(saved[k], loaded[k]) for k in saved.keys() & loaded.keys()) else "differ")
print("params", sum(x.numel() for x in p.parameters()))
"""


def test_layout_and_vocabulary(demo_base):
    cfg = json.loads((demo_base / "config.json").read_text())
    assert cfg["type"] == "smolvla" and (demo_base / "model.safetensors").is_file()
    assert (demo_base / "vlm" / "config.json").is_file() and (demo_base / "vlm" / "tokenizer.json").is_file()
    vocab = json.loads((demo_base / "vlm" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"conveyor", "weigh", "bottle", "rack"} <= {w.lstrip("Ġ") for w in vocab}


def test_stock_lerobot_loads_a_moved_copy(demo_base, tmp_path):
    moved = tmp_path / "elsewhere" / "pretrained_model"
    shutil.copytree(demo_base, moved)
    r = subprocess.run([sys.executable, "-c", STOCK_LOAD, str(moved)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-1500:]
    assert "keys equal" in r.stdout and "values equal" in r.stdout, r.stdout
    assert "params 17" in r.stdout  # 1.7 M parameters


def test_a_fresh_machine_loads_it_through_our_factory(demo_base, tmp_path):
    """With an empty model cache, the bundled VLM files are enough (no hub)."""
    moved = tmp_path / "copy" / "pretrained_model"
    shutil.copytree(demo_base, moved)
    code = ("import sys; from kuavo_train.policy import factory; c = factory.read_pretrained_config(sys.argv[1]); "
            "p = factory.load_policy(sys.argv[1], c); print('ok', c.vlm_model_name)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    r = subprocess.run([sys.executable, "-c", code, str(moved)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "ok kuavo-train/tiny-smolvlm-" in r.stdout


def test_embedded_default_goes_offline_by_itself(tmp_path):
    """Without HF_HUB_OFFLINE in the environment the demo commands must not wait on a hub."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    r = subprocess.run([sys.executable, "-m", "kuavo_train.cli.main", "build-base", "--out", str(tmp_path / "base"),
                        "demo.pretrain_vision_steps=5", "demo.pretrain_skill_steps=3", "demo.pretrain_episodes_per_skill=1",
                        "demo.pretrain_skill_batch_size=4"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-1500:]
    info = json.loads((tmp_path / "base" / "base_info.json").read_text())
    pre = info["pretraining"]
    assert pre["vision"]["steps"] == 5 and pre["skills_training"]["steps"] == 3 and len(pre["skills"]) == 14
    assert pre["skills_training"]["batch_size"] == 4
    assert "Retrying" not in r.stderr + r.stdout and (tmp_path / "base" / "pretrained_model" / "model.safetensors").is_file()
    # output to a file or pipe: the phases' log lines, no progress bar
    assert "skill pretraining step 3/3" in r.stdout and "vision pretraining step 5/5" in r.stdout
    assert "\r" not in r.stderr + r.stdout and "%|" not in r.stderr + r.stdout, r.stderr[-800:]


def test_pretraining_draws_a_progress_bar_in_a_terminal(tmp_path):
    """In a terminal each pretraining phase has a progress bar (besides its log lines); with
    logging.progress_bars=false it has none."""
    import fcntl
    import pty
    import struct
    import termios

    def in_terminal(*overrides):
        master, slave = pty.openpty()
        # a terminal of 30 x 120 (a new pty is 0 x 0 wide, where tqdm draws nothing)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        p = subprocess.Popen([sys.executable, "-m", "kuavo_train.cli.main", "build-base", "--overwrite", "--out",
                              str(tmp_path / "base"), "demo.pretrain_vision_steps=20", "demo.pretrain_skill_steps=20",
                              "demo.pretrain_episodes_per_skill=1", "demo.pretrain_skill_batch_size=2",
                              "demo.pretrain_vision_scenes=0", *overrides],
                             cwd=REPO, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        os.close(slave)
        out = b""
        while True:  # read while it runs: a full terminal buffer would block the child
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        assert p.wait(timeout=120) == 0, out[-1500:]
        return out.decode(errors="replace")

    shown = in_terminal()
    for phase in ("vision pretraining", "skill pretraining"):
        assert re.search(phase + r": +\d+%\|.*\| +\d+/20 \[", shown), shown[-1500:]
    assert "loss=" in shown
    hidden = in_terminal("logging.progress_bars=false")
    assert "skill pretraining step 20/20" in hidden and "%|" not in hidden, hidden[-1500:]


def test_pretraining_set_is_not_the_tasks_data():
    from kuavo_train.data.demo_world.pretraining import FAMILY_WORLD, SKILLS, skill_seeds, vision_scene_seeds
    from kuavo_train.data.demo_world.tasks import DEMO_TASKS
    from kuavo_train.data.demo_world.writer import scene_seeds

    task_scenes = {s for t in DEMO_TASKS for split in ("train", "val") for s in scene_seeds(t.name, 0, 500, split)}
    skill_scenes = {s for i in range(len(SKILLS)) for s in skill_seeds(i, 0, 500)}
    vision_scenes = {s for f in FAMILY_WORLD for s in vision_scene_seeds(f, 0, 5000)}
    assert not task_scenes & skill_scenes and not task_scenes & vision_scenes
    assert not {t.instruction for t in DEMO_TASKS} & {s.instruction for s in SKILLS}


def test_random_pose_frames_label_where_each_thing_is_drawn():
    """`scene_frames`' labels are the vision tower's targets: where a label says the object is in
    the head camera, the object's colour is drawn (within a pixel: the bottle's label and a hand's
    outline may be drawn over its middle)."""
    from kuavo_train.data.demo_world.pretraining import ENTITIES, scene_frames
    from kuavo_train.data.demo_world.render import COLORS

    size, n = 64, 40
    frames = scene_frames(3, n, size)
    assert frames["images"].shape == (3 * n, 3, size, size, 3) and frames["targets"].shape == (3 * n, 3, len(ENTITIES), 3)
    colours = [COLORS["object"]] * n + [COLORS["bottle"]] * n + [COLORS["workpiece"]] * n
    hits = 0
    for img, t, colour in zip(frames["images"][:, 0], frames["targets"][:, 0, ENTITIES.index("object")], colours):
        assert t[2] == 1.0  # the head camera sees the whole table
        px, py = (int((c + 1) / 2 * size) for c in t[:2])
        hits += bool((img[max(py - 1, 0) : py + 2, max(px - 1, 0) : px + 2] == colour).all(-1).any())
    assert hits >= 0.8 * len(colours), hits
    # random poses: the hands are spread over the table, not at home
    hands = frames["targets"][:, 0, ENTITIES.index("right_hand"), :2]
    assert hands.std(0).min() > 0.4
    assert not np.array_equal(scene_frames(4, 2, size)["images"], scene_frames(3, 2, size)["images"])


def test_pretraining_trains_what_each_phase_says_and_learns(tmp_path):
    import torch
    from safetensors.torch import load_file

    from kuavo_train.config.schema import DemoSettings
    from kuavo_train.data.demo_world.pretraining import SKILLS, pretraining_frames
    from kuavo_train.policy.base_model import build_base_model
    from kuavo_train.training.pretrain import demo_world_pretraining

    kw = dict(instructions=[s.instruction for s in SKILLS], image_size=32, chunk_size=4, n_action_steps=2, seed=0)
    plain = load_file(build_base_model(tmp_path / "plain", **kw) / "model.safetensors")

    def pretrained(name, vision, skills, scenes=0):
        path = build_base_model(tmp_path / name, pretrain=demo_world_pretraining(DemoSettings(
            pretrain_vision_steps=vision, pretrain_skill_steps=skills, pretrain_episodes_per_skill=1, image_size=32,
            seed=0, pretrain_vision_scenes=scenes)), **kw)
        info = json.loads((tmp_path / name / "base_info.json").read_text())["pretraining"]
        return load_file(path / "model.safetensors"), info

    vision, info = pretrained("vision", 120, 0, scenes=10)
    changed = {k for k in plain if not torch.equal(plain[k], vision[k])}
    assert changed and all("vision_model" in k or "connector" in k for k in changed), sorted(changed)[:5]
    assert any("vision_model" in k for k in changed) and any("connector" in k for k in changed)
    # better than the best constant guess (everything in the middle of the image)
    t = pretraining_frames(0, 1, 32)["targets"]
    assert info["vision"]["held_out_position_error"] < float(abs(t[..., :2][t[..., 2] > 0]).mean()) * 0.8, info
    assert info["frames"] == len(t)
    # every camera image of the skills' frames and of 10 random-pose frames per scene family
    assert info["vision_scene_frames"] == 30 and info["vision"]["images"] == 3 * (len(t) + 30)

    skills, info = pretrained("skills", 0, 60)
    changed = {k for k in plain if not torch.equal(plain[k], skills[k])}
    assert not any("vision_model" in k for k in changed)
    assert any("lm_expert" in k for k in changed) and any("text_model" in k for k in changed), sorted(changed)[:5]
    losses = info["skills_training"]
    assert 0 < losses["final_loss"] < 0.7 * losses["first_loss"], losses


def test_loading_a_policy_prints_nothing(demo_base, capsys):
    """LeRobot's SmolVLA prints a line or two per policy built; a demo run builds a dozen."""
    from kuavo_train.policy import factory

    factory.load_policy(demo_base, factory.read_pretrained_config(demo_base))
    assert capsys.readouterr().out == ""
