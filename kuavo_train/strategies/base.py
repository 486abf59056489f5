"""What a continual-learning strategy is: a plan of stages, and a few hooks around each stage.

The pipeline trains the stages a strategy plans, in order, through one stage loop
(training/stage_trainer.py). The strategy decides what each stage trains on, with
which learning rate and from which model; it may also prepare the policy before a
stage, add a term to the loss, and keep state at the end of a stage, which is saved
with every checkpoint so that a resumed run has it. The hooks are those of
Avalanche's plugins that a stage-wise VLA recipe needs, and no more.

A strategy is one module of this package (its file name is its config name) defining
one `Strategy` subclass, plus `configs/policy/strategy/<name>.yaml`. Outside this package
only defaults name one: the config's (config/schema.py DEFAULT_STRATEGY), and the MetaWorld
benchmark's list and the recipe's per-stage schedule it gives a strategy that merges the
stages (benchmark/metaworld.py); the pipeline names none.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, ClassVar

from kuavo_train.config.schema import BASE_FILE, ConfigError, RunConfig, StageConfig, convert, settings
from kuavo_train.data.replay import epoch_quotas, steps_per_epoch


@dataclass(frozen=True)
class StagePlan:
    """One stage as a strategy trains it."""

    stage: StageConfig
    weights: dict[int, float]  # sampling shares by task id, summing to 1
    lr: float
    lr_source: str  # where the learning rate comes from, said in the stage's log line
    epoch_samples: int  # samples per epoch (all processes together); the sampler's quotas add up to it
    dir_name: str = ""
    # Why stock `lerobot-train --resume` cannot continue this stage (None: it can, see stock_resume.py).
    stock_unsupported: str | None = None
    # How logs name the stage ("" = "stage <task id>") and the tasks it learns (() = its own task; the
    # others it validates are retained or not trained yet)
    label: str = ""
    learns: tuple[int, ...] = ()

    @property
    def title(self) -> str:
        return self.label or f"stage {self.stage.task_id}"

    @property
    def full_title(self) -> str:
        """The title with the stage's name ("stage 1 task1_moving_grasp"; a label says it already)."""
        return self.label or f"{self.title} {self.stage.name}"

    @property
    def learnt_tasks(self) -> tuple[int, ...]:
        return self.learns or (self.stage.task_id,)

    def steps_per_epoch(self, cfg: RunConfig, num_processes: int) -> int:
        return steps_per_epoch(self.epoch_samples, cfg.dataloader.batch_size, cfg.dataloader.drop_last, num_processes)

    def total_steps(self, cfg: RunConfig, num_processes: int) -> int:
        return self.steps_per_epoch(cfg, num_processes) * self.stage.max_epoch


@settings
class NoOptions:
    """A strategy without options of its own."""


