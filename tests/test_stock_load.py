"""Stock LeRobot alone loads a checkpoint this project writes, on a machine whose model cache is empty.

One clean subprocess imports only lerobot (with torch, numpy, safetensors), gets a fresh
empty HF_HOME and HF_HUB_OFFLINE=1, and loads a copy of the shared run's final checkpoint:
- first without `kuavo-train register-vlm`: it must fail (the documented limitation: stock
  SmolVLA resolves the tiny VLM only by the `vlm_model_name` of config.json, in a model cache);
- then after `kuavo-train register-vlm <checkpoint>` (its own process): it must load every
  tensor of model.safetensors, with no missing or unexpected key and every value bit-equal
  (stock `from_pretrained` is `strict=False` and would only log key problems);
- and its processors must load the run's statistics and run on one observation.
The same subprocess computes actions that our wrapper must reproduce exactly, so the wrapper
is checked against a load that shares none of our code.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TASK_NAMES, final_pretrained
from safetensors.torch import load_file

# Kept free of kuavo_train imports on purpose: the child must show stock LeRobot is enough.
STOCK_CHILD = r"""
import json, subprocess, sys
import numpy as np
import torch
from safetensors.torch import load_file
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
res = {}
if a["register_cmd"]:
    try:
        SmolVLAPolicy.from_pretrained(a["path"])
        res["before_register"] = None
    except Exception as exc:
        # The message does not name the model it looked for; the frames of the failing call do.
        looked_up, tb = set(), exc.__traceback__
        while tb is not None:
            for name in ("path_or_repo_id", "pretrained_model_name_or_path"):
                if isinstance(tb.tb_frame.f_locals.get(name), str):
                    looked_up.add(tb.tb_frame.f_locals[name])
            tb = tb.tb_next
        res["before_register"] = [f"{type(exc).__name__}: {exc}", sorted(looked_up)]
    r = subprocess.run(a["register_cmd"], capture_output=True, text=True)
    res["register"] = [r.returncode, r.stdout + r.stderr]
policy = SmolVLAPolicy.from_pretrained(a["path"])
saved, loaded = load_file(a["path"] + "/model.safetensors"), policy.state_dict()
res["class"] = type(policy).__name__
res["missing"] = sorted(set(loaded) - set(saved))
res["unexpected"] = sorted(set(saved) - set(loaded))
res["differ"] = sorted(k for k in set(saved) & set(loaded)
                       if saved[k].dtype != loaded[k].dtype or not torch.equal(saved[k], loaded[k].cpu()))
res["tensors"] = len(saved)
pre, post = make_pre_post_processors(policy.config, pretrained_path=a["path"])
raw = dict(np.load(a["obs"]))
batch = {k: torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255 if "images" in k else torch.from_numpy(v)
         for k, v in raw.items()}
