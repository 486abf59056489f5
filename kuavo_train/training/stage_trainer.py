"""Train ONE stage: the current task plus replay, validated on all tasks so far.

The loop itself is the usual LeRobot one (preprocessor -> policy.forward ->
backward -> clip -> AdamW -> cosine scheduler) run through `accelerate`; what
is ours is the stage logic around it: replay sampling, per-step seeding (so a
resumed run repeats the uninterrupted one exactly), multi-task validation with
the forgetting analysis, and best/last/periodic checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kuavo_train.config.schema import BASE_FILE, ConfigError, RunConfig
from kuavo_train.data.features import FeatureSpace, make_task_dataset
from kuavo_train.data.frames import ChunkedFrameDataset, camera_sizes, collate_resized, fetch_batches
from kuavo_train.data.replay import ProportionalReplaySampler, mixed_dataset
from kuavo_train.data.task_data import ACTION_KEY, STATE_KEY, TaskData
from kuavo_train.errors import KuavoError
from kuavo_train.evaluation.forgetting import format_validation_table
from kuavo_train.evaluation.validation import validation_frames, validation_loss
import kuavo_train.processes as processes
from kuavo_train.logs import progress_bars
from kuavo_train.policy import adapters, factory
from kuavo_train.policy.feature_cache import precision_name, serving
from kuavo_train.policy.prefix_cache import create_cache
from kuavo_train.training import checkpoint as ckpt
from kuavo_train.training.optim import build_optimizer, stock_param_groups
from kuavo_train.training.stage_settings import stage_settings
from kuavo_train.run_state import RunState
from kuavo_train.strategies import StagePlan, Strategy
from kuavo_train.training.stock_resume import StockSpec

log = logging.getLogger(__name__)

VALIDATION_FRAMES_PER_EPISODE = 10


def step_seed(seed: int, stage: int, step: int, process: int = 0) -> int:
    """The seed of a training step's random draws (flow-matching noise and time, dropout) in one
    process. Each process of a launch draws its own: with one seed for all, N processes would add
    the same noise to their different samples. Process 0's is a one-process run's."""
    key = [seed, stage, step] + ([process] if process else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class NonFiniteLossError(KuavoError):
    """Training produced a NaN/inf loss or gradient: the stage stops before any update."""


@dataclass
class StageResult:
    final_checkpoint: Path
    total_steps: int
    val_losses: dict[int, float]


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    device = factory.resolve_device(cfg.policy.device)
    if device.startswith("cuda:") and torch.cuda.is_available():
        # One process (the schema refuses an index under a launch): the Accelerator trains on the
        # current GPU, so `cuda:N` makes GPU N current, the one evaluation uses too.
        torch.cuda.set_device(device)
    acc = Accelerator(cpu=device == "cpu", mixed_precision=cfg.policy.mixed_precision,
                      kwargs_handlers=[processes.group_kwargs()])
    if device == "cpu" and acc.device.type != "cpu":
        # Under a launch on a machine with GPUs the processes met before the Accelerator existed (the
        # main one building inputs), and accelerate keeps that first, GPU, state whatever cpu= says.
        # Not run here (no GPU on the machines that built this).
        raise ConfigError("policy.device", BASE_FILE,
                          f"cpu, but this launch's processes took the GPUs ({acc.device}): hide them "
                          "(CUDA_VISIBLE_DEVICES= accelerate launch ...) or set policy.device=auto")
    if cfg.policy.mixed_precision == "fp16" and acc.device.type == "cpu":
        log.warning("policy.mixed_precision=fp16 does nothing on the CPU (accelerate trains in fp32 there); "
                    "bf16 is the CPU's mixed precision")
    return acc


class StageTrainer:
    def __init__(self, cfg: RunConfig, plan: StagePlan, strategy: Strategy, tasks: dict[int, TaskData], stats,
                 run_state: RunState, accelerator, writer=None, *, space: FeatureSpace):
        self.cfg, self.plan, self.stage, self.strategy = cfg, plan, plan.stage, strategy
        self.tasks, self.stats, self.space = tasks, stats, space
        self.run_state, self.acc, self.writer = run_state, accelerator, writer
        self.run_dir = Path(cfg.run_dir)
        self.stage_dir = self.run_dir / plan.dir_name
        self.ckpt_dir = self.stage_dir / "checkpoints"
        self.main = accelerator.is_main_process

    # ---- setup -----------------------------------------------------------
    def source_checkpoint(self) -> Path | None:
        """The checkpoint folder this stage starts from (None: the pretrained base)."""
        s = self.stage
        if s.resume_from == "pretrained":
            return None
        prev = self.cfg.stage_by_id(s.resume_task_id)
        final = self.run_state.final_checkpoint(prev.name)
        if final is None:
            raise RuntimeError(
                f"stage {s.name} starts from task {s.resume_task_id} ({prev.name}), which is not complete in "
                f"{self.run_dir}: train it first (task=tasks/{prev.name} or task=all)"
            )
        return final

    def val_sets(self, chunk_size: int) -> dict[int, tuple[ChunkedFrameDataset, list[int]]]:
        """Held-out episodes of tasks 1..k (or just k), a few evenly spaced frames each."""
        ids = range(1, self.stage.task_id + 1) if self.cfg.validation.validate_all_previous_tasks else [self.stage.task_id]
        out = {}
        for tid in ids:
            task = self.tasks[tid]
            eps = list(task.val_episodes)[: self.cfg.validation.validation_episodes]
            ds = make_task_dataset(task, eps, chunk_size, self.space, self.stats)
            out[tid] = (ds, validation_frames(ds, eps, VALIDATION_FRAMES_PER_EPISODE))
        return out

    # ---- the loop ----------------------------------------------------------
    def run(self) -> StageResult:
        from tqdm.auto import tqdm

        cfg, stage = self.cfg, self.stage
        if self.main:  # one process repairs what a crash left; the others would race it for the same renames
            ckpt.clean_temporaries(self.ckpt_dir)
        self.acc.wait_for_everyone()
        last = self.ckpt_dir / "last"
        resuming = ckpt.is_complete(last)
        source_ckpt = self.source_checkpoint()
        source = cfg.policy.pretrained_path if source_ckpt is None else source_ckpt / factory.PRETRAINED_DIR
        task = self.tasks[stage.task_id]
        pcfg = factory.run_policy_config(cfg, task, self.space, source, lr=self.plan.lr, stage=stage,
                                         device=str(self.acc.device.type))
        policy = factory.load_policy(last / factory.PRETRAINED_DIR if resuming else source, pcfg)
        # What the strategy kept from earlier stages: the end state of the stage this one starts from,
        # or, resuming, the start state this stage saved with its checkpoints.
        if resuming:
            self.strategy.load_state_dict(ckpt.read_strategy_state(last, final=False))
        else:
            self.strategy.load_state_dict({} if source_ckpt is None else ckpt.read_strategy_state(source_ckpt, final=True))
        self.strategy.before_stage(policy, self.plan)
        preprocessor, postprocessor = factory.make_processors(pcfg, stats=self.stats)
        cache = create_cache(policy, cfg.feature_cache, log_prefix=f"{self.plan.title}: ")
        trainable, total = factory.count_parameters(policy)
        log.info("%s: %s trainable of %s parameters (%.2f%%), lr %.3g (%s), from %s%s",
                 self.plan.full_title, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 self.plan.lr, self.plan.lr_source, source, " (resuming from last)" if resuming else "")

        weights = self.plan.weights
        cached_frames = None
        if cache is not None:
            for t in {*weights, *range(1, stage.task_id + 1)}:
                cache.register_dataset(t, self.tasks[t].root)
            cache.attach()
            if not cfg.feature_cache.verify_digest:
                # Frames whose image features are all cached are not decoded (their content is fixed by
                # the dataset fingerprint); the entries of the precision the training steps run in.
                with self.acc.autocast():
                    precision = precision_name(self.acc.device)
                cached_frames = cache.cached_frames(precision, {t: list(self.tasks[t].policy_cameras) for t in weights})
        train_sets = [make_task_dataset(self.tasks[t], self.tasks[t].train_episodes, pcfg.chunk_size, self.space,
                                        self.stats, cached_frames) for t in sorted(weights)]
        sampler = ProportionalReplaySampler(
            sorted(weights), [len(d) for d in train_sets], weights,
            current_task=stage.task_id, seed=cfg.seed, stage=stage.task_id,
            samples_per_epoch=self.plan.epoch_samples,
        )
        dl = cfg.dataloader
        cameras = list(task.policy_cameras)
        sizes = {tuple(camera_sizes(self.tasks[t])[c] for c in cameras) for t in weights}
        loader = torch.utils.data.DataLoader(
            mixed_dataset(train_sets),
            batch_size=dl.batch_size,
            sampler=sampler,
            # replayed tasks whose cameras differ in size: resized as the policy resizes them (SmolVLA's
            # config always has a size: its loader refuses a null one)
            collate_fn=functools.partial(collate_resized, camera_keys=cameras, size=pcfg.resize_imgs_with_padding)
            if len(sizes) > 1 else None,
            num_workers=dl.num_workers,
            drop_last=dl.drop_last,
            prefetch_factor=dl.prefetch_factor if dl.num_workers > 0 else None,
            persistent_workers=dl.persistent_workers and dl.num_workers > 0,
        )
        mix = {self.tasks[t].name: q for t, q in sampler.quotas.items()}
        log.info("%s replay mix per epoch (samples): %s", self.plan.title, mix)
        steps_per_epoch = self.plan.steps_per_epoch(cfg, self.acc.num_processes)
        total_steps = steps_per_epoch * stage.max_epoch

        params = [p for p in policy.parameters() if p.requires_grad]
        # Over ALL parameters, like stock lerobot-train (`policy.get_optim_params()`): the saved optimizer state
        # must have its layout for `lerobot-train --resume` to load it. Frozen ones get no gradient, so
        # AdamW skips them: the updates are those of an optimizer over `params` alone.
        optimizer = build_optimizer(pcfg, policy.get_optim_params(), fused=cfg.optimizer.fused)
        scheduler = pcfg.get_scheduler_preset().build(optimizer, total_steps)
        step = 0
        if resuming:
            from lerobot.common.train_utils import load_training_state

            with stock_param_groups(optimizer):
                step, optimizer, scheduler = load_training_state(last, optimizer, scheduler)
        meta_best = ckpt.read_meta(self.ckpt_dir / "best") if ckpt.is_complete(self.ckpt_dir / "best") else {}
        best_loss = meta_best.get("current_task_val_loss", float("inf"))
        if resuming and self.main:  # a crash right after writing `last` left its copies undone
            best_loss = self._copy_last(last, ckpt.read_meta(last), step, best_loss)

        policy, optimizer, loader = self.acc.prepare(policy, optimizer, loader)
        raw_policy = self.acc.unwrap_model(policy)
        offset = self.run_state.global_step_offset(stage.task_id)
        if self.main:
            self.run_state.update_stage(stage.name, task_id=stage.task_id, status="running", total_steps=total_steps,
                                        replay_mix=mix, lr=self.plan.lr, trainable_parameters=trainable,
                                        total_parameters=total, source=str(source),
                                        settings=stage_settings(self.cfg, self.plan), processes=self.acc.num_processes)
        val_sets = self.val_sets(pcfg.chunk_size)
        ref_losses = self._reference_losses()
        start_epoch = step // steps_per_epoch
        step_at_start = step
        val_losses: dict[int, float] = {}
        # What this process trained on: its sample count, and which (task, frame) pairs in its
        # first epoch, so that the run records how the replay plan was split across processes.
        seen, first_epoch = 0, []
        policy.train()
        for epoch in range(start_epoch, stage.max_epoch):
            # Through the prepared loader: accelerate re-sets the sampler's epoch from its own
            # iteration counter at every __iter__, which restarts at 0 in a resumed process.
            loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else sampler.set_epoch(epoch)
            bar = tqdm(loader, desc=f"{self.plan.title} epoch {epoch + 1}/{stage.max_epoch}",
                       disable=not self._bars(), leave=False, dynamic_ncols=True)
            epoch_loss, epoch_steps, skipped, t0 = 0.0, 0, 0, time.perf_counter()
            for raw in fetch_batches(bar):  # a damaged image in a worker: its one-line DataError
                seen += len(raw["task"])
                if epoch == start_epoch:
                    first_epoch += list(zip(raw["task_id"].tolist(), raw["index"].tolist()))
                torch.manual_seed(step_seed(cfg.seed, stage.task_id, step, self.acc.process_index))
                batch = preprocessor(dict(raw))
                with self.acc.autocast(), serving(cache, raw, batch):
                    loss, _ = policy(batch)
                    extra = self.strategy.extra_loss(raw_policy, batch)
                    if extra is not None:
                        loss = loss + extra
                self.acc.backward(loss)
                grad_norm = self.acc.clip_grad_norm_(params, cfg.optimizer.grad_clip_norm)
                # A non-finite loss or gradient stops the stage, except an overflowed gradient under
                # fp16 on a GPU: that is the loss scaler's business (its step skips the update and
                # lowers the scale, often in the first steps).
                overflow_ok = self.acc.scaler is not None
                if not bool(torch.isfinite(loss.detach())) or (not overflow_ok and not math.isfinite(float(grad_norm))):
                    # before optimizer.step: the weights and the last checkpoint stay as they were
                    raise self._diverged(loss, grad_norm, raw, epoch, step)
                optimizer.step()
                skipped += optimizer.step_was_skipped  # the prepared (accelerate) optimizer says
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_loss, epoch_steps = epoch_loss + float(loss.detach()), epoch_steps + 1
                logged = step % cfg.logging.log_freq_steps == 0 or step == total_steps
                if logged:
                    # the loss of the whole effective batch, not the main process's share of it
                    # (every process reaches this step: the collective is met)
                    shown = float(self.acc.reduce(loss.detach(), "mean"))
                if self.main and logged:
                    lr = scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}")
                    if self.writer is not None:
                        gs = offset + step
                        self.writer.add_scalar("train/loss", shown, gs)
                        self.writer.add_scalar("train/lr", lr, gs)
                        self.writer.add_scalar("train/grad_norm", float(grad_norm), gs)
                        self.writer.add_scalar("train/stage", stage.task_id, gs)
            bar.close()
            done = epoch + 1
            mean_loss = float(self.acc.reduce(torch.tensor(epoch_loss / max(epoch_steps, 1), device=self.acc.device),
                                              "mean"))  # over every process's samples
            # one line per epoch: what a log file (or a terminal without bars) keeps of the progress
            log.info("%s epoch %d/%d: %d steps, mean loss %.4f, lr %.2e, %.2f steps/s", self.plan.title, done,
                     stage.max_epoch, epoch_steps, mean_loss, scheduler.get_last_lr()[0],
                     epoch_steps / max(time.perf_counter() - t0, 1e-9))
            if skipped:
                log.info("%s epoch %d: the fp16 loss scaler skipped %d of its updates (gradients overflowed)",
                         self.plan.title, done, skipped)
            meta = {"stage": stage.task_id, "task": stage.name, "epoch": done, "max_epoch": stage.max_epoch}
            if done % cfg.validation.validation_freq_epoch == 0 or done == stage.max_epoch:
                val_losses = self.validate(raw_policy, preprocessor, val_sets, epoch=done, step=step, offset=offset,
                                           ref_losses=ref_losses, cache=cache)
                meta["val_losses"] = {str(k): v for k, v in val_losses.items()}
                meta["current_task_val_loss"] = val_losses[stage.task_id]
            if self.main:
                ckpt.write_checkpoint(last, policy=raw_policy, preprocessor=preprocessor, postprocessor=postprocessor,
                                      optimizer=optimizer, scheduler=scheduler, step=step, meta=meta,
                                      trained_tasks=self.trained_tasks(),
                                      stock=StockSpec.for_stage(cfg, self.plan, self.tasks, self.space, self.stage_dir,
                                                                total_steps),
                                      strategy_state=self.strategy.state_dict())
                best_loss = self._copy_last(last, meta, step, best_loss)
            self.acc.wait_for_everyone()
        final = self.ckpt_dir / "last"
        sharding = self._sharding(seen, first_epoch, resumed_at=step_at_start if resuming else None)
        if cache is not None:
            log.info("%s frozen-feature cache: %s", self.plan.title, cache.summary())
            cache.detach()
        # What the strategy keeps of this stage (e.g. statistics of its task), saved with the final checkpoint
        # before the stage is marked complete (a rerun after a crash here repeats it from `last`).
        self.strategy.after_stage(raw_policy, self.plan, self._own_task_batches(preprocessor, pcfg.chunk_size))
        if self.main:
            ckpt.write_final_strategy_state(final, self.strategy.state_dict())
        if self.main:
            self.run_state.update_stage(stage.name, status="complete", **sharding,
                                        final_checkpoint=str(final.relative_to(self.run_dir)),
                                        final_val_losses={str(k): v for k, v in ckpt.read_meta(final).get("val_losses", {}).items()})
        # The Accelerator outlives the stage and keeps what it prepared (model, optimizer state, loader and
        # its workers): without this every finished stage would stay in (GPU) memory until the run ends.
        self.acc.free_memory()
        return StageResult(final, total_steps, val_losses)

    def _copy_last(self, last: Path, meta: dict, step: int, best_loss: float) -> float:
        """Copy the `last` just written to `best` when its own task's loss is the lowest so far, and
        to `<step>` every `checkpoint.save_freq_epoch` epochs (unless there already); returns the
        best loss."""
        if meta.get("current_task_val_loss", float("inf")) < best_loss:
            best_loss = meta["current_task_val_loss"]
            ckpt.copy_checkpoint(last, self.ckpt_dir / "best")
        freq = self.cfg.checkpoint.save_freq_epoch
        if freq > 0 and meta["epoch"] % freq == 0 and not ckpt.is_complete(numbered := self.ckpt_dir / f"{step:06d}"):
            ckpt.copy_checkpoint(last, numbered)
        return best_loss

    def _own_task_batches(self, preprocessor, chunk_size: int) -> "TaskBatches":
        """Preprocessed batches of the stage's own task's training frames, in order (each made when used)."""
        task = self.tasks[self.stage.task_id]
        ds = make_task_dataset(task, task.train_episodes, chunk_size, self.space, self.stats)
        return TaskBatches(ds, self.cfg.dataloader.batch_size, preprocessor, self.acc.device)

    def _diverged(self, loss, grad_norm, raw, epoch: int, step: int) -> "NonFiniteLossError":
        names = {t: d.name for t, d in self.tasks.items()}
        rows = sorted({(int(t), int(e), int(f)) for t, e, f in zip(raw["task_id"], raw["episode_index"], raw["frame_index"])})
        shown = ", ".join(f"{names.get(t, t)} ep {e} frame {f}" for t, e, f in rows[:6]) + (" ..." if len(rows) > 6 else "")
        return NonFiniteLossError(
            f"training error: stage {self.stage.name} epoch {epoch + 1} step {step + 1}: loss {float(loss.detach()):.4g}, "
            f"gradient norm {float(grad_norm):.4g} (not finite); the batch held {shown}. Nothing was updated: the last "
            f"checkpoint ({self.ckpt_dir / 'last'}) is as it was. Check those frames' values, or lower the learning rate")

    def _bars(self) -> bool:
        return self.main and progress_bars(self.cfg.logging.progress_bars)

    def _sharding(self, seen: int, first_epoch: list, *, resumed_at: int | None) -> dict:
        """Per-process sample counts and the overlap of the first epoch this launch trained, gathered
        on every process. A stage resumed after a crash counts this launch's samples only, from step
        `resumed_at`."""
        from accelerate.utils import gather_object

        counts = gather_object([seen])
        pairs = gather_object([first_epoch])
        flat = [tuple(p) for part in pairs for p in part]
        return {"samples_per_process": counts, "samples_counted_from_step": resumed_at or 0,
                "first_epoch_samples": len(flat), "first_epoch_distinct_samples": len(set(flat))}

    def trained_tasks(self) -> list[dict]:
        """Tasks 1..k: what the checkpoint knows, recorded for the inference wrapper, with each
        task's own state/action dims (names, and their positions in the model's vectors)."""
        out = []
        for t in range(1, self.stage.task_id + 1):
            dims = {}
            for key, label in ((STATE_KEY, "state"), (ACTION_KEY, "action")):
                dims[f"{label}_names"] = list(self.space.task_names[t][key])
                dims[f"{label}_index"] = list(self.space.index[t][key])
            # the size each camera's images had in the task's data, which the wrapper accepts for it
            sizes = {key: list(hw) for key, hw in camera_sizes(self.tasks[t]).items()}
            out.append({"task_id": t, "name": self.tasks[t].name, "instruction": self.tasks[t].instruction, **dims,
                        "image_sizes": sizes})
        return out

    def _reference_losses(self) -> dict[int, float]:
        """Each earlier task's loss at the end of its own stage (for relative forgetting)."""
        out = {}
        for tid in range(1, self.stage.task_id):
            s = self.run_state.stage(self.cfg.stage_by_id(tid).name)
            v = s.get("final_val_losses", {}).get(str(tid))
            if v is not None:
                out[tid] = v
        return out

    def validate(self, policy, preprocessor, val_sets, *, epoch: int, step: int, offset: int, ref_losses,
                 cache=None) -> dict[int, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        losses = {}
        for tid, (ds, idx) in tqdm(list(val_sets.items()), desc="validation", leave=False,
                                   disable=not self._bars()):
            with adapters.for_task(policy, tid):  # per-task adapters: each task validated with its own
                losses[tid] = validation_loss(policy, preprocessor, ds, idx, task_id=tid, seed=cfg.validation.seed,
                                              batch_size=cfg.validation.batch_size, device=self.acc.device,
                                              feature_cache=cache, split=True)
        if self.main:
            names = {t: self.tasks[t].name for t in losses}
            table = format_validation_table(
                self.plan.title, epoch, losses, names, self.plan.learnt_tasks,
                tuple(cfg.validation.forgetting_thresholds),
                mode=cfg.validation.forgetting_mode, reference_losses=ref_losses,
            )
            log.info("\n%s", table)
            with open(self.run_dir / "validation.jsonl", "a") as f:
                for tid, loss in losses.items():
                    f.write(json.dumps({"stage": self.stage.task_id, "epoch": epoch, "step": step,
                                        "global_step": offset + step, "task_id": tid, "task": names[tid],
                                        "loss": loss}) + "\n")
            if self.writer is not None:
                for tid, loss in losses.items():
                    self.writer.add_scalar(f"val/{names[tid]}", loss, offset + step)
        return losses


class TaskBatches(Sequence):
    """A dataset's preprocessed batches in order, each made when indexed: a strategy's end-of-stage
    pass (EWC's Fisher) shared between the processes of `accelerate launch` loads only its part."""

    def __init__(self, dataset, batch_size: int, preprocessor, device):
        self.dataset, self.batch_size, self.preprocessor, self.device = dataset, batch_size, preprocessor, device

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        batch = self.preprocessor(dict(self.dataset.batch(range(i * self.batch_size,
                                                                  min((i + 1) * self.batch_size, len(self.dataset))))))
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
