"""Per-task LoRA adapters carried by one policy (PEFT), chosen by the task being run.

A checkpoint of a policy with adapters is stock LeRobot's layout for the shared base,
plus PEFT's own layout for each adapter:

    pretrained_model/model.safetensors            the frozen base, stock SmolVLA keys
    pretrained_model/adapters/task<k>/            adapter_config.json, adapter_model.safetensors

so stock `SmolVLAPolicy.from_pretrained` loads the base strictly, and PEFT's
`PeftModel.from_pretrained(base, "…/adapters/task<k>")` loads task k's model.
`export_merged` writes task k's merged model as a plain stock checkpoint.

The adapters are injected into the policy object in place (PEFT's `inject_adapter_in_model`)
rather than wrapping it in a `PeftModel`, so that the training loop, accelerate and the
evaluation keep handling a plain SmolVLA policy. `for_task(policy, k)` runs task k with its
adapter (a task without one runs on the base); a policy without adapters ignores it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path

ADAPTERS_DIR = "adapters"
PEFT_PREFIX = "base_model.model."  # a PeftModel's prefix for the wrapped model's parameters
_NAME = re.compile(r"task(\d+)$")


def adapter_name(task_id: int) -> str:
    return f"task{task_id}"


def names(policy) -> list[str]:
    """The policy's adapters, in task order."""
    found = getattr(policy, "peft_config", None) or {}
    return sorted(found, key=lambda n: int(_NAME.match(n).group(1)) if _NAME.match(n) else 0)


def lora_layers(policy) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in policy.modules() if isinstance(m, LoraLayer)]


# Which layers get an adapter. smolvla_default: SmolVLA's own PEFT targets, as `lerobot-train
# --peft` chooses them (the action expert's q/v projections and the state/action/time
# projections). expert_all_linear: those plus every other linear layer of the action expert
# (k/o projections and the MLPs, which hold most of the expert's weights).
TARGETS = ("smolvla_default", "expert_all_linear")
_EXPERT_LINEAR = r"model\.vlm_with_expert\.lm_expert\..*\.(q|k|v|o|gate|up|down)_proj"


def target_modules(policy, targets: str = "smolvla_default") -> str:
    """PEFT's target_modules regex for one of TARGETS."""
    default = policy._get_default_peft_targets()["target_modules"]
    if targets == "smolvla_default":
        return default
    if targets == "expert_all_linear":
        return f"({_EXPERT_LINEAR}|{default})"
    raise ValueError(f"unknown LoRA targets {targets!r} (choose one of {', '.join(TARGETS)})")