batch["task"] = a["tasks"]
res["normalized_state"] = pre(dict(batch))["observation.state"]
torch.manual_seed(a["seed"])
policy.reset()
res["actions"] = torch.stack([post(policy.select_action(pre(dict(batch)))) for _ in range(a["calls"])])
res["foreign_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("kuavo_train", "lerobot_env_kuavo"))
torch.save(res, a["out"])
"""

CAMS = ("head_cam_h", "wrist_cam_l", "wrist_cam_r")
SEED, CALLS = 5, 3


def observation(batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    obs = {f"observation.images.{c}": rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8) for c in CAMS}
    obs["observation.state"] = rng.normal(size=(batch, 16)).astype(np.float32)
    return obs


def run_stock_child(pretrained, work, *, tasks, obs, hf_home=None, register=False) -> dict:
    """Run STOCK_CHILD on `pretrained`; returns what it measured."""
    np.savez(work / "obs.npz", **obs)
    out = work / "stock.pt"
    args = {"path": str(pretrained), "threads": torch.get_num_threads(), "out": str(out), "obs": str(work / "obs.npz"),
            "tasks": list(tasks), "seed": SEED, "calls": CALLS,
            "register_cmd": [sys.executable, "-m", "kuavo_train.cli.main", "register-vlm", str(pretrained)] if register else None}
    # No cache location may leak in from the caller: HF_HOME alone decides where the model cache is.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env["HF_HUB_OFFLINE"] = "1"
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    r = subprocess.run([sys.executable, "-c", STOCK_CHILD, json.dumps(args)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def checkpoint_copy(full_run, tmp_path_factory):
    """The shared run's final checkpoint, copied away from the run (nothing may point back into it)."""
    _, run_dir = full_run
    dst = tmp_path_factory.mktemp("stock_load") / "copied" / "pretrained_model"
    shutil.copytree(final_pretrained(run_dir, TASK_NAMES[-1]), dst)
    return run_dir, dst


@pytest.fixture(scope="module")
def stock(checkpoint_copy, tmp_path_factory):
    _, path = checkpoint_copy
    work = tmp_path_factory.mktemp("stock_child")
    hf_home = work / "empty_hf_home"
    hf_home.mkdir()
    instructions = [t["instruction"] for t in json.loads((path / "kuavo_tasks.json").read_text())["tasks"]]
    tasks, obs = [instructions[0], instructions[3]], observation(2, seed=11)
    res = run_stock_child(path, work, tasks=tasks, obs=obs, hf_home=hf_home, register=True)
    return {"res": res, "tasks": tasks, "obs": obs, "hf_home": hf_home}


def test_without_register_vlm_stock_cannot_resolve_the_tiny_vlm(checkpoint_copy, stock):
    _, path = checkpoint_copy
    failure = stock["res"]["before_register"]
    assert failure is not None, "stock LeRobot loaded the tiny base's checkpoint with an empty model cache"
    vlm = json.loads((path / "config.json").read_text())["vlm_model_name"]
    assert vlm.startswith("kuavo-train/tiny-smolvlm-")
    # It fails where the README says: looking the VLM up by name in the (empty) model cache.
    message, looked_up = failure
    assert message.startswith("OSError") and "cached files" in message, message
    assert vlm in looked_up, looked_up


def test_after_register_vlm_stock_loads_every_weight_exactly(checkpoint_copy, stock):
    _, path = checkpoint_copy
    res = stock["res"]
    rc, out = res["register"]
    assert rc == 0 and "resolvable on this machine" in out, out
    assert list((stock["hf_home"] / "hub").glob("models--kuavo-train--tiny-smolvlm-*/snapshots/*/config.json"))
    assert res["class"] == "SmolVLAPolicy" and res["foreign_modules"] == []
    assert (res["missing"], res["unexpected"], res["differ"]) == ([], [], [])
    assert res["tensors"] == len(load_file(str(path / "model.safetensors"))) > 100


def test_stock_processors_carry_the_runs_statistics_and_run(checkpoint_copy, stock):
    run_dir, _ = checkpoint_copy
    stats = json.loads((run_dir / "normalization_stats.json").read_text())["observation.state"]
    state = torch.from_numpy(stock["obs"]["observation.state"])
    expected = (state - torch.tensor(stats["mean"])) / (torch.tensor(stats["std"]) + 1e-8)
    torch.testing.assert_close(stock["res"]["normalized_state"], expected, rtol=1e-5, atol=1e-5)
    actions = stock["res"]["actions"]
    assert actions.shape == (CALLS, 2, 16) and bool(actions.isfinite().all())


def test_wrapper_equals_stock_lerobot_loaded_in_a_clean_process(checkpoint_copy, stock):
    """Same checkpoint, inputs and noise seed: our wrapper's actions are bit-equal to stock's."""
    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper

    _, path = checkpoint_copy
    w = SmolVLAPolicyWrapper.from_pretrained(path)
    torch.manual_seed(SEED)
    ours = torch.stack([w.select_action({**stock["obs"], "task": stock["tasks"]}) for _ in range(CALLS)])
    assert torch.equal(ours, stock["res"]["actions"])
