"""Typed, validated view of the Hydra config.

Hydra composes the YAML; this module turns the result into frozen dataclasses,
checked by pydantic (unknown or missing keys, types, ranges), plus the checks
across fields that no type says, and rejects anything wrong with ONE line that
names the field and the file it comes from, before any output is written.
pydantic's own report is several lines naming no file: `_one_line` words its
first error for the user instead.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError, with_config

from kuavo_train.errors import KuavoError
import kuavo_train.processes as processes


BASE_FILE = "configs/policy/smolvla_sequential_base.yaml"
DEFAULT_STRATEGY = "replay_freeze_decay"

# Unknown keys refused, no NaN/inf; scalars are strict (no "yes" for true, no 2.0 for 2).
_CHECKED = ConfigDict(extra="forbid", allow_inf_nan=False)
PositiveInt = Annotated[StrictInt, Field(gt=0)]
Count = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0.0)]
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0.0)]


def settings(cls):
    """A frozen dataclass section of the config that pydantic checks."""
    return with_config(_CHECKED)(dataclass(frozen=True)(cls))


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


@settings
class DatasetConfig:
    repo_id: str
    root: str
    train_episodes: tuple[StrictInt, StrictInt] | None = None
    val_episodes: tuple[StrictInt, StrictInt] | None = None


@settings
class StageConfig:
    task_id: StrictInt
    name: StrictStr
    instruction: StrictStr
    max_epoch: PositiveInt
    resume_from: Literal["pretrained", "task"]
    dataset: DatasetConfig
    replay_weights: Annotated[dict[int, StrictFloat], Field(min_length=1)]
    resume_task_id: StrictInt | None = None
    optimizer_lr: PositiveFloat | None = None
    scheduler_warmup_steps: Count = 1000
    scheduler_decay_steps: PositiveInt = 30000
    # Policy camera -> dataset camera, e.g. {head_cam_h: head_cam_h, depth_h: observation.depth_h};
    # null: every RGB camera of the dataset under its own name (depth is opt-in).
    cameras: Annotated[dict[str, Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)] | None = None


@settings
class PolicySettings:
    pretrained_path: StrictStr
    vlm_model_name: StrictStr | None = None
    freeze_vision_encoder: StrictBool = True
    train_expert_only: StrictBool = True
    train_state_proj: StrictBool = True
    max_state_dim: PositiveInt = 32
    max_action_dim: PositiveInt = 32
    chunk_size: PositiveInt = 50
    n_action_steps: PositiveInt = 8
    num_steps: PositiveInt = 10
    tokenizer_max_length: PositiveInt = 48
    resize_imgs_with_padding: tuple[StrictInt, StrictInt] | None = None
    device: StrictStr = "auto"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


@settings
class LearningRateSettings:
    base_lr: PositiveFloat = 5e-5
    decay_factors: Annotated[tuple[PositiveFloat, ...], Field(min_length=1)] = (1.0, 0.7, 0.5, 0.4)


@settings
class OptimizerSettings:
    betas: tuple[StrictFloat, StrictFloat] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 5e-7
    grad_clip_norm: PositiveFloat = 1.0
    fused: StrictBool = True


@settings
class SchedulerSettings:
    decay_lr: NonNegativeFloat = 1e-6


@settings
class DataloaderSettings:
    batch_size: PositiveInt = 64
    num_workers: Count = 16
    drop_last: StrictBool = True
    prefetch_factor: PositiveInt | None = 2
    persistent_workers: StrictBool = True


@settings
class ReplaySettings:
    use_replay_buffer: StrictBool = True
    replay_strategy: Literal["proportional"] = "proportional"


@settings
class NormalizationSettings:
    stats_from: Literal["all_tasks", "first_task"] = "all_tasks"


@settings
class ValidationSettings:
    validation_freq_epoch: PositiveInt = 2
    validation_episodes: PositiveInt = 20
    validate_all_previous_tasks: StrictBool = True
    seed: StrictInt = 1234
    batch_size: PositiveInt = 16
    forgetting_mode: Literal["absolute", "relative"] = "absolute"
    forgetting_thresholds: tuple[StrictFloat, StrictFloat] = (0.7, 1.0)


@settings
class CheckpointSettings:
    save_freq_epoch: Count = 10


@settings
class LoggingSettings:
    log_freq_steps: PositiveInt = 10
    progress_bars: StrictBool = True


@settings
class EvaluationSettings:
    after_each_stage: StrictBool = True
    closed_loop_episodes: Count = 0
    # The final model's row (what the run delivers) may get more episodes than earlier rows,
    # whose role is to show forgetting; None: closed_loop_episodes.
    closed_loop_final_episodes: Count | None = None
    # Episodes stepped together in one vector env, the policy acting on the whole batch
    # (lerobot-eval's --eval.batch_size, which gives the same per-episode results).
    closed_loop_batch_size: PositiveInt = 1
    action_error_episodes: PositiveInt = 20
    # A folder where row 0 (the base model, before any training) is kept under a digest of its
    # inputs, so that runs over the same base and data evaluate it once (null: each run does).
    base_row_dir: StrictStr | None = None

    @property
    def final_episodes(self) -> int:
        return self.closed_loop_episodes if self.closed_loop_final_episodes is None else self.closed_loop_final_episodes


@settings
class FeatureCacheSettings:
    enabled: StrictBool = True
    dir: StrictStr = "outputs/feature_cache"
    max_gb: NonNegativeFloat = 20.0
    prefix: StrictBool = True
    prefix_max_gb: NonNegativeFloat = 50.0
    verify_digest: StrictBool = False


@settings
class DemoSettings:
    base_dir: StrictStr = "outputs/demo/base"
    num_train_episodes: PositiveInt = 40
    num_val_episodes: PositiveInt = 8
    image_size: PositiveInt = 64
    seed: StrictInt = 0
    # Pretraining of the embedded base on the demo world's pretraining set
    # (kuavo_train/training/pretrain.py): vision tower, then robot skills; 0 skips a phase.
    pretrain_vision_steps: Count = 0
    pretrain_skill_steps: Count = 0
    pretrain_episodes_per_skill: Count = 20
    pretrain_skill_batch_size: PositiveInt = 32
    # Random-pose frames of this many more pretraining scenes per scene family for the vision tower.
    pretrain_vision_scenes: Count = 0
    pretrain_vision_lr: PositiveFloat = 2.0e-3


@settings
class StrategySettings:
    """`strategy:`, the Hydra config group configs/policy/strategy/<name>.yaml: its `name` and
    the strategy's own keys, which its module checks (kuavo_train/strategies/)."""

    name: Annotated[StrictStr, Field(min_length=1)] = DEFAULT_STRATEGY
    options: dict[str, Any] = field(default_factory=dict)


