"""SmolVLA policies and their processors: build, configure for a stage, load, save.

One code path for the real `lerobot/smolvla_base` and the embedded tiny base:
the pretrained folder's own config.json is read with LeRobot, our settings are
applied on top, and `SmolVLAPolicy.from_pretrained` loads the weights.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from kuavo_train.errors import KuavoError, first_line
from kuavo_train.files import replace_dir, staging_dir
from kuavo_train.logs import lerobot_prints_silenced
from kuavo_train.policy import adapters, vlm_cache

log = logging.getLogger(__name__)

PRETRAINED_DIR = "pretrained_model"


class PolicyLoadError(KuavoError):
    """A pretrained model or checkpoint that cannot be loaded; `str()` is one line."""


HUB_HINT = ("if it is a hub id: no network or hub unreachable (set HF_ENDPOINT to a mirror, or HF_HUB_OFFLINE=1 "
            "with the model in the local cache)")




def policy_features(features: dict, camera_keys: list[str], state_key: str, action_key: str):
    """LeRobot PolicyFeatures for the keys SmolVLA consumes (state, cameras -> action)."""
    from lerobot.utils.feature_utils import dataset_to_policy_features

    all_feats = dataset_to_policy_features({k: features[k] for k in [state_key, *camera_keys, action_key]})
    inputs = {k: all_feats[k] for k in [state_key, *camera_keys]}
    outputs = {action_key: all_feats[action_key]}
    return inputs, outputs


def read_pretrained_config(path: str | Path):
    """LeRobot's own config reader; a missing local folder gets a clear message."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig  # noqa: F401  (registers the "smolvla" type)

    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith(".") or len(p.parts) != 2
    if looks_local and not p.is_dir():
        raise PolicyLoadError(
            f"pretrained model {str(path)!r} does not exist (expected a folder with config.json and "
            "model.safetensors, or a hub id like lerobot/smolvla_base)"
        )
    try:
        cfg = PreTrainedConfig.from_pretrained(str(path))
    except (OSError, FileNotFoundError) as exc:
        # owner/name is a hub id and a relative folder alike: say both
        hint = "" if p.is_dir() else f" ({HUB_HINT}; if it is a folder: there is no {p.resolve()})"
        raise PolicyLoadError(f"cannot read the policy config of {str(path)!r}: {first_line(exc)}{hint}") from None
    except Exception as exc:  # a corrupt config.json: JSON or field errors from the config parser
        raise PolicyLoadError(f"cannot read the policy config {str(Path(path) / 'config.json')!r}: {first_line(exc)} "
                              "(the file is corrupt: copy the checkpoint again)") from None
    if cfg.type != "smolvla":
        raise PolicyLoadError(f"{str(path)!r} holds a {cfg.type!r} policy, not smolvla")
    vlm_cache.ensure_available(cfg.vlm_model_name, path if p.is_dir() else None)
    return cfg


def stage_policy_config(base_cfg, settings, input_features, output_features, *, lr: float, optimizer, scheduler, stage, device: str):
    """The pretrained config with this project's settings (spec section 2) applied."""
    vlm = settings.vlm_model_name or base_cfg.vlm_model_name
    updates = dict(
        input_features=input_features,
        output_features=output_features,
        vlm_model_name=vlm,
        freeze_vision_encoder=settings.freeze_vision_encoder,
        train_expert_only=settings.train_expert_only,
        train_state_proj=settings.train_state_proj,
        max_state_dim=settings.max_state_dim,
        max_action_dim=settings.max_action_dim,
        chunk_size=settings.chunk_size,
        n_action_steps=settings.n_action_steps,
        num_steps=settings.num_steps,
        tokenizer_max_length=settings.tokenizer_max_length,
        optimizer_lr=lr,
        optimizer_betas=tuple(optimizer.betas),
        optimizer_eps=optimizer.eps,
        optimizer_weight_decay=optimizer.weight_decay,
        optimizer_grad_clip_norm=optimizer.grad_clip_norm,
        scheduler_warmup_steps=stage.scheduler_warmup_steps,
        scheduler_decay_steps=stage.scheduler_decay_steps,
        scheduler_decay_lr=scheduler.decay_lr,
        device=device,
        push_to_hub=False,
    )
    if settings.resize_imgs_with_padding is not None:
        updates["resize_imgs_with_padding"] = tuple(settings.resize_imgs_with_padding)
    return dataclasses.replace(base_cfg, **updates)


