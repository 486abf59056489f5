"""The whole sequential run: check everything, then train stage after stage.

Everything that can be checked before training (config, datasets, feature
compatibility, the pretrained model, instruction lengths) is checked before
the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from kuavo_train.config.schema import BASE_FILE, RunConfig, StageConfig, source_of
from kuavo_train.data.replay import epoch_quotas
from kuavo_train.errors import KuavoError
from kuavo_train.logs import collapse_video_backend_warning
from kuavo_train.data.features import build_feature_space
from kuavo_train.data.stats import training_stats
from kuavo_train.data.task_data import TaskData, check_compatible, open_task_data
from kuavo_train.policy import factory
from kuavo_train.training.run_state import RunState, write_json_atomic

log = logging.getLogger(__name__)

STATS_FILE = "normalization_stats.json"


class InstructionError(KuavoError):
    pass


class StageSizeError(KuavoError):
    pass


def instruction_token_report(vlm_model_name: str, stages: list[StageConfig], max_length: int) -> dict[str, dict]:
    """Token counts as SmolVLA's tokenizer step sees them (instruction + newline, cut at max_length)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vlm_model_name)
    out = {}
    for s in stages:
        ids = tok(s.instruction + "\n")["input_ids"]
        kept = tok.decode(ids[:max_length])
        out[s.name] = {"tokens": len(ids), "kept": max_length >= len(ids), "kept_text": kept}
    return out


def warn_truncated(report: dict[str, dict], max_length: int) -> None:
    for name, r in report.items():
        if not r["kept"]:
            log.warning("instruction of %s has %d tokens; the tokenizer keeps %d (policy.tokenizer_max_length): "
                        "the model only sees %r", name, r["tokens"], max_length, r["kept_text"])


def check_instructions(vlm_model_name: str, stages: list[StageConfig], max_length: int) -> dict[str, dict]:
    """Refuse instructions that truncation makes identical; the warnings for cut ones come once the log is set up."""
    report = instruction_token_report(vlm_model_name, stages, max_length)
    seen = {}
    for name, r in report.items():
        if r["kept_text"] in seen:
            raise InstructionError(
                f"config error: stages.{name}.instruction: after truncation to {max_length} tokens it equals the one of "
                f"{seen[r['kept_text']]}: the model could not tell the tasks apart (raise policy.tokenizer_max_length or reword; "
                f"in {source_of('stages.' + name)} or its overrides)"
            )
        seen[r["kept_text"]] = name
    return report


def stats_to_json(stats) -> dict:
    return {k: {s: v.tolist() for s, v in d.items()} for k, d in stats.items()}


def stats_from_json(data) -> dict:
    import numpy as np

    return {k: {s: np.asarray(v, dtype=np.float32) for s, v in d.items()} for k, d in data.items()}