def lora_config(policy, *, rank: int, alpha: float, dropout: float = 0.0, targets: str = "smolvla_default"):
    """A LoRA config on the layers `targets` names (see TARGETS)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(policy, targets),
                      bias="none")


def add_adapter(policy, name: str, config) -> None:
    """Inject a new adapter (PEFT initialises B to zero: the policy's outputs are unchanged)."""
    from peft import inject_adapter_in_model

    if name in names(policy):
        raise ValueError(f"the policy already has an adapter {name!r}")
    with warnings.catch_warnings():
        # PEFT warns that a second adapter makes a multi-adapter model: that is the point here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, policy, adapter_name=name)
    activate(policy, name)


def activate(policy, name: str | None) -> None:
    """Route every LoRA layer through adapter `name`, or through none (the base) for None.
    Leaves `requires_grad` as it was (PEFT's own switch would change it)."""
    flags = {p: p.requires_grad for p in policy.parameters()}
    for layer in lora_layers(policy):
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    for p, flag in flags.items():
        p.requires_grad_(flag)


def active(policy) -> str | None:
    layers = lora_layers(policy)
    if not layers or layers[0].disable_adapters:
        return None
    return layers[0].active_adapters[0]


def active_tensors(policy):
    """(name, tensor) of every parameter and buffer the policy computes with now: other adapters'
    LoRA weights left out, and names as the plain policy has them (no PEFT `base_layer`), so that
    a policy with adapters running on its base lists what the plain base lists."""
    act = active(policy)
    for name, t in [*policy.named_parameters(), *policy.named_buffers()]:
        parts = name.split(".")
        lora = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
        if lora is not None and (act is None or parts[lora + 1:lora + 2] != [act]):
            continue
        yield ".".join(part for part in parts if part != "base_layer"), t


@contextlib.contextmanager
def for_task(policy, task_id: int):
    """Run task `task_id` with its adapter, or on the base if it has none; restored afterwards.
    A policy without adapters is left alone."""
    if not names(policy):
        yield
        return
    before = active(policy)
    name = adapter_name(task_id)
    activate(policy, name if name in names(policy) else None)
    try:
        yield
    finally:
        activate(policy, before)


def train_only(policy, name: str) -> None:
    """Freeze everything but adapter `name`'s LoRA weights."""
    marker = f".{name}."
    for n, p in policy.named_parameters():
        p.requires_grad_("lora_" in n and marker in n)


# ---- saving and loading --------------------------------------------------------------------

def base_state_dict(policy, merged: str | None = None) -> dict:
    """The policy's weights under stock SmolVLA's keys: the LoRA layers' base weights, or, with
    `merged`, the base weights with that adapter's update added (PEFT's `get_delta_weight`)."""
    lora = {id(m) for m in lora_layers(policy)}
    layers = {path: m for path, m in policy.named_modules() if id(m) in lora}
    out = {}
    for key, value in policy.state_dict().items():
        if "lora_" in key:
            continue
        stock = key.replace(".base_layer.", ".")
        if merged is not None and stock.endswith(".weight"):
            layer = layers.get(stock[: -len(".weight")])
            if layer is not None and merged in layer.lora_A:
                value = value + layer.get_delta_weight(merged).to(value.dtype)
        out[stock] = value.detach().clone() if merged is not None else value
    return out


def save(policy, pretrained_dir: Path) -> None:
    """The adapters, in PEFT's layout (`PeftModel.from_pretrained` reads each folder)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    for name in names(policy):
        folder = Path(pretrained_dir) / ADAPTERS_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        config = policy.peft_config[name]
        config.save_pretrained(str(folder))
        state = get_peft_model_state_dict(policy, adapter_name=name)
        # under the keys a PeftModel wrapping the policy has, so that PEFT's own loader reads the folder
        save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"))


def saved_names(pretrained_dir: Path) -> list[str]:
    folder = Path(pretrained_dir) / ADAPTERS_DIR
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if _NAME.match(p.name) and (p / "adapter_config.json").is_file()]
    return sorted(found, key=lambda n: int(_NAME.match(n).group(1)))


def load(policy, pretrained_dir: Path) -> list[str]:
    """Inject and fill every adapter a checkpoint holds; the last one is left active."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = saved_names(pretrained_dir)
    for name in loaded:
        folder = Path(pretrained_dir) / ADAPTERS_DIR / name
        add_adapter(policy, name, LoraConfig.from_pretrained(str(folder)))
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
        result = set_peft_model_state_dict(policy, state, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"adapter {folder} does not fit the policy (missing {missing[:1]}, "
                             f"unexpected {list(result.unexpected_keys)[:1]})")
    return loaded


def adapter_bytes(pretrained_dir: Path) -> dict[str, int]:
    """Size on disk of each adapter's weights."""
    return {n: (Path(pretrained_dir) / ADAPTERS_DIR / n / "adapter_model.safetensors").stat().st_size
            for n in saved_names(pretrained_dir)}


def export_merged(policy, pretrained_dir: Path, task_id: int, out_dir: Path) -> Path:
    """`out_dir/pretrained_model`: task `task_id`'s model (base + its adapter, merged) as a plain
    stock checkpoint: the checkpoint's config, processors and files, without the adapters."""
    name = adapter_name(task_id)
    if name not in names(policy):
        raise ValueError(f"{pretrained_dir} has no adapter for task {task_id} (it has {', '.join(names(policy)) or 'none'})")
    dest = Path(out_dir) / "pretrained_model"
    shutil.copytree(pretrained_dir, dest, ignore=shutil.ignore_patterns(ADAPTERS_DIR, "model.safetensors"),
                    dirs_exist_ok=True)
    policy.save_pretrained(dest, state_dict=base_state_dict(policy, merged=name))
    (Path(out_dir) / "merged_from.json").write_text(json.dumps(
        {"checkpoint": str(pretrained_dir), "task_id": task_id, "adapter": name}, indent=2) + "\n")
    return dest
