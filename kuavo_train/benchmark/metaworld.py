"""`kuavo-train benchmark metaworld`: sequential learning of MetaWorld v3 tasks, judged closed loop.

1. One LeRobot dataset per task from MetaWorld's scripted experts (reused when present).
2. A tiny random-weight SmolVLA base whose tokenizer knows the tasks' instructions.
3. For every seed and strategy: the SAME pipeline as the Kuavo path (`Pipeline(cfg).run()`
   with the stages generated from the task list), whose after-stage evaluation fills the
   success matrix in MetaWorld on held-out seeds (closed_loop.py reads the dataset's
   `meta/metaworld.json`), then the run's report.
4. `benchmark.md` / `benchmark.json`: the success matrix per strategy with ACC/BWT/FWT, the
   expert's own success as the ceiling, and compare.py's table over seeds.

`observation="stock"` (`--observation stock`) records LeRobot's own `metaworld` observation
instead of ours (kuavo_train/data/metaworld/env.py) and evaluates in LeRobot's own env, so
a number here can stand beside `lerobot-eval --env.type=metaworld` numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from kuavo_train.files import write_json_atomic, write_text_atomic
import kuavo_train.processes as processes
from kuavo_train.evaluation.report import matrix_md
from kuavo_train.data.metaworld.env import (
    DEFAULT_CAMERA,
    DEFAULT_TASKS,
    HORIZON,
    IMAGE_SIZE,
    OBSERVATIONS,
    STATE_MODES,
    WORKERS_ENV,
    MetaWorldError,
    SimSettings,
    check_tasks,
    default_workers,
    instruction_for,
    state_names,
    stock_env_facts,
)

log = logging.getLogger(__name__)

WARMUP_STEPS = 100
DEFAULT_STRATEGIES = ("replay_freeze_decay", "sequential_naive", "joint")
TIMING_FILE = "benchmark_seconds.json"  # wall time of a finished run (training + after-stage evaluation)

# Full run: 35-45 min per strategy and seed on 2 CPU cores (4 tasks, closed-loop evaluation included).
# Earlier rows show forgetting; the final model, what a run delivers, gets 20 held-out seeds.
FULL = {"train_episodes": 40, "eval_seeds": 20, "episodes": 10, "final_episodes": 20, "epochs": 16}
# CI smoke: every code path, minimal sizes.
SMOKE = {"train_episodes": 1, "eval_seeds": 1, "episodes": 1, "final_episodes": 1, "epochs": 1}


@dataclass
class BenchmarkSpec:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    seeds: list[int] = field(default_factory=lambda: [0])
    train_episodes: int = FULL["train_episodes"]
    eval_seeds: int = FULL["eval_seeds"]
    episodes: int = FULL["episodes"]
    final_episodes: int = FULL["final_episodes"]
    epochs: int = FULL["epochs"]
    # "ours" or "stock" (LeRobot's metaworld observation). None below: the observation's own
    # (ours: full state, 200 steps; stock: its 4-dim agent state and its horizon).
    observation: str = "ours"
    state_mode: str | None = None
    camera: str = DEFAULT_CAMERA
    image_size: int = IMAGE_SIZE  # stored image = the policy's input size
    horizon: int | None = None
    data_dir: Path = Path("data/metaworld")
    out_dir: Path = Path("outputs/metaworld")
    data_seed: int = 0
    workers: int = field(default_factory=default_workers)
    # Training threads: the tiny model gains little from a second thread, and 2-thread OpenMP
    # crawls when the cores are shared (measured 1.3 s/step vs ~0.1 s/step).
    threads: int = 1
    overrides: list[str] = field(default_factory=list)
    overwrite_data: bool = False
    command: str = ""

    def sim(self, task: str) -> SimSettings:
        if self.observation == "stock":
            return SimSettings.stock(task, self.image_size)
        return SimSettings(task=task, image_size=self.image_size, camera=self.camera, horizon=self.horizon or HORIZON,
                           state_mode=self.state_mode or "full")

    @property
    def image_key(self) -> str:
        return self.sim(self.tasks[0]).image_key

    def instruction(self, task: str) -> str:
        return instruction_for(task, self.observation)


def replay_shares(k: int) -> dict[int, float]:
    """Stage k's sampling shares: the spec's for four tasks ({1: .2, 2: .8}, {.1, .2, .7},
    {.1, .1, .2, .6}), generalised to any count: the current task keeps 1.0/0.8/0.7/0.6 (0.6
    from stage 4 on); the rest goes to earlier tasks, 2 parts to the previous one, 1 to each other."""
    if k == 1:
        return {1: 1.0}
    current = {2: 0.8, 3: 0.7}.get(k, 0.6)
    parts = {t: 1.0 for t in range(1, k - 1)} | {k - 1: 2.0}
    total = sum(parts.values())
    shares = {t: round((1.0 - current) * p / total, 6) for t, p in parts.items()}
    return {**shares, k: current}  # the stage normalises the shares, so rounding cannot skew them


def check_spec(spec: BenchmarkSpec) -> None:
    """Every input problem as one line, before anything is generated or trained."""
    from kuavo_train.strategies.base import canonical_names, names, registry

    spec.tasks = check_tasks(spec.tasks)
    bad = [s for s in spec.strategies if s not in registry()]
    if bad or not spec.strategies:
        raise MetaWorldError(f"metaworld error: unknown strategy {bad[0] if bad else ''!r} (choose from {', '.join(names())})")
    # an alias is the same strategy, and a strategy or seed given twice would count one run twice
    spec.strategies = canonical_names(spec.strategies)
    spec.seeds = list(dict.fromkeys(spec.seeds))
    if spec.observation not in OBSERVATIONS:
        raise MetaWorldError(f"metaworld error: --observation {spec.observation!r} (choose {', '.join(OBSERVATIONS)})")
    if spec.observation == "stock":
        if spec.state_mode not in (None, "agent"):
            raise MetaWorldError("metaworld error: --observation stock has LeRobot's 4-dim agent state "
                                 f"(drop --state {spec.state_mode})")
        stock = {t: stock_env_facts(t) for t in spec.tasks}  # a task LeRobot's env lacks fails here
        horizon, camera = stock[spec.tasks[0]]["horizon"], stock[spec.tasks[0]]["camera"]
        if spec.horizon not in (None, horizon) or spec.camera != camera:
            raise MetaWorldError(f"metaworld error: --observation stock fixes camera {camera} and horizon {horizon} "
                                 f"(got {spec.camera}, {spec.horizon})")
        spec.state_mode, spec.horizon = "agent", horizon
    spec.state_mode = spec.state_mode or "full"
    spec.horizon = HORIZON if spec.horizon is None else spec.horizon
    if spec.state_mode not in STATE_MODES:
        raise MetaWorldError(f"metaworld error: --state {spec.state_mode!r} (choose {', '.join(STATE_MODES)})")
    for name in ("train_episodes", "eval_seeds", "episodes", "final_episodes", "epochs", "workers", "horizon", "threads"):
        if getattr(spec, name) < 1:
            raise MetaWorldError(f"metaworld error: {name.replace('_', '-')} must be >= 1 (got {getattr(spec, name)})")
    # more evaluation episodes need more held-out seeds
    spec.eval_seeds = max(spec.eval_seeds, spec.episodes, spec.final_episodes)
    if not spec.seeds:
        raise MetaWorldError("metaworld error: --seeds is empty")
    check_overrides(spec)


# Overrides the benchmark sets for each run itself, and the option that sets them.
_OWN_KEYS = {"seed": "--seeds", "strategy": "--strategies", "run_dir": "--out", "data_root": "--data",
             "evaluation.closed_loop_final_episodes": "--final-episodes"}


def check_overrides(spec: BenchmarkSpec) -> None:
    """Keys the benchmark sets per run are refused (they would be ignored, or the report would
    describe other episodes than were run); `evaluation.closed_loop_episodes` is --episodes; and
    the rest must compose, said before minutes of dataset generation."""
    from kuavo_train.config.loading import compose

    for o in spec.overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in _OWN_KEYS:
            raise MetaWorldError(f"metaworld error: override {o!r}: the benchmark sets {key} itself; use "
                                 f"{_OWN_KEYS[key]}")
        if key == "evaluation.closed_loop_episodes" and value.strip().isdigit() and int(value) > 0:
            spec.episodes = int(value)
            spec.eval_seeds = max(spec.eval_seeds, spec.episodes)
    compose(["profile=metaworld", *[o for o in spec.overrides if not o.lstrip("+~").startswith("stages.")]])


def prepare_data(spec: BenchmarkSpec) -> dict[str, Path]:
    from kuavo_train.data.metaworld.writer import write_task_dataset

    roots = {}
    for task in spec.tasks:
        roots[task] = write_task_dataset(spec.data_dir, spec.sim(task), num_train_episodes=spec.train_episodes,
                                         num_eval_seeds=spec.eval_seeds, seed=spec.data_seed, workers=spec.workers,
                                         overwrite=spec.overwrite_data, log=log)
    return roots


def max_state_dim(spec: BenchmarkSpec) -> int:
    return max(32, len(state_names(spec.state_mode)))  # never cut the state (LeRobot pads up to it)


def ensure_base(spec: BenchmarkSpec, chunk_size: int, n_action_steps: int) -> Path:
    """The tiny random-weight SmolVLA base, one per (instructions, state layout, camera, sizes)."""
    from kuavo_train.policy.base_model import build_base_model

    instructions = [spec.instruction(t) for t in spec.tasks]
    parts = [sorted(instructions), spec.state_mode, spec.camera, spec.image_size, chunk_size, n_action_steps,
             max_state_dim(spec)]
    key = json.dumps(parts + ([spec.image_key] if spec.observation == "stock" else []))  # ours keeps its old key
    out = spec.out_dir / f"base-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    pretrained = out / "pretrained_model"
    if (pretrained / "model.safetensors").is_file():
        return pretrained
    log.info("building the tiny SmolVLA base in %s", out)
    path = build_base_model(out, instructions=instructions, state_dim=len(state_names(spec.state_mode)), action_dim=4,
                            camera_keys=(spec.image_key,), image_size=spec.image_size, chunk_size=chunk_size,
                            n_action_steps=n_action_steps, seed=0, max_state_dim=max_state_dim(spec), overwrite=True)
    return path


def run_config(spec: BenchmarkSpec, strategy: str, seed: int, roots: dict[str, Path], base: Path, run_dir: Path):
    """The composed Hydra config (profile=metaworld + overrides) with one stage per MetaWorld task."""
    import yaml
    from omegaconf import OmegaConf, open_dict

    from kuavo_train.config.loading import compose, to_run_config
    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.strategies import get_strategy
    from kuavo_train.strategies.replay_freeze_decay import ReplayFreezeDecay

    plain = [o for o in spec.overrides if not o.lstrip("+~").startswith("stages.")]
    cfg = compose(["profile=metaworld", f"data_root={spec.data_dir}", f"policy.pretrained_path={base}",
                   f"policy.max_state_dim={max_state_dim(spec)}",
                   f"evaluation.closed_loop_episodes={spec.episodes}",  # --episodes (an override still wins)
                   f"evaluation.closed_loop_final_episodes={spec.final_episodes}",
                   f"evaluation.base_row_dir={spec.out_dir / 'base_rows'}",  # row 0: once for all runs
                   *plain,
                   f"strategy={strategy}", f"seed={seed}", f"run_dir={run_dir}"])
    stages = {}
    for k, task in enumerate(spec.tasks, start=1):
        # optimizer_lr null: base_lr x the decay factor of stage k (the last factor from stage 4 on)
        stages[task] = {
            "task_id": k, "name": task, "instruction": spec.instruction(task), "max_epoch": spec.epochs,
            "resume_from": "pretrained" if k == 1 else "task", "resume_task_id": None if k == 1 else k - 1,
            "optimizer_lr": None, "scheduler_warmup_steps": WARMUP_STEPS, "scheduler_decay_steps": 1,
            "replay_weights": {str(t): w for t, w in replay_shares(k).items()},
            "dataset": {"repo_id": f"metaworld/{task}", "root": str(roots[task]), "train_episodes": None, "val_episodes": None},
        }

    def with_stages():
        with open_dict(cfg):
            cfg.stages = stages
            for o in spec.overrides:  # after ours, so that they win
                if o.lstrip("+~").startswith("stages."):
                    key, _, value = o.lstrip("+").partition("=")
                    OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, force_add=True)
        return to_run_config(cfg)

    # Cosine decay over each stage's own steps, as the strategy plans them. A strategy that trains
    # all tasks in one stage (joint) stretches stage 1's schedule over its whole run itself, so its
    # stage 1 keeps the default recipe's.
    draft = with_stages()
    frames = {k: open_task_data(_Stage(k, t, roots[t], spec.instruction(t))).num_train_frames
              for k, t in enumerate(spec.tasks, start=1)}
    plans = {p.stage.name: p for p in get_strategy(draft).plan(frames)}
    if not set(stages) <= set(plans):
        plans = {p.stage.name: p for p in ReplayFreezeDecay(draft).plan(frames)}
    for task in spec.tasks:
        steps = plans[task].total_steps(draft, 1)
        stages[task]["scheduler_decay_steps"] = steps
        stages[task]["scheduler_warmup_steps"] = min(WARMUP_STEPS, max(1, steps // 10))
    return with_stages()


@dataclass(frozen=True)
class _Stage:
    """The fields open_task_data reads, before the run config exists."""

    task_id: int
    name: str
    root: Path
    instruction: str

    @property
    def dataset(self):
        from kuavo_train.config.schema import DatasetConfig

        return DatasetConfig(repo_id=f"metaworld/{self.name}", root=str(self.root))


def _timing(run_dir: Path) -> dict | None:
    """{"seconds", "resumed"} of a run finished by an earlier call, or None."""
    path = run_dir / TIMING_FILE
    return {"resumed": False, **json.loads(path.read_text())} if path.is_file() else None


def _begun(run_dir: Path) -> bool:
    """Whether a stage of the run had begun before this call: then its time is only this call's part."""
    from kuavo_train.run_state import RunState

    return bool(RunState.load(run_dir).data["stages"])  # no run.json: no stages