class Strategy:
    """Base class: sequential stages as configured; subclasses change what they need."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # The strategy's own config keys (besides `name`): a section like the config's others
    # (kuavo_train/config/schema.py `settings`), checked by pydantic, ranges included.
    Options: ClassVar[type] = NoOptions

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.options = parse_options(type(self), cfg.strategy.options)

    # ---- 1. what each stage trains on, with which lr, from which model -------------------
    def plan(self, task_sizes: dict[int, int], num_processes: int = 1) -> list[StagePlan]:
        """Every stage of the run, in order. `task_sizes`: training frames per task id."""
        return [self.stage_plan(s, task_sizes) for s in self.cfg.ordered_stages()]

    def weights(self, stage: StageConfig) -> dict[int, float]:
        return normalized(stage.replay_weights)

    def lr(self, stage: StageConfig) -> tuple[float, str]:
        return self.cfg.stage_lr(stage)

    def undecayed_lr(self, stage: StageConfig) -> tuple[float, str]:
        """For strategies without lr decay: stage 1's rate by the run's rule, unless this stage's task
        config sets its own `optimizer_lr`, which (as in the recipe) replaces the rule for that stage."""
        if stage.optimizer_lr is not None:
            return self.cfg.stage_lr(stage)
        lr, source = self.cfg.stage_lr(self.cfg.ordered_stages()[0])
        return lr, f"stage 1's ({source}), no decay"

    def stage_plan(self, stage: StageConfig, task_sizes: dict[int, int]) -> StagePlan:
        w = self.weights(stage)
        lr, source = self.lr(stage)
        samples = sum(epoch_quotas({t: task_sizes[t] for t in w}, w, stage.task_id).values())
        return StagePlan(stage=stage, weights=w, lr=lr, lr_source=source, epoch_samples=samples,
                         dir_name=f"stage{stage.task_id}_{stage.name}")

    # ---- 2. before a stage: set up the policy (adapters, frozen parts...) ----------------
    def before_stage(self, policy, plan: StagePlan) -> None:
        pass

    # ---- 3. an extra term added to the stage's loss ---------------------------------------
    def extra_loss(self, policy, batch: dict) -> Any:
        """A scalar tensor added to the policy's loss, or None."""
        return None

    # ---- 4. what is kept at the end of a stage (saved with every checkpoint) --------------
    def after_stage(self, policy, plan: StagePlan, batches: Sequence[dict]) -> None:
        """`batches`: preprocessed batches of the stage's own task, for statistics of it (a sequence,
        each made when indexed: under `accelerate launch` every process runs this hook, and
        `kuavo_train.processes` shares such a pass between them)."""

    def state_dict(self) -> dict:
        """Tensors by name, saved with every checkpoint of the stage."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def normalized(weights: dict[int, float]) -> dict[int, float]:
    total = sum(weights.values())
    return {k: v / total for k, v in sorted(weights.items()) if v > 0}


# ---- registry: every module of this package that defines a Strategy subclass ---------------

_REGISTRY: dict[str, type[Strategy]] = {}


def registry() -> dict[str, type[Strategy]]:
    """Strategy classes by name and alias (imports this package's modules once)."""
    if not _REGISTRY:
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if info.name == "base":
                continue
            module = importlib.import_module(f"{__package__}.{info.name}")
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, Strategy) and obj.__module__ == module.__name__:
                    for key in (obj.name, *obj.aliases):
                        _REGISTRY[key] = obj
    return _REGISTRY


def names() -> list[str]:
    """Canonical strategy names (no aliases), sorted."""
    return sorted({cls.name for cls in registry().values()})


def strategy_class(name: str) -> type[Strategy]:
    cls = registry().get(name)
    if cls is None:
        raise ConfigError("strategy.name", BASE_FILE,
                          f"unknown strategy {name!r} (choose one of {', '.join(names())})")
    return cls


def canonical_names(requested: Sequence[str]) -> list[str]:
    """Each requested strategy once, by its canonical name (an alias is the same strategy), in the
    order given; an unknown name is a one-line error."""
    return list(dict.fromkeys(strategy_class(name).name for name in requested))


def get_strategy(cfg: RunConfig) -> Strategy:
    """The run's strategy, its options checked, and its learning rates above `scheduler.decay_lr`
    (checked here, not with the config's other values: which rate a stage gets is the strategy's)."""
    strategy = strategy_class(cfg.strategy.name)(cfg)
    for stage in cfg.ordered_stages():
        lr, source = strategy.lr(stage)
        if cfg.scheduler.decay_lr >= lr:
            raise ConfigError("scheduler.decay_lr", BASE_FILE,
                              f"{cfg.scheduler.decay_lr:g} >= the learning rate {lr:g} of stage {stage.name} ({source}, "
                              f"strategy {strategy.name}): the cosine schedule would climb to it instead of decaying "
                              "(decay_lr must be below every stage's lr)")
    return strategy


def strategy_source(name: str) -> str:
    return f"configs/policy/strategy/{name}.yaml"


def parse_options(cls: type[Strategy], data: dict):
    """The strategy's own keys as its Options dataclass; one-line errors name `strategy.<key>` and its YAML."""
    try:
        return convert(cls.Options, dict(data), "strategy")
    except ConfigError as exc:
        raise ConfigError(exc.field_path, strategy_source(cls.name), exc.problem) from None


