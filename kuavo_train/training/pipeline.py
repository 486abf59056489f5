"""The whole sequential run: check everything, then train stage after stage.

Everything that can be checked before training (config, datasets, feature
compatibility, the pretrained model, instruction lengths) is checked before
the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path

from kuavo_train.config.schema import BASE_FILE, ConfigError, RunConfig, StageConfig, source_of
from kuavo_train.errors import DataError, KuavoError, first_line
from kuavo_train.logs import LOG_FILE, attach_log_file, detach_log_file
from kuavo_train.data.features import build_feature_space
from kuavo_train.data.stats import STATS_FILE, read_stats_file, stats_to_json, training_stats
from kuavo_train.data.task_data import TaskData, check_compatible, open_task_data
from kuavo_train.policy import adapters, factory
from kuavo_train.strategies import StagePlan, get_strategy
from kuavo_train.files import write_json_atomic, write_text_atomic
from kuavo_train.run_state import RUN_FILE, RunState, check_resume_sources
import kuavo_train.processes as processes
from kuavo_train.training.stage_settings import check_settings

log = logging.getLogger(__name__)



class InstructionError(KuavoError):
    pass


class StageSizeError(KuavoError):
    pass


def instruction_token_report(vlm_model_name: str, stages: list[StageConfig], max_length: int) -> dict[str, dict]:
    """Token counts as SmolVLA's tokenizer step sees them (instruction + newline, cut at max_length)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(vlm_model_name)
    except (OSError, ValueError) as exc:  # not in the cache offline, an unreachable hub, a wrong name
        raise factory.PolicyLoadError(f"policy.vlm_model_name: cannot load the tokenizer of {vlm_model_name!r}: "
                                      f"{first_line(exc)} ({factory.HUB_HINT})") from None
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


