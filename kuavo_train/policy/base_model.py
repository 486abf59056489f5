"""The embedded "pretrained base": a tiny random-weight SmolVLA built offline.

It plays the role of `lerobot/smolvla_base` for the offline default: a folder
in LeRobot's `pretrained_model/` layout (config.json + model.safetensors) that
stage 1 loads through the same `SmolVLAPolicy.from_pretrained` call.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from kuavo_train.policy import vlm_cache
from kuavo_train.files import replace_dir, staging_dir
from kuavo_train.logs import lerobot_prints_silenced
from kuavo_train.policy.factory import PRETRAINED_DIR
from kuavo_train.policy.tiny_vlm import TinyVLMSpec, write_tiny_vlm


def build_base_model(
    out_dir: str | Path,
    *,
    instructions: list[str],
    state_dim: int = 16,
    action_dim: int = 16,
    camera_keys: tuple[str, ...] = ("observation.images.head_cam_h", "observation.images.wrist_cam_l", "observation.images.wrist_cam_r"),
    image_size: int = 64,
    chunk_size: int = 50,
    n_action_steps: int = 8,
    seed: int = 0,
    max_state_dim: int = 32,
    max_action_dim: int = 32,
    spec: TinyVLMSpec | None = None,
    overwrite: bool = False,
    pretrain: Callable[[object], dict] | None = None,
) -> Path:
    """Write `out_dir/vlm/` and `out_dir/pretrained_model/`; returns the latter.

    `pretrain(policy)` trains the freshly built policy in place before it is saved (its summary goes
    into base_info.json), so an interrupted pretraining leaves no base behind."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists already (pass overwrite to rebuild it)")
    if not instructions:
        raise ValueError("build_base_model needs at least one instruction for the tokenizer vocabulary")
    spec = spec or TinyVLMSpec(image_size=image_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out_dir.parent, out_dir.name)
    try:
        vlm_dir = write_tiny_vlm(tmp / "vlm", instructions, spec)
        repo_id = vlm_cache.register(vlm_dir)
        cfg = SmolVLAConfig(
            input_features={
                "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(state_dim,)),
                **{k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, image_size, image_size)) for k in camera_keys},
            },
            output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))},
            vlm_model_name=repo_id,
            load_vlm_weights=False,
            resize_imgs_with_padding=(spec.image_size, spec.image_size),
            chunk_size=chunk_size,
            n_action_steps=n_action_steps,
            # SmolVLA pads state/action up to these and silently cuts anything longer.
            max_state_dim=max(max_state_dim, state_dim),
            max_action_dim=max(max_action_dim, action_dim),
            device="cpu",
            push_to_hub=False,
        )
        torch.manual_seed(seed)
        with lerobot_prints_silenced():
            policy = SmolVLAPolicy(cfg)
        pretraining = pretrain(policy) if pretrain is not None else None
        pretrained = tmp / PRETRAINED_DIR
        policy.save_pretrained(pretrained)
        vlm_cache.bundle(repo_id, pretrained)
        n_params = sum(p.numel() for p in policy.parameters())
        (tmp / "base_info.json").write_text(
            json.dumps({"vlm_model_name": repo_id, "parameters": n_params, "seed": seed, "tiny_vlm": spec.__dict__,
                        "pretraining": pretraining}, indent=2) + "\n"
        )
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / PRETRAINED_DIR
