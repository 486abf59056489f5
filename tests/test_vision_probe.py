"""`benchmarks/vision_probe.py`: the features it probes are the ones the action expert reads, and
the script runs end to end on a base."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import torch

from conftest import REPO

spec = importlib.util.spec_from_file_location("vision_probe", REPO / "benchmarks" / "vision_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_layer_0_keys_and_values_are_those_of_smolvlas_own_prefix(demo_base):
    """Layer 0's keys and values of the head camera's image tokens, as the probe computes them, equal
    those LeRobot's SmolVLA computes from its own prefix (its image preparation, embedding and
    scaling), which the action expert attends to."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from kuavo_train.data.demo_world.world import KuavoDemoWorld

    policy = SmolVLAPolicy.from_pretrained(demo_base).eval()
    obs = [KuavoDemoWorld("task4_sorting", 64).reset(s) for s in (1, 2, 3)]
    head = np.stack([o["observation.images.head_cam_h"] for o in obs])
    ours = probe.features(policy, head)["layer 0 K,V"]

    batch = {k: torch.from_numpy(np.stack([o[k] for o in obs])).permute(0, 3, 1, 2).float() / 255
             for k in policy.config.image_features}
    images, masks = policy.prepare_images(batch)
    tokens = torch.zeros(3, 4, dtype=torch.long)
    with torch.no_grad():
        state = torch.zeros(3, policy.config.max_state_dim)
        prefix, _, _ = policy.model.embed_prefix(images, masks, tokens, torch.ones_like(tokens, dtype=torch.bool), state)
        layer = policy.model.vlm_with_expert.get_vlm_model().text_model.layers[0]
        x = layer.input_layernorm(prefix[:, : ours.shape[1]])  # the head camera's tokens come first
        theirs = torch.cat([layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)], -1)
    assert ours.shape == theirs.shape and ours.shape[1] == 16
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_script_prints_every_level_and_task(demo_base):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vision_probe.py"), str(demo_base),
                        "--scenes", "10", "--test-scenes", "4", "--steps", "5"],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    levels = [ln for ln in lines if ln.startswith("  ")]
    assert [ln.split("  ")[1].strip() for ln in levels] == ["image tokens"] + [f"layer {i} K,V" for i in range(4)]
    for ln in levels:
        assert all(f"task{k} " in ln for k in range(1, 5)) and ln.count("(") == 8
