"""Typed, validated view of the Hydra config.

Hydra composes the YAML; this module turns the result into frozen
dataclasses and rejects anything wrong with ONE line that names the field and
the file it comes from, before any output is written. OmegaConf's structured
configs reject unknown keys too, but their errors are multi-line and do not
name our files, hence the small hand-written checker.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuavo_train.errors import KuavoError


BASE_FILE = "configs/policy/smolvla_sequential_base.yaml"
DEFAULT_STRATEGY = "replay_freeze_decay"


class ConfigError(KuavoError):
    """A bad config value. `str()` is the one line shown to the user."""

    def __init__(self, field_path: str, source: str, problem: str):
        self.field_path, self.source, self.problem = field_path, source, problem
        super().__init__(f"config error: {field_path}: {problem} (in {source} or its overrides)")


class ConfigSyntaxError(ConfigError):
    """A config file that is not valid YAML: `str()` names the file and the line."""

    def __init__(self, source: str, line: int | None, problem: str):
        self.field_path, self.source, self.line, self.problem = None, source, line, problem
        where = f"{source}, line {line}" if line is not None else source
        KuavoError.__init__(self, f"config error: {where}: YAML syntax error: {problem}")


@dataclass(frozen=True)
class DatasetConfig:
    repo_id: str
    root: str
    train_episodes: tuple[int, int] | None = None
    val_episodes: tuple[int, int] | None = None


@dataclass(frozen=True)
class StageConfig:
    task_id: int
    name: str
    instruction: str
    max_epoch: int
    resume_from: str
    dataset: DatasetConfig
    replay_weights: dict[int, float]
    resume_task_id: int | None = None
    optimizer_lr: float | None = None
    scheduler_warmup_steps: int = 1000
    scheduler_decay_steps: int = 30000
    # Policy camera -> dataset camera, e.g. {head_cam_h: head_cam_h, depth_h: observation.depth_h};
    # null: every RGB camera of the dataset under its own name (depth is opt-in).
    cameras: dict[str, str] | None = None


@dataclass(frozen=True)
class PolicySettings:
    pretrained_path: str
    vlm_model_name: str | None = None
    freeze_vision_encoder: bool = True
    train_expert_only: bool = True
    train_state_proj: bool = True
    max_state_dim: int = 32
    max_action_dim: int = 32
    chunk_size: int = 50
    n_action_steps: int = 8
    num_steps: int = 10
    tokenizer_max_length: int = 48
    resize_imgs_with_padding: tuple[int, int] | None = None
    device: str = "auto"
    mixed_precision: str = "no"


@dataclass(frozen=True)
class LearningRateSettings:
    base_lr: float = 5e-5
    decay_factors: tuple[float, ...] = (1.0, 0.7, 0.5, 0.4)


@dataclass(frozen=True)
class OptimizerSettings:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-7
    grad_clip_norm: float = 1.0


@dataclass(frozen=True)
class SchedulerSettings:
    decay_lr: float = 1e-6


@dataclass(frozen=True)
class DataloaderSettings:
    batch_size: int = 64
    num_workers: int = 16
    drop_last: bool = True
    prefetch_factor: int | None = 2
    persistent_workers: bool = True


@dataclass(frozen=True)
class ReplaySettings:
    use_replay_buffer: bool = True
    replay_strategy: str = "proportional"


@dataclass(frozen=True)
class NormalizationSettings:
    stats_from: str = "all_tasks"


@dataclass(frozen=True)
class ValidationSettings:
    validation_freq_epoch: int = 2
    validation_episodes: int = 20
    validate_all_previous_tasks: bool = True
    seed: int = 1234
    batch_size: int = 16
    forgetting_mode: str = "absolute"
    forgetting_thresholds: tuple[float, float] = (0.7, 1.0)


@dataclass(frozen=True)
class CheckpointSettings:
    save_freq_epoch: int = 10


@dataclass(frozen=True)
class LoggingSettings:
    log_freq_steps: int = 10
    progress_bars: bool = True


@dataclass(frozen=True)
class EvaluationSettings:
    after_each_stage: bool = True
    closed_loop_episodes: int = 0
    # Episodes stepped together in one vector env, the policy acting on the whole batch
    # (lerobot-eval's --eval.batch_size, which gives the same per-episode results).
    closed_loop_batch_size: int = 1
    action_error_episodes: int = 20


@dataclass(frozen=True)
class FeatureCacheSettings:
    enabled: bool = True
    dir: str = "outputs/feature_cache"
    max_gb: float = 20.0
    prefix: bool = True
    prefix_max_gb: float = 50.0
    verify_digest: bool = False


@dataclass(frozen=True)
class DemoSettings:
    base_dir: str = "outputs/demo/base"
    num_train_episodes: int = 40
    num_val_episodes: int = 8
    image_size: int = 64
    seed: int = 0
    # Pretraining of the embedded base on the demo world's pretraining set
    # (kuavo_train/training/pretrain.py): vision tower, then robot skills; 0 skips a phase.
    pretrain_vision_steps: int = 0
    pretrain_skill_steps: int = 0
    pretrain_episodes_per_skill: int = 20


@dataclass(frozen=True)
class StrategySettings:
    """`strategy:`, the Hydra config group configs/policy/strategy/<name>.yaml: its `name` and
    the strategy's own keys, which its module checks (kuavo_train/strategies/)."""

    name: str = DEFAULT_STRATEGY
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    stages: dict[str, StageConfig]
    policy: PolicySettings
    task: str = "all"
    strategy: StrategySettings = field(default_factory=StrategySettings)
    seed: int = 42
    run_dir: str = "outputs/run"
    data_root: str = "data/kuavo"
    learning_rate: LearningRateSettings = field(default_factory=LearningRateSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    dataloader: DataloaderSettings = field(default_factory=DataloaderSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    normalization: NormalizationSettings = field(default_factory=NormalizationSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    feature_cache: FeatureCacheSettings = field(default_factory=FeatureCacheSettings)
    demo: DemoSettings | None = None

    # ---- derived views -------------------------------------------------
    def ordered_stages(self) -> list[StageConfig]:
        return sorted(self.stages.values(), key=lambda s: s.task_id)

    def stage_by_id(self, task_id: int) -> StageConfig:
        for s in self.stages.values():
            if s.task_id == task_id:
                return s
        raise KeyError(task_id)

    def stage_lr(self, stage: StageConfig) -> tuple[float, str]:
        """The one learning-rate rule: the stage's explicit `optimizer_lr`, else base_lr x its decay factor
        (the last factor for stages beyond the list). The second value says which, for the log."""
        if stage.optimizer_lr is not None:
            return stage.optimizer_lr, f"stages.{stage.name}.optimizer_lr"
        factors = self.learning_rate.decay_factors
        f = factors[min(stage.task_id, len(factors)) - 1]
        return self.learning_rate.base_lr * f, f"learning_rate.base_lr {self.learning_rate.base_lr:g} x decay factor {f:g}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- conversion + validation ---------------------------------------------


def source_of(path: str) -> str:
    """The config file a field comes from (before overrides), for error lines."""
    if path.startswith("stages."):
        name = path.split(".")[1]
        return f"configs/policy/tasks/{name}.yaml"
    if path.startswith("demo."):
        return "configs/policy/profile/demo.yaml"  # the only config that has a demo section
    return BASE_FILE


def _fail(path: str, problem: str):
    raise ConfigError(path, source_of(path), problem)


def convert(cls, data: Any, path: str):
    """Build dataclass `cls` from a plain dict, rejecting unknown/missing keys by name."""
    if not isinstance(data, dict):
        _fail(path or "<root>", f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            _fail(f"{path}.{key}".lstrip("."), f"unknown key (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}".lstrip(".")
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(sub, "missing required key")
            continue
        kwargs[name] = _coerce(f.type, data[name], sub)
    return cls(**kwargs)


_NESTED = {
    "DatasetConfig": DatasetConfig,
    "PolicySettings": PolicySettings,
    "LearningRateSettings": LearningRateSettings,
    "OptimizerSettings": OptimizerSettings,
    "SchedulerSettings": SchedulerSettings,
    "DataloaderSettings": DataloaderSettings,
    "ReplaySettings": ReplaySettings,
    "NormalizationSettings": NormalizationSettings,
    "ValidationSettings": ValidationSettings,
    "CheckpointSettings": CheckpointSettings,
    "LoggingSettings": LoggingSettings,
    "EvaluationSettings": EvaluationSettings,
    "FeatureCacheSettings": FeatureCacheSettings,
    "DemoSettings": DemoSettings,
}


def _coerce(type_str: str, value: Any, path: str):
    t = str(type_str).replace(" ", "")
    optional = t.endswith("|None")
    base = t[: -len("|None")] if optional else t
    if value is None:
        if optional:
            return None
        _fail(path, "must not be null")
    if base == "StrategySettings":
        if isinstance(value, str):  # the form before strategies were a config group (older run.json)
            value = {"name": value}
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
            _fail(path, f"expected a mapping with a strategy name, got {value!r}")
        if set(value) == {"name", "options"} and isinstance(value["options"], dict):  # as to_dict() writes it
            value = {"name": value["name"], **value["options"]}
        return StrategySettings(name=value["name"], options={k: v for k, v in value.items() if k != "name"})
    if base in _NESTED:
        return convert(_NESTED[base], value, path)
    if base == "dict[str,StageConfig]":
        if not isinstance(value, dict) or not value:
            _fail(path, "expected at least one stage")
        return {k: convert(StageConfig, v, f"{path}.{k}") for k, v in value.items()}
    if base == "dict[str,str]":
        if not isinstance(value, dict) or not value:
            _fail(path, "expected a mapping policy_camera: dataset_camera")
        for k, v in value.items():
            if not isinstance(v, str) or not v:
                _fail(f"{path}.{k}", f"expected a camera name, got {v!r}")
        return {str(k): v for k, v in value.items()}
    if base == "dict[int,float]":
        if not isinstance(value, dict) or not value:
            _fail(path, "expected a mapping task_id -> weight")
        out = {}
        for k, v in value.items():
            try:
                out[int(k)] = float(v)
            except (TypeError, ValueError):
                _fail(f"{path}.{k}", f"expected task_id: number, got {k!r}: {v!r}")
        return out
    if base.startswith("tuple["):
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}")
        elem = "float" if "float" in base else "int"
        if "..." not in base:
            n = base.count(",") + 1
            if len(value) != n:
                _fail(path, f"expected {n} values, got {len(value)}")
        return tuple(_scalar(elem, v, path) for v in value)
    return _scalar(base, value, path)


def _scalar(kind: str, value: Any, path: str):
    if kind == "bool":
        if not isinstance(value, bool):
            _fail(path, f"expected true/false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            _fail(path, f"expected a finite number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {kind} at {path}")


def parse_run_config(data: dict) -> RunConfig:
    """Convert + validate the composed config (plain dict with interpolations resolved)."""
    cfg = convert(RunConfig, data, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that need no data on disk."""
    p = cfg.policy
    if p.n_action_steps > p.chunk_size:
        _fail("policy.n_action_steps", f"{p.n_action_steps} exceeds policy.chunk_size ({p.chunk_size})")
    for name in ("chunk_size", "n_action_steps", "num_steps", "max_state_dim", "max_action_dim"):
        if getattr(p, name) <= 0:
            _fail(f"policy.{name}", "must be > 0")
    if p.device not in ("auto", "cpu", "cuda") and not p.device.startswith("cuda:"):
        _fail("policy.device", f"unknown device {p.device!r} (auto, cpu, cuda)")
    if p.mixed_precision not in ("no", "bf16", "fp16"):
        _fail("policy.mixed_precision", f"unknown value {p.mixed_precision!r} (no, bf16, fp16)")
    if cfg.learning_rate.base_lr <= 0:
        _fail("learning_rate.base_lr", "must be > 0")
    if cfg.dataloader.batch_size <= 0:
        _fail("dataloader.batch_size", "must be > 0")
    if not cfg.feature_cache.max_gb >= 0:
        _fail("feature_cache.max_gb", f"must be >= 0, got {cfg.feature_cache.max_gb}")
    if not cfg.feature_cache.prefix_max_gb >= 0:
        _fail("feature_cache.prefix_max_gb", f"must be >= 0, got {cfg.feature_cache.prefix_max_gb}")
    if cfg.dataloader.num_workers < 0:
        _fail("dataloader.num_workers", "must be >= 0")
    if cfg.demo is not None:
        for name in ("pretrain_vision_steps", "pretrain_skill_steps", "pretrain_episodes_per_skill"):
            if getattr(cfg.demo, name) < 0:
                _fail(f"demo.{name}", f"must be >= 0, got {getattr(cfg.demo, name)}")
    if cfg.evaluation.closed_loop_batch_size <= 0:
        _fail("evaluation.closed_loop_batch_size", f"must be > 0, got {cfg.evaluation.closed_loop_batch_size}")
    if p.resize_imgs_with_padding is not None and min(p.resize_imgs_with_padding) <= 0:
        _fail("policy.resize_imgs_with_padding", f"sizes must be > 0, got {list(p.resize_imgs_with_padding)}")
    o = cfg.optimizer
    if o.grad_clip_norm <= 0:
        _fail("optimizer.grad_clip_norm", "must be > 0")
    if o.weight_decay < 0:
        _fail("optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not all(0 <= b < 1 for b in o.betas):
        _fail("optimizer.betas", f"each must be in [0, 1), got {list(o.betas)}")
    if o.eps <= 0:
        _fail("optimizer.eps", f"must be > 0, got {o.eps}")
    if cfg.scheduler.decay_lr < 0:
        _fail("scheduler.decay_lr", "must be >= 0")
    if cfg.replay.replay_strategy != "proportional":
        _fail("replay.replay_strategy", f"only 'proportional' is supported, got {cfg.replay.replay_strategy!r}")
    if cfg.normalization.stats_from not in ("all_tasks", "first_task"):
        _fail("normalization.stats_from", "must be all_tasks or first_task")
    v = cfg.validation
    if v.validation_freq_epoch <= 0:
        _fail("validation.validation_freq_epoch", "must be > 0")
    if v.validation_episodes <= 0:
        _fail("validation.validation_episodes", "must be > 0")
    if v.forgetting_mode not in ("absolute", "relative"):
        _fail("validation.forgetting_mode", "must be absolute or relative")
    lo, hi = v.forgetting_thresholds
    if not 0 < lo < hi:
        _fail("validation.forgetting_thresholds", f"need 0 < first < second, got {[lo, hi]}")

    ids = {}
    for key, s in cfg.stages.items():
        sp = f"stages.{key}"
        if s.name != key:
            _fail(f"{sp}.name", f"{s.name!r} differs from the stage key {key!r}")
        if s.task_id in ids:
            _fail(f"{sp}.task_id", f"task_id {s.task_id} is also used by stage {ids[s.task_id]!r}")
        ids[s.task_id] = key
    expected = list(range(1, len(ids) + 1))
    if sorted(ids) != expected:
        _fail("stages", f"task ids must be 1..{len(ids)} without gaps, got {sorted(ids)}")
    if not cfg.learning_rate.decay_factors or min(cfg.learning_rate.decay_factors) <= 0:
        _fail("learning_rate.decay_factors", f"needs at least one factor, each > 0, got {list(cfg.learning_rate.decay_factors)}")
    for key, s in cfg.stages.items():
        sp = f"stages.{key}"
        if not s.instruction.strip():
            _fail(f"{sp}.instruction", f"must not be empty or blank, got {s.instruction!r} (the policy is conditioned on it)")
        if s.max_epoch <= 0:
            _fail(f"{sp}.max_epoch", "must be > 0")
        if s.optimizer_lr is not None and s.optimizer_lr <= 0:
            _fail(f"{sp}.optimizer_lr", f"must be > 0, got {s.optimizer_lr}")
        if s.scheduler_warmup_steps < 0 or s.scheduler_decay_steps <= 0:
            _fail(f"{sp}.scheduler_decay_steps", "warmup must be >= 0 and decay > 0")
        if s.resume_from not in ("pretrained", "task"):
            _fail(f"{sp}.resume_from", f"must be 'pretrained' or 'task', got {s.resume_from!r}")
        if s.resume_from == "task":
            if s.resume_task_id is None or not 1 <= s.resume_task_id < s.task_id:
                _fail(f"{sp}.resume_task_id", f"must name an earlier task (1..{s.task_id - 1}), got {s.resume_task_id}")
        for tid, w in s.replay_weights.items():
            if w < 0:
                _fail(f"{sp}.replay_weights.{tid}", f"weight must be >= 0, got {w}")
            if tid not in ids:
                _fail(f"{sp}.replay_weights.{tid}", f"unknown task id {tid}")
            if tid > s.task_id:
                _fail(f"{sp}.replay_weights.{tid}", f"task {tid} comes after this stage (task {s.task_id}): only earlier tasks can be replayed")
        if sum(s.replay_weights.values()) <= 0:
            _fail(f"{sp}.replay_weights", "weights sum to 0")
        if s.replay_weights.get(s.task_id, 0) <= 0:
            _fail(f"{sp}.replay_weights.{s.task_id}", "the stage's own task needs a weight > 0")
        for split in ("train_episodes", "val_episodes"):
            rng = getattr(s.dataset, split)
            if rng is not None and not 0 <= rng[0] < rng[1]:
                _fail(f"{sp}.dataset.{split}", f"expected [first, last) with 0 <= first < last, got {list(rng)}")
        tr, va = s.dataset.train_episodes, s.dataset.val_episodes
        if tr and va and tr[0] < va[1] and va[0] < tr[1]:
            _fail(f"{sp}.dataset.val_episodes", f"{list(va)} overlaps train_episodes {list(tr)}: validation must be held out")
    for s in cfg.ordered_stages():
        lr = cfg.stage_lr(s)[0]
        if cfg.scheduler.decay_lr >= lr:
            _fail("scheduler.decay_lr", f"{cfg.scheduler.decay_lr:g} >= the learning rate {lr:g} of stage {s.name}: "
                  "the cosine schedule would climb to it instead of decaying (decay_lr must be below every stage's lr)")
    if cfg.task != "all":
        stage_name = Path(cfg.task).name.removesuffix(".yaml")
        if stage_name not in cfg.stages:
            _fail("task", f"unknown task {cfg.task!r} (known: all, {', '.join('tasks/' + k for k in cfg.stages)})")