class Pipeline:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)

    def prepare(self) -> None:
        """All checks; raises one-line errors and writes nothing."""
        cfg = self.cfg
        self.strategy = get_strategy(cfg)  # its name and options
        self.tasks: dict[int, TaskData] = {}
        for s in cfg.ordered_stages():
            try:
                self.tasks[s.task_id] = open_task_data(s)
            except DataError as exc:
                if cfg.task != "all" and Path(cfg.task).name.removesuffix(".yaml") != s.name:
                    # a user training stage 1 may not have collected the later tasks' data yet
                    exc.args = (f"{exc} (task={cfg.task} reads every stage's dataset too: the run has one "
                                "state/action space and one set of normalization statistics over all its tasks)",)
                raise
        check_compatible(list(self.tasks.values()))
        self.space = build_feature_space(list(self.tasks.values()), max_state_dim=cfg.policy.max_state_dim,
                                         max_action_dim=cfg.policy.max_action_dim)
        sizes = {t: d.num_train_frames for t, d in self.tasks.items()}
        self.plans = self.strategy.plan(sizes, processes.count())
        # a stage resuming from another needs it complete or trained first
        check_resume_sources(cfg, [p.stage for p in self.plans_to_run()], self.run_dir)
        check_settings(cfg, self.plans, self.run_dir, processes.count())  # a stage begun or done keeps its settings
        if (self.run_dir / STATS_FILE).is_file() and RunState.load(self.run_dir).data["stages"]:
            read_stats_file(self.run_dir / STATS_FILE)  # a resumed run's statistics: damaged ones stop it here
        self.check_steps()
        base = factory.read_pretrained_config(cfg.policy.pretrained_path)
        if adapters.saved_names(Path(cfg.policy.pretrained_path)):
            # loading it would load the adapters too, leave only them trainable, and the stages
            # would continue the old tasks' adapters as their own
            raise factory.PolicyLoadError(
                f"policy.pretrained_path {cfg.policy.pretrained_path}: a model with per-task adapters (strategy "
                f"lora_per_task) cannot be a base; start from one task's model (kuavo-train export-merged)")
        vlm = cfg.policy.vlm_model_name or base.vlm_model_name
        self.token_report = check_instructions(vlm, cfg.ordered_stages(), cfg.policy.tokenizer_max_length)

    def warn_instructions(self) -> None:
        """Said once train.log is attached, so that the log file has it too."""
        warn_truncated(self.token_report, self.cfg.policy.tokenizer_max_length)
        for t in self.tasks.values():
            if t.dataset_tasks and t.instruction not in t.dataset_tasks:
                log.warning("stage %s: the configured instruction differs from the dataset's task %r; training uses the configured one",
                            t.name, t.dataset_tasks[0][:80])

    def check_steps(self) -> None:
        """A stage whose epoch holds fewer samples than one batch per process would take no optimizer
        step at all (drop_last) and still be marked complete: refuse it before anything is written."""
        cfg = self.cfg
        n = processes.count()  # before the Accelerator exists: the launcher's WORLD_SIZE
        if not cfg.dataloader.drop_last:
            if n > 1:
                # accelerate would fill each process's last batch with samples from the epoch's start:
                # more steps than planned (the schedule's end, the resume epoch) and samples twice
                raise StageSizeError(f"config error: dataloader.drop_last: false needs one process ({n} launched): "
                                     f"set it true (in {BASE_FILE} or its overrides)")
            return
        for plan in self.plans:
            if plan.epoch_samples // cfg.dataloader.batch_size // n == 0:
                raise StageSizeError(
                    f"config error: dataloader.batch_size: {cfg.dataloader.batch_size} x {n} process(es) is more "
                    f"than the {plan.epoch_samples} samples of an epoch of stage {plan.stage.name}: with drop_last it "
                    f"would take no optimizer step (lower the batch size or add data) (in {BASE_FILE} or its overrides)")

    def plans_to_run(self) -> list[StagePlan]:
        """The strategy's stages: all of them (task=all) or the one `task` names."""
        if self.cfg.task == "all":
            return self.plans
        name = Path(self.cfg.task).name.removesuffix(".yaml")
        chosen = [p for p in self.plans if p.stage.name == name]
        if not chosen:
            raise ConfigError("task", BASE_FILE, f"strategy {self.cfg.strategy.name} has no stage {name} of its own "
                                                 f"(its stages: {', '.join(p.stage.name for p in self.plans)}): use task=all")
        return chosen

    def write_stats(self, state: RunState) -> None:
        """The run's one set of normalization statistics, computed when no stage has begun: a file
        left by a launch that stopped before its first stage may be of other data or settings."""
        if (self.run_dir / STATS_FILE).is_file():
            if state.data["stages"]:
                return  # a begun stage was normalized with these: the run keeps them
            log.info("no stage has begun: the normalization statistics are computed again")
        stats = training_stats(list(self.tasks.values()), self.space, stats_from=self.cfg.normalization.stats_from)
        write_json_atomic(self.run_dir / STATS_FILE, stats_to_json(stats))

    def _first_step(self, state: RunState) -> int | None:
        """The first global step this launch trains (None when every stage is complete)."""
        for plan in self.plans_to_run():
            if not state.is_complete(plan.stage.name):
                return state.global_step_offset(plan.stage.task_id) + _saved_step(self.run_dir, plan) + 1
        return None

    def run(self) -> RunState:
        from torch.utils.tensorboard import SummaryWriter

        from kuavo_train.training.stage_trainer import StageTrainer, make_accelerator

        failed = None
        try:  # each process checks on its own (its datasets, its base) before the processes meet
            self.prepare()
        except Exception as exc:
            # On one machine the launcher stops the others when a process exits; on several, the
            # others would wait for it at the process group's first meeting (hours): meet, then stop.
            if not processes.spans_machines():
                raise
            failed = exc  # raised once they have met, and its line on every other process
        cfg = self.cfg
        acc = make_accelerator(cfg)
        processes.raise_together(failed)
        # Several processes (accelerate launch): the main one writes run.json, stats, logs and
        # checkpoints; the others wait at barriers and re-read what it wrote.
        log_file = None
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log_file = attach_log_file(self.run_dir / LOG_FILE)
            self.warn_instructions()
            state = RunState.load(self.run_dir)
            # launch_id: a new value each launch, so that another machine's stale copy of run.json
            # cannot pass for this one (processes.check_shared)
            state.data.update(config=cfg.to_dict(), instructions=self.token_report, command=sys.argv,
                              features=self.space.to_json(), num_processes=acc.num_processes,
                              launch_id=uuid.uuid4().hex)
            state.save()
            self.write_stats(state)
        else:
            logging.getLogger().setLevel(logging.WARNING)
        acc.wait_for_everyone()
        processes.check_shared(self.run_dir / RUN_FILE, "run_dir")
        state = RunState.load(self.run_dir)
        # the values as stored (float32), so that a resumed run normalizes bit-identically
        stats = read_stats_file(self.run_dir / STATS_FILE)
        log.info("strategy %s: %s; stages: %s", self.strategy.name, self.strategy.description,
                 ", ".join(f"{p.stage.name} ({p.total_steps(cfg, acc.num_processes)} steps)" for p in self.plans))
        # purge_step: TensorBoard hides what a crashed launch logged after its last checkpoint, which
        # this launch logs again
        writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._first_step(state)) \
            if acc.is_main_process else None
        # A crash during the evaluation after a stage leaves that stage complete and its matrix row
        # (and report) missing: a rerun that trains nothing after it evaluates once at the end.
        evaluate_at_end = False
        try:
            for plan in self.plans_to_run():
                stage = plan.stage
                if state.is_complete(stage.name):
                    log.info("%s is complete already: skipped", plan.full_title)
                    evaluate_at_end = True
                    continue
                if acc.is_main_process:
                    _drop_unsaved_validation(self.run_dir, plan)
                acc.wait_for_everyone()
                t0 = time.perf_counter()
                StageTrainer(cfg, plan, self.strategy, self.tasks, stats, state, acc, writer, space=self.space).run()
                acc.wait_for_everyone()
                state.reload()  # every process sees the stage complete, as the main process wrote it
                # its wall time (this invocation's part of it, when resumed), what `time` would say of it
                log.info("%s complete in %.1f s: %s", plan.full_title, time.perf_counter() - t0,
                         state.final_checkpoint(stage.name))
                if cfg.evaluation.after_each_stage:  # every process takes a share of the matrices' cells
                    from kuavo_train.evaluation.run_evaluation import evaluate_run

                    evaluate_run(cfg)
                evaluate_at_end = False
                acc.wait_for_everyone()
            if evaluate_at_end and cfg.evaluation.after_each_stage:
                from kuavo_train.evaluation.run_evaluation import evaluate_run

                evaluate_run(cfg)  # rows made already are read back, not evaluated again
        finally:
            if writer is not None:
                writer.close()
            detach_log_file(log_file)
        return state


def _saved_step(run_dir: Path, plan: StagePlan) -> int:
    """The stage's step its `last` checkpoint holds (0 if it has none): where a rerun resumes."""
    from kuavo_train.training import checkpoint as ckpt

    last = run_dir / plan.dir_name / "checkpoints" / "last"
    return ckpt.read_meta(last)["step"] if ckpt.is_complete(last) else 0


def _drop_unsaved_validation(run_dir: Path, plan: StagePlan) -> None:
    """A crash between a validation and its checkpoint leaves log lines the rerun repeats (and a
    kill mid-write a torn line)."""
    stage = plan.stage
    path = run_dir / "validation.jsonl"
    if not path.is_file():
        return
    saved_step = _saved_step(run_dir, plan)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if (r := _record(ln)) is not None and not (r["stage"] == stage.task_id and r["step"] > saved_step)]
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def _record(line: str) -> dict | None:
    """A validation.jsonl line, or None for the torn last line of a process killed mid-write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
