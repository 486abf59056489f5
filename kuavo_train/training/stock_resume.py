"""What stock `lerobot-train --resume=true` needs to continue one of our checkpoints.

Stock LeRobot resumes a run from `<checkpoint>/pretrained_model/train_config.json`
(a `TrainPipelineConfig` saved by its own `save_pretrained`). With `--resume=true`
it loads the policy AND the pre/post-processors from that `pretrained_model/`
without re-fitting the normalizer to the dataset, so our one set of statistics
survives; without `--resume` (`--policy.path=...`) it replaces them with the
dataset's `meta/stats.json`. Then it loads `<checkpoint>/training_state/`
(optimizer, scheduler, RNG, step).

So every stage checkpoint gets a `train_config.json` describing that stage as
one stock run: the stage's own task dataset (its training episodes), the
checkpoint's SmolVLA config, the stage's AdamW + cosine schedule, its total
steps, batch size and seed.

`output_dir` is `<stage dir>/lerobot_train`, not the stage directory itself:
stock writes `<output_dir>/checkpoints/<step>/` and re-points a `last` SYMLINK
there, which would collide with our real `checkpoints/last/` folder (stock
fails on it) and with our numbered `checkpoints/<step>/` copies.

Stock trains on ONE dataset with the stock SmolVLA loss, so a stage can only be
continued when that is the same problem: no train_config.json is written (and
the reason is logged and recorded in kuavo_checkpoint.json) for the joint
baseline, for a task whose state/action dims are not the model's whole vector in
order (our union space), for a dataset whose own task text differs from the
configured instruction (stock feeds the dataset's text), and for depth cameras.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STOCK_OUTPUT_DIR = "lerobot_train"
_warned: set[str] = set()


@dataclass(frozen=True)
class StockSpec:
    """One stage seen as a stock `lerobot-train` run (or why it cannot be one)."""

    repo_id: str
    root: str
    episodes: tuple[int, ...]
    steps: int
    batch_size: int
    seed: int
    num_workers: int
    log_freq: int
    save_freq: int
    output_dir: str
    job_name: str
    rename_map: dict
    unsupported: str | None = None

    @classmethod
    def for_stage(cls, cfg, plan, tasks: dict, space, stage_dir: Path, total_steps: int) -> StockSpec:
        """From the run config, the stage's plan (kuavo_train/strategies), its tasks (TaskData by id) and feature space."""
        from kuavo_train.data.task_data import is_depth

        stage = plan.stage
        task = tasks[stage.task_id]
        reason = plan.stock_unsupported  # the strategy's reason (e.g. a stage over every task's data)
        if reason:
            pass
        elif not all(tuple(space.index[task.task_id][k]) == tuple(range(space.dim(k))) for k in space.names):
            reason = (f"task {task.name} does not have the model's whole state/action vector in order (the run's union "
                      "of dims across tasks); stock lerobot-train cannot pad it")
        elif set(task.dataset_tasks) != {task.instruction}:
            reason = (f"the dataset of {task.name} stores the instruction(s) {sorted(task.dataset_tasks)!r}, not the "
                      f"configured {task.instruction!r}; stock lerobot-train would train on the dataset's text")
        elif any(is_depth(k) for k in (task.camera_map or {}).values()):
            reason = f"task {task.name} feeds a depth camera; stock lerobot-train decodes depth differently"
        max_epoch = max(1, stage.max_epoch)
        per_epoch = max(1, total_steps // max_epoch)
        rename = {data: pol for pol, data in (task.camera_map or {}).items() if data != pol}
        return cls(
            repo_id=task.repo_id,
            root=str(Path(task.root).resolve()),
            episodes=tuple(int(e) for e in task.train_episodes),
            steps=int(total_steps),
            batch_size=int(cfg.dataloader.batch_size),
            seed=int(cfg.seed),
            num_workers=int(cfg.dataloader.num_workers),
            log_freq=int(cfg.logging.log_freq_steps),
            save_freq=per_epoch * max(1, cfg.checkpoint.save_freq_epoch),
            output_dir=str((Path(stage_dir) / STOCK_OUTPUT_DIR).resolve()),
            job_name=f"kuavo_{Path(stage_dir).name}",
            rename_map=rename,
            unsupported=reason,
        )


def train_pipeline_config(policy_config, spec: StockSpec):
    """LeRobot's own `TrainPipelineConfig` for continuing this stage with stock lerobot-train."""
    from lerobot.configs.default import DatasetConfig, WandBConfig
    from lerobot.configs.train import TrainPipelineConfig

    policy_cfg = dataclasses.replace(policy_config, pretrained_path=None, push_to_hub=False, repo_id=None)
    return TrainPipelineConfig(
        dataset=DatasetConfig(repo_id=spec.repo_id, root=spec.root, episodes=list(spec.episodes)),
        policy=policy_cfg,
        output_dir=Path(spec.output_dir),
        job_name=spec.job_name,
        seed=spec.seed,
        num_workers=spec.num_workers,
        batch_size=spec.batch_size,
        steps=spec.steps,
        log_freq=spec.log_freq,
        save_freq=spec.save_freq,
        # The same presets our trainer builds its AdamW and cosine schedule from.
        use_policy_training_preset=True,
        optimizer=policy_cfg.get_optimizer_preset(),
        scheduler=policy_cfg.get_scheduler_preset(),
        wandb=WandBConfig(enable=False),
        rename_map=dict(spec.rename_map),
    )


def write_train_config(pretrained_dir: Path, policy_config, spec: StockSpec) -> dict:
    """Write `pretrained_dir/train_config.json` (or nothing, if stock cannot continue this stage).

    Returns what to record in kuavo_checkpoint.json under "stock_resume"."""
    from lerobot.configs.train import TRAIN_CONFIG_NAME

    if spec.unsupported:
        if spec.output_dir not in _warned:
            _warned.add(spec.output_dir)
            log.warning("no %s for stock lerobot-train --resume: %s", TRAIN_CONFIG_NAME, spec.unsupported)
        return {"supported": False, "reason": spec.unsupported}
    train_pipeline_config(policy_config, spec).save_pretrained(Path(pretrained_dir))
    return {"supported": True, "train_config": f"{Path(pretrained_dir).name}/{TRAIN_CONFIG_NAME}",
            "output_dir": spec.output_dir}