@settings
class RunConfig:
    stages: Annotated[dict[str, StageConfig], Field(min_length=1)]
    policy: PolicySettings
    task: StrictStr = "all"
    strategy: StrategySettings = field(default_factory=StrategySettings)
    seed: StrictInt = 42
    run_dir: StrictStr = "outputs/run"
    data_root: StrictStr = "data/kuavo"
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


def convert(cls, data: Any, path: str = ""):
    """Build dataclass `cls` (a section of the config) from plain data; a ConfigError naming the
    first wrong field otherwise (`path`: where `data` sits in the whole config)."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if p != "[key]"]
        where = ".".join([path, *loc]).strip(".") or "<root>"
        _fail(where, _problem(err, cls, loc))


def _problem(err: dict, cls, loc: list[str]) -> str:
    """pydantic's first error in this project's words."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    bound = next((ctx[k] for k in ("gt", "ge", "lt", "le") if k in ctx), None)
    shown = float(value) if isinstance(bound, float) and isinstance(value, (int, float)) else value
    bound = f"{bound:g}" if isinstance(bound, float) else bound
    words = {
        "missing": "missing required key",
        "greater_than": f"must be > {bound}, got {shown!r}",
        "greater_than_equal": f"must be >= {bound}, got {shown!r}",
        "less_than": f"must be < {bound}, got {shown!r}",
        "less_than_equal": f"must be <= {bound}, got {shown!r}",
        "bool_type": f"expected true/false, got {value!r}",
        "int_type": f"expected an integer, got {value!r}",
        "int_parsing": f"expected an integer, got {value!r}",
        "float_type": f"expected a number, got {value!r}",
        "finite_number": f"expected a finite number, got {value!r}",
        "string_type": f"expected a string, got {value!r}",
        "literal_error": f"unknown value {value!r} (choose {ctx.get('expected')})",
        "dataclass_type": f"expected a mapping, got {value!r}",
        "dict_type": f"expected a mapping, got {value!r}",
        "tuple_type": f"expected a list, got {value!r}",
        "none_required": "must be null",
    }
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _section_fields(cls, loc[:-1])
        return "unknown key" + (f" (known keys: {', '.join(sorted(known))})" if known else "")
    if kind in ("too_short", "too_long"):
        if isinstance(value, (list, tuple)) and "max_length" in ctx:
            return f"expected {ctx['max_length']} values, got {len(value)}"
        return "must not be empty" if kind == "too_short" else err["msg"]
    return words.get(kind, err["msg"])