def run_benchmark(spec: BenchmarkSpec) -> dict:
    check_spec(spec)
    # --workers for the closed-loop episodes too, which take their count from the environment
    previous = os.environ.get(WORKERS_ENV)
    os.environ[WORKERS_ENV] = str(spec.workers)
    try:
        return _run_benchmark(spec)
    finally:
        if previous is None:
            os.environ.pop(WORKERS_ENV, None)
        else:
            os.environ[WORKERS_ENV] = previous


def _run_benchmark(spec: BenchmarkSpec) -> dict:
    from kuavo_train.benchmark.compare import format_summary, summarize, train_and_evaluate

    import torch

    torch.set_num_threads(spec.threads)
    t0 = time.time()
    # under `accelerate launch` the main process writes the datasets and the base, the others wait
    roots = processes.on_main(lambda: prepare_data(spec))
    data_seconds = time.time() - t0
    probe = run_config(spec, spec.strategies[0], spec.seeds[0], roots, Path("."), spec.out_dir / "probe")
    base = processes.on_main(lambda: ensure_base(spec, probe.policy.chunk_size, probe.policy.n_action_steps))
    reports: dict[str, list[dict]] = {s: [] for s in spec.strategies}
    timings: dict[str, list[dict]] = {s: [] for s in spec.strategies}
    runs: dict[str, list[str]] = {s: [] for s in spec.strategies}
    planned = [(seed, strategy, run_config(spec, strategy, seed, roots, base, spec.out_dir / f"seed{seed}" / strategy))
               for seed in spec.seeds for strategy in spec.strategies]
    # a finished run re-rendered later keeps the time it took to train: read before it is (re)run
    earlier = {cfg.run_dir: _timing(Path(cfg.run_dir)) for _, _, cfg in planned}
    begun = {cfg.run_dir: _begun(Path(cfg.run_dir)) for _, _, cfg in planned}
    for _, strategy, cfg, report, seconds in train_and_evaluate(planned):
        timing = earlier[cfg.run_dir]
        if timing is None:
            timing = {"seconds": round(seconds, 1), "resumed": begun[cfg.run_dir]}
            if processes.is_main():
                write_json_atomic(Path(cfg.run_dir) / TIMING_FILE, timing)
        reports[strategy].append(report)
        timings[strategy].append(timing)
        runs[strategy].append(str(cfg.run_dir))
        _write_results(spec, roots, reports, timings, runs, data_seconds, format_summary, summarize)
    return _write_results(spec, roots, reports, timings, runs, data_seconds, format_summary, summarize)