def resolve_device(setting: str) -> str:
    """`policy.device`: auto = CUDA when present."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def process_device(setting: str) -> str:
    """`resolve_device`, and under `accelerate launch` on GPUs this process's own GPU; the CPU on a
    machine without CUDA (where the Accelerator trains too)."""
    import torch

    import kuavo_train.processes as processes

    device = resolve_device(setting)
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{processes.local_index()}" if device == "cuda" and processes.launched() else device


def run_policy_config(cfg, task, space, source, *, lr: float, stage, device: str):
    """The policy config of a run's stage: `source`'s config, the run's settings, the features of the
    run's union state/action space and `task`'s cameras (cfg: RunConfig, task: TaskData, space: FeatureSpace)."""
    from kuavo_train.data.features import union_features
    from kuavo_train.data.task_data import ACTION_KEY, STATE_KEY

    feats = union_features(space, task, task.camera_map)
    inputs, outputs = policy_features(feats, list(task.camera_map), STATE_KEY, ACTION_KEY)
    return stage_policy_config(read_pretrained_config(source), cfg.policy, inputs, outputs, lr=lr,
                               optimizer=cfg.optimizer, scheduler=cfg.scheduler, stage=stage, device=device)


def load_policy(pretrained_path: str | Path, cfg):
    """`SmolVLAPolicy.from_pretrained` with our config; weights must match the architecture.

    The class is stock SmolVLA with a per-task action-dim mask in the training loss
    (kuavo_train/policy/masked.py); everything it saves is stock."""
    from kuavo_train.policy.masked import MaskedSmolVLAPolicy as SmolVLAPolicy

    vlm_cache.ensure_available(cfg.vlm_model_name, pretrained_path if Path(pretrained_path).is_dir() else None)
    try:
        with lerobot_prints_silenced():
            policy = SmolVLAPolicy.from_pretrained(str(pretrained_path), config=cfg)
    except Exception as exc:  # OSError, RuntimeError, safetensors' SafetensorError on a truncated file
        raise PolicyLoadError(f"cannot load policy weights from {str(pretrained_path)!r}: {first_line(exc)}") from None
    try:
        if Path(pretrained_path).is_dir():
            adapters.load(policy, pretrained_path)
    except Exception as exc:
        raise PolicyLoadError(f"cannot load the task adapters of {str(pretrained_path)!r}: {first_line(exc)}") from None
    bad = [name for name, t in policy.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise PolicyLoadError(f"{str(pretrained_path)!r} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): "
                              "the training that wrote it diverged; use an earlier checkpoint")
    return policy


def save_policy(policy, pretrained_dir: Path) -> None:
    """`policy.save_pretrained`, with per-task adapters (if any) beside the base in PEFT's layout."""
    if adapters.names(policy):
        policy.save_pretrained(pretrained_dir, state_dict=adapters.base_state_dict(policy))
        adapters.save(policy, pretrained_dir)
    else:
        policy.save_pretrained(pretrained_dir)


def make_processors(cfg, *, stats=None, pretrained_path: str | Path | None = None, device: str | None = None):
    """New processors carrying `stats`, or the ones saved with a checkpoint (optionally moved to `device`)."""
    from lerobot.policies.factory import make_pre_post_processors

    if pretrained_path is not None:
        overrides = {"device_processor": {"device": device}} if device else None
        try:
            pre, post = make_pre_post_processors(cfg, pretrained_path=str(pretrained_path), preprocessor_overrides=overrides)
        except Exception as exc:  # truncated or missing processor files
            raise PolicyLoadError(f"cannot load the pre/post-processors (normalization statistics) of "
                                  f"{str(pretrained_path)!r}: {first_line(exc)}") from None
        for name, stats in processor_stats(pre).items():
            for stat, value in stats.items():
                import torch

                if not bool(torch.as_tensor(value).isfinite().all()):
                    raise PolicyLoadError(f"{str(pretrained_path)!r}: the normalization statistics of {name} ({stat}) "
                                          "are not finite: the data they came from holds NaN or inf")
        return _remember_tokens(pre), post
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    return _remember_tokens(pre), post


class _TokenMemo:
    """LeRobot's tokenizer step tokenizes the batch's instructions at every call: in a closed-loop
    episode or on the robot that is the same instruction at every control step (8% of a forgetting-
    matrix cell's time). This keeps the tokens of the last few distinct batches of texts; each
    call gets its own copies, equal to what the tokenizer returns."""

    SIZE = 16

    def __init__(self, tokenizer):
        self.tokenizer, self.memo = tokenizer, {}

    def __call__(self, text, **kwargs):
        key = (text if isinstance(text, str) else tuple(text), tuple(sorted(kwargs.items())))
        out = self.memo.get(key)
        if out is None:
            out = dict(self.tokenizer(text, **kwargs))
            if len(self.memo) >= self.SIZE:  # training batches mix their texts: they rarely repeat
                self.memo.pop(next(iter(self.memo)))
            self.memo[key] = out
        return {k: v.clone() if hasattr(v, "clone") else v for k, v in out.items()}

    def __getattr__(self, name):  # everything else is the tokenizer's
        return getattr(self.tokenizer, name)


def _remember_tokens(preprocessor):
    for step in getattr(preprocessor, "steps", []):
        if getattr(step, "input_tokenizer", None) is not None:  # each call builds new steps: none is wrapped yet
            step.input_tokenizer = _TokenMemo(step.input_tokenizer)
    return preprocessor


def processor_stats(preprocessor) -> dict:
    """The normalization statistics a preprocessor carries (its normalizer step's), by feature."""
    for step in getattr(preprocessor, "steps", []):
        stats = getattr(step, "stats", None)
        if stats:
            return stats
    return {}


def save_pretrained(out_dir: str | Path, policy, preprocessor=None, postprocessor=None) -> Path:
    """LeRobot's `pretrained_model/` layout, written to a temp folder and renamed into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out_dir.parent, out_dir.name)
    policy.save_pretrained(tmp)
    if preprocessor is not None:
        preprocessor.save_pretrained(tmp)
    if postprocessor is not None:
        postprocessor.save_pretrained(tmp)
    vlm_cache.bundle(policy.config.vlm_model_name, tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def count_parameters(policy) -> tuple[int, int]:
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return trainable, total