def _bare(t):
    """A type without its Annotated[...] and without `| None`."""
    while typing.get_origin(t) in (Annotated, typing.Union, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _section_fields(cls, loc: list[str]) -> list[str]:
    """The field names of the dataclass found at `loc` below `cls` (mappings' keys skipped)."""
    t = cls
    for part in loc:
        t = _bare(t)
        if dataclasses.is_dataclass(t):
            t = typing.get_type_hints(t, include_extras=True).get(part)
            if t is None:
                return []
        elif typing.get_origin(t) is dict:
            t = typing.get_args(t)[1]
        else:
            return []
    t = _bare(t)
    if typing.get_origin(t) is dict:
        t = _bare(typing.get_args(t)[1])
    return [f.name for f in dataclasses.fields(t)] if dataclasses.is_dataclass(t) else []


def _strategy_section(value: Any) -> Any:
    """`strategy:` as composed (name + the strategy's own keys), as to_dict() writes it (name + options),
    or as a bare name (run.json files written before strategies were a config group)."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and "name" in value:
        if set(value) == {"name", "options"} and isinstance(value["options"], dict):
            return value
        return {"name": value["name"], "options": {k: v for k, v in value.items() if k != "name"}}
    return value


def parse_run_config(data: dict) -> RunConfig:
    """Convert + validate the composed config (plain dict with interpolations resolved)."""
    if isinstance(data, dict) and "strategy" in data:
        data = {**data, "strategy": _strategy_section(data["strategy"])}
    cfg = convert(RunConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """What no field's type says: values against each other, device names, task ids."""
    p = cfg.policy
    if p.n_action_steps > p.chunk_size:
        _fail("policy.n_action_steps", f"{p.n_action_steps} exceeds policy.chunk_size ({p.chunk_size})")
    if p.device not in ("auto", "cpu", "cuda") and not p.device.startswith("cuda:"):
        _fail("policy.device", f"unknown device {p.device!r} (auto, cpu, cuda)")
    if p.device.startswith("cuda:") and processes.launched():
        _fail("policy.device", f"{p.device!r} under accelerate launch, where each process takes its own GPU "
                               "(cuda:LOCAL_RANK): set policy.device=cuda and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if p.resize_imgs_with_padding is not None and min(p.resize_imgs_with_padding) <= 0:
        _fail("policy.resize_imgs_with_padding", f"sizes must be > 0, got {list(p.resize_imgs_with_padding)}")
    if not all(0 <= b < 1 for b in cfg.optimizer.betas):
        _fail("optimizer.betas", f"each must be in [0, 1), got {list(cfg.optimizer.betas)}")
    lo, hi = cfg.validation.forgetting_thresholds
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
    said = {}
    for key, s in cfg.stages.items():
        sp = f"stages.{key}"
        if not s.instruction.strip():
            _fail(f"{sp}.instruction", f"must not be empty or blank, got {s.instruction!r} (the policy is conditioned on it)")
        if s.instruction in said:
            # the deployed model is switched between tasks by instruction alone
            _fail(f"{sp}.instruction", f"the same as stage {said[s.instruction]!r}'s: one model cannot be told "
                                       f"which of the two tasks to do")
        said[s.instruction] = key
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
    # scheduler.decay_lr against each stage's learning rate: strategies/base.py get_strategy (the
    # strategy decides the rates)
    if cfg.task != "all":
        stage_name = Path(cfg.task).name.removesuffix(".yaml")
        if stage_name not in cfg.stages:
            _fail("task", f"unknown task {cfg.task!r} (known: all, {', '.join('tasks/' + k for k in cfg.stages)})")

