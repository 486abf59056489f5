"""The embedded base: real SmolVLA classes, LeRobot layout, self-contained after a move."""

import json
import os
import shutil
import subprocess
import sys

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
    r = subprocess.run([sys.executable, "-m", "kuavo_train.cli.main", "build-base", "--out", str(tmp_path / "base")],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "Retrying" not in r.stderr + r.stdout and (tmp_path / "base" / "pretrained_model" / "model.safetensors").is_file()