_STOCK_NOTE = (
    "Observation: LeRobot's own `metaworld` env (corner2 camera moved, 480 px render flipped on both axes, "
    "4-dim agent_pos, its instructions, 500 steps); demonstrations stored resized to {size} px with SmolVLA's own "
    "resize; evaluated in LeRobot's env, episode seeds 1000.. (its scenes), every RNG seeded per episode. "
    "Stock's numbers for a checkpoint: `lerobot-eval --policy.path=<checkpoint>/pretrained_model --env.type=metaworld "
    "--env.task=<task> --eval.n_episodes={episodes} --eval.batch_size=1` (same scenes; its policy noise is one stream "
    "seeded once, so single episodes may differ).")


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def episode_sem(rates: list[float | None], episodes: int) -> float | None:
    """Standard error of the mean success over tasks from the episodes alone (binomial per task):
    the spread one training run's ACC would show if its evaluation were repeated on new scenes."""
    if any(r is None for r in rates) or episodes < 1:
        return None
    return math.sqrt(sum(r * (1 - r) / episodes for r in rates)) / len(rates)


def _write_results(spec, roots, reports, timings, runs, data_seconds, format_summary, summarize) -> dict:
    """benchmark.json / benchmark.md, rewritten after every run so a partial benchmark is readable."""
    from kuavo_train.data.metaworld.writer import read_meta

    metas = {t: read_meta(roots[t]) for t in spec.tasks}
    done = {s: r for s, r in reports.items() if r}
    summary = summarize(done)
    seeds_done = sorted({int(Path(p).parent.name.removeprefix("seed")) for ps in runs.values() for p in ps})
    lines = [
        "# MetaWorld closed-loop continual-learning benchmark", "",
        *([f"Command: `{spec.command}`", ""] if spec.command else []),
        f"Tasks in order: {', '.join(spec.tasks)}; strategies: {', '.join(spec.strategies)}; training seeds: "
        f"{', '.join(map(str, spec.seeds))} (done: {', '.join(map(str, seeds_done)) or 'none'}); data seed {spec.data_seed}.",
        f"Per task: {spec.train_episodes} expert demos, {spec.episodes} held-out seeds evaluated closed loop after every "
        f"stage and {spec.final_episodes} for the final model; {spec.epochs} epochs per stage; state {spec.state_mode} ({len(state_names(spec.state_mode))} dims), "
        f"camera {spec.camera} {spec.image_size} px, horizon {spec.horizon} steps.", "",
        *([_STOCK_NOTE.format(size=spec.image_size, episodes=spec.final_episodes), ""] if spec.observation == "stock" else []),
        "| task | instruction | expert success (held-out seeds = ceiling) | expert success (training scenes) |",
        "|---|---|---|---|",
    ]
    for t in spec.tasks:
        m = metas[t]
        ev = m["expert_eval_successes"][: spec.final_episodes]
        lines.append(f"| {t} | {m['instruction']} | {sum(ev)}/{len(ev)} | "
                     f"{m.get('train_expert_successes', len(m['train_seeds']))}/{m['train_attempts']} |")
    for strategy, reps in done.items():
        for rep, run_dir, timing in zip(reps, runs[strategy], timings[strategy]):
            R = rep["matrices"].get("success")
            took = f"{timing['seconds'] / 60:.1f} min" + (", the last call's part of a resumed run" if timing["resumed"] else "")
            lines += ["", f"## {strategy} ({run_dir}, {took})", ""]
            if R is None:
                lines.append("no success matrix (closed-loop episodes = 0)")
                continue
            # the report names the stage that filled each row (a joint run's last row is its own)
            lines += matrix_md(R, spec.tasks, (rep.get("extra") or {}).get("row_stages"), digits=2)
            ceiling = [sum(metas[t]["expert_eval_successes"][: spec.final_episodes])
                       / max(1, min(spec.final_episodes, len(metas[t]["expert_eval_successes"]))) for t in spec.tasks]
            lines.append("| scripted expert (ceiling) | " + " | ".join(_fmt(v) for v in ceiling) + " |")
            met = rep["metrics"]["success"]
            lines += ["", "ACC {} (± {} standard error of the final row's {} episodes per task), BWT {}, FWT {}, "
                      # three decimals: a mean of rates in steps of 1/episodes (0.8375 is not 0.84)
                      "mean forgetting {}".format(_fmt(met.get("acc"), 3), _fmt(episode_sem(R[-1], spec.final_episodes), 3),
                                                  spec.final_episodes,
                                                  *(_fmt(met.get(k), 3) for k in ("bwt", "fwt", "mean_forgetting")))]
    lines += ["", "## Over seeds", "", format_summary(summary, seeds=seeds_done)] if done else []
    out = {"spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()},
           "data_seconds": round(data_seconds, 1), "run_seconds": {k: [t["seconds"] for t in v] for k, v in timings.items()},
           "run_resumed": {k: [t["resumed"] for t in v] for k, v in timings.items()}, "runs": runs, "summary": summary,
           "expert": {t: {"eval_success_rate": metas[t]["expert_eval_success_rate"],
                          "train_success_rate": metas[t]["expert_train_success_rate"]} for t in spec.tasks},
           "success_matrices": {s: [r["matrices"].get("success") for r in reps] for s, reps in done.items()},
           "success_metrics": {s: [r["metrics"].get("success") for r in reps] for s, reps in done.items()}}
    text = "\n".join(line for line in lines) + "\n"
    if processes.is_main():  # every process has the same results; one writes them
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(spec.out_dir / "benchmark.json", out)
        write_text_atomic(spec.out_dir / "benchmark.md", text)
    out["markdown"] = text
    return out