class Pipeline:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)

    def prepare(self) -> None:
        """All checks; raises one-line errors and writes nothing."""
        cfg = self.cfg
        if cfg.strategy != "joint":  # a stage resuming from another needs it complete or trained first
            from kuavo_train.training.run_state import check_resume_sources

            check_resume_sources(cfg, self.stages_to_run(), self.run_dir)
        self.tasks: dict[int, TaskData] = {s.task_id: open_task_data(s) for s in cfg.ordered_stages()}
        check_compatible(list(self.tasks.values()))
        self.space = build_feature_space(list(self.tasks.values()), max_state_dim=cfg.policy.max_state_dim,
                                         max_action_dim=cfg.policy.max_action_dim)
        self.check_steps()
        base = factory.read_pretrained_config(cfg.policy.pretrained_path)
        vlm = cfg.policy.vlm_model_name or base.vlm_model_name
        self.token_report = check_instructions(vlm, cfg.ordered_stages(), cfg.policy.tokenizer_max_length)
        for t in self.tasks.values():
            if t.dataset_tasks and t.instruction not in t.dataset_tasks:
                log.warning("stage %s: the configured instruction differs from the dataset's task %r; training uses the configured one",
                            t.name, t.dataset_tasks[0][:80])

    def check_steps(self) -> None:
        """A stage whose epoch holds fewer samples than one batch per process would take no optimizer
        step at all (drop_last) and still be marked complete: refuse it before anything is written."""
        cfg = self.cfg
        if cfg.strategy == "joint" or not cfg.dataloader.drop_last:
            return
        processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
        sizes = {t: d.num_train_frames for t, d in self.tasks.items()}
        for stage in cfg.ordered_stages():
            weights = cfg.replay_weights_for(stage)
            samples = sum(epoch_quotas({t: sizes[t] for t in weights}, weights, stage.task_id).values())
            if samples // cfg.dataloader.batch_size // processes == 0:
                raise StageSizeError(
                    f"config error: dataloader.batch_size: {cfg.dataloader.batch_size} x {processes} process(es) is more "
                    f"than the {samples} samples of an epoch of stage {stage.name}: with drop_last it would take no "
                    f"optimizer step (lower the batch size or add data) (in {BASE_FILE} or its overrides)")

    def stages_to_run(self) -> list[StageConfig]:
        if self.cfg.strategy == "joint":
            return [self.joint.stage]
        if self.cfg.task == "all":
            return self.cfg.ordered_stages()
        name = Path(self.cfg.task).name.removesuffix(".yaml")
        return [self.cfg.stages[name]]

    def load_or_compute_stats(self, state: RunState):
        path = self.run_dir / STATS_FILE
        if path.is_file():
            return stats_from_json(json.loads(path.read_text()))
        stats = training_stats(list(self.tasks.values()), self.space, stats_from=self.cfg.normalization.stats_from)
        write_json_atomic(path, stats_to_json(stats))
        # Use the values as stored (float32), so a resumed run normalizes bit-identically.
        return stats_from_json(json.loads(path.read_text()))

    def run(self) -> RunState:
        from torch.utils.tensorboard import SummaryWriter

        from kuavo_train.training.stage_trainer import StageTrainer, make_accelerator

        self.prepare()
        cfg = self.cfg
        acc = make_accelerator(cfg)
        # Several processes (accelerate launch): the main one writes run.json, stats, logs and
        # checkpoints; the others wait at barriers and re-read what it wrote.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_file = None
        if acc.is_main_process:
            log_file = _log_to_file(self.run_dir / "train.log")
            warn_truncated(self.token_report, cfg.policy.tokenizer_max_length)
        else:
            logging.getLogger().setLevel(logging.WARNING)
        state = RunState.load(self.run_dir)
        if acc.is_main_process:
            state.data.update(config=cfg.to_dict(), instructions=self.token_report, command=sys.argv,
                              features=self.space.to_json(), num_processes=acc.num_processes)
            state.save()
            self.load_or_compute_stats(state)
        acc.wait_for_everyone()
        stats = self.load_or_compute_stats(state)
        self.joint = None
        if cfg.strategy == "joint":
            from kuavo_train.training.joint import joint_plan

            sizes = {t: d.num_train_frames for t, d in self.tasks.items()}
            self.joint = joint_plan(cfg, sizes, acc.num_processes)
            log.info("joint baseline: all tasks at once for %d optimizer steps (the sequential_spec run's count)",
                     self.joint.sequential_steps)
        writer = SummaryWriter(str(self.run_dir / "tensorboard")) if acc.is_main_process else None
        try:
            for stage in self.stages_to_run():
                if state.is_complete(stage.name):
                    log.info("stage %d %s is complete already: skipped", stage.task_id, stage.name)
                    continue
                if acc.is_main_process:
                    _drop_unsaved_validation(self.run_dir, stage)
                acc.wait_for_everyone()
                StageTrainer(cfg, stage, self.tasks, stats, state, acc, writer, space=self.space,
                             samples_per_epoch=self.joint.samples_per_epoch if self.joint else None).run()
                acc.wait_for_everyone()
                state.reload()  # every process sees the stage complete, as the main process wrote it
                log.info("stage %d %s complete: %s", stage.task_id, stage.name, state.final_checkpoint(stage.name))
                if cfg.evaluation.after_each_stage and acc.is_main_process:
                    from kuavo_train.evaluation.run_evaluation import evaluate_run

                    evaluate_run(cfg)
                acc.wait_for_everyone()
        finally:
            if writer is not None:
                writer.close()
            if log_file is not None:
                logging.getLogger().removeHandler(log_file)
                log_file.close()
        return state


def _drop_unsaved_validation(run_dir: Path, stage: StageConfig) -> None:
    """A crash between a validation and its checkpoint leaves log lines the rerun repeats."""
    from kuavo_train.training import checkpoint as ckpt
    from kuavo_train.training.stage_trainer import stage_dir_name

    path = run_dir / "validation.jsonl"
    if not path.is_file():
        return
    last = run_dir / stage_dir_name(stage) / "checkpoints" / "last"
    saved_step = ckpt.read_meta(last)["step"] if ckpt.is_complete(last) else 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if not (json.loads(ln)["stage"] == stage.task_id and json.loads(ln)["step"] > saved_step)]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(path)


def _log_to_file(path: Path) -> logging.Handler | None:
    """Add the run's train.log to the root logger; returns the handler to remove when the run
    ends (None when one is attached already), so that runs made one after another in one
    process (compare, the benchmark) each keep their own log."""
    collapse_video_backend_warning()
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return None
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    return h
