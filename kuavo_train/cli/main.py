"""`kuavo-train`: one command for every job of the project.

    kuavo-train demo                 build the embedded default if missing, train all stages, evaluate, report
    kuavo-train train [overrides]    the sequential pipeline (same as train_smolvla_sequential.py)
    kuavo-train build-base           the tiny offline SmolVLA base
    kuavo-train make-data            the Kuavo demo world datasets
    kuavo-train evaluate --run DIR   forgetting matrices + report for a finished run
    kuavo-train infer --run DIR      closed-loop success of a run's final model in its simulator (demo world, MetaWorld)
    kuavo-train compare [overrides]  the strategies (replay_freeze_decay, sequential_naive, joint...) side by side
    kuavo-train benchmark metaworld  the strategies on MetaWorld v3 tasks, judged closed loop in the simulator
    kuavo-train convert rosbag|v21   Kuavo rosbags or LeRobot v2.1 datasets -> LeRobot v3.0 datasets
    kuavo-train register-vlm PATH    make a checkpoint's bundled tiny VLM loadable by stock LeRobot on this machine
    kuavo-train export-merged PATH   one stock checkpoint per task of a lora_per_task model

Config overrides are Hydra's `key=value` syntax, e.g. `profile=demo seed=3`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kuavo_train.logs import quiet

log = logging.getLogger("kuavo_train")


def _setup_logging() -> None:
    import kuavo_train.processes as processes

    # under `accelerate launch` the main process speaks for all: the others log only warnings, and
    # their printed results (the same lines: every process ends with the same numbers) are dropped
    logging.basicConfig(level=logging.INFO if processes.is_main() else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    if not processes.is_main():
        sys.stdout = open(os.devnull, "w")  # after basicConfig: the log handler keeps the real stdout
    quiet()


def _run_config(overrides: list[str], config_dir: str | None):
    from kuavo_train.config.loading import load_run_config

    return load_run_config(overrides, config_dir)


def cmd_build_base(args) -> None:
    cfg = _run_config(["profile=demo", *args.overrides], args.config_dir)
    path = _build_demo_base(cfg, Path(args.out or cfg.demo.base_dir), overwrite=args.overwrite)
    print(f"base model: {path}")


def _build_demo_base(cfg, out: Path, *, overwrite: bool) -> Path:
    """The embedded base: a tiny SmolVLA whose tokenizer knows the tasks' instructions; pretrained
    (and its tokenizer knowing the skills' instructions too) when `demo.pretrain_vision_steps` /
    `pretrain_skill_steps` > 0."""
    from kuavo_train.data.demo_world.pretraining import SKILLS
    from kuavo_train.logs import progress_bars
    from kuavo_train.policy.base_model import build_base_model
    from kuavo_train.policy.tiny_vlm import TinyVLMSpec
    from kuavo_train.training.pretrain import demo_world_pretraining

    d = cfg.demo
    instructions, pretrain, spec = [s.instruction for s in cfg.ordered_stages()], None, None
    if d.pretrain_vision_steps > 0 or d.pretrain_skill_steps > 0:
        pretrain = demo_world_pretraining(d, progress=progress_bars(cfg.logging.progress_bars))
        # the skills' words too, with room for them: at 512 tokens the tasks' instructions would be
        # split finer and task 1's cut at tokenizer_max_length
        instructions += [k.instruction for k in SKILLS]
        spec = TinyVLMSpec(image_size=d.image_size, vocab_size=768)
    return build_base_model(
        out,
        spec=spec,
        instructions=instructions,
        image_size=d.image_size,
        chunk_size=cfg.policy.chunk_size,
        n_action_steps=cfg.policy.n_action_steps,
        seed=cfg.seed,
        overwrite=overwrite,
        pretrain=pretrain,
    )


def cmd_make_data(args) -> None:
    from kuavo_train.data.demo_world import write_demo_world
    from kuavo_train.data.generated import generator_processes

    cfg = _run_config(["profile=demo", *args.overrides], args.config_dir)
    d = cfg.demo
    out = Path(args.out or cfg.data_root)
    tasks = args.tasks or [s.name for s in cfg.ordered_stages()]
    paths = write_demo_world(
        out,
        tasks=tasks,
        num_train_episodes=args.train_episodes if args.train_episodes is not None else d.num_train_episodes,
        num_val_episodes=args.val_episodes if args.val_episodes is not None else d.num_val_episodes,
        seed=args.seed if args.seed is not None else d.seed,
        image_size=d.image_size,
        overwrite=args.overwrite,
        workers=generator_processes(),
    )
    for p in paths if isinstance(paths, (list, tuple)) else [paths]:
        print(f"dataset: {p}")


def ensure_demo_inputs(cfg) -> None:
    """Build the embedded base and the demo datasets if they are not there yet. Under `accelerate
    launch` the main process builds them while the others wait: each building its own copy into
    the same folders would race (and run N generators on the same cores)."""
    import kuavo_train.processes as processes

    if cfg.demo is not None:
        processes.on_main(lambda: _build_missing_demo_inputs(cfg))


def _build_missing_demo_inputs(cfg) -> None:
    from kuavo_train.data.demo_world import write_demo_world
    from kuavo_train.data.generated import generator_processes
    from kuavo_train.policy.factory import PolicyLoadError, read_pretrained_config

    d = cfg.demo
    base_pretrained = Path(cfg.policy.pretrained_path)
    if not (base_pretrained / "model.safetensors").is_file():
        # Only the embedded base is built here: a pretrained_path elsewhere (a typo, a base not built
        # yet) is the user's model, which rebuilding demo.base_dir would neither make nor leave alone.
        if base_pretrained.resolve() == (Path(d.base_dir) / "pretrained_model").resolve():
            log.info("building the embedded base model in %s", d.base_dir)
            _build_demo_base(cfg, Path(d.base_dir), overwrite=True)
        elif base_pretrained.is_dir():
            raise PolicyLoadError(f"pretrained model {str(base_pretrained)!r} has no model.safetensors "
                                  f"(`kuavo-train build-base --out {base_pretrained.parent}` builds a base there)")
        else:
            read_pretrained_config(base_pretrained)  # a missing folder is one line; a cached hub id loads later
    missing = [s.name for s in cfg.ordered_stages() if not (Path(s.dataset.root) / "meta" / "info.json").is_file()]
    if missing:
        log.info("generating the Kuavo demo world datasets for %s in %s", ", ".join(missing), cfg.data_root)
        write_demo_world(
            Path(cfg.data_root),
            tasks=missing,
            num_train_episodes=d.num_train_episodes,
            num_val_episodes=d.num_val_episodes,
            seed=d.seed,
            image_size=d.image_size,
            workers=generator_processes(),
        )
    # Existing datasets are the user's (e.g. `make-data` with other sizes) and never rewritten; an
    # older, smaller default only means fewer distinct held-out scenes than evaluated episodes.
    from kuavo_train.data.demo_world.writer import META_FILE, load_scene_seeds

    episodes = max(cfg.evaluation.closed_loop_episodes, cfg.evaluation.final_episodes)
    for s in cfg.ordered_stages():
        if (Path(s.dataset.root) / "meta" / META_FILE).is_file() and \
                0 < len(scenes := load_scene_seeds(s.dataset.root)) < episodes:
            log.warning("%s has %d held-out scenes for %d closed-loop episodes: scenes are revisited with other "
                        "noise (`make clean-demo` regenerates the demo data with %d)", s.dataset.root, len(scenes),
                        episodes, d.num_val_episodes)


def cmd_train(args) -> None:
    from kuavo_train.config.loading import check_run_dir
    from kuavo_train.strategies import get_strategy
    from kuavo_train.training.pipeline import Pipeline

    cfg = _run_config(args.overrides, args.config_dir)
    check_run_dir(cfg.run_dir)
    get_strategy(cfg)  # its options' one-line errors before minutes of building the demo inputs, not after
    ensure_demo_inputs(cfg)
    Pipeline(cfg).run()


def cmd_demo(args) -> None:
    import time

    from kuavo_train.config.loading import check_run_dir
    from kuavo_train.strategies import get_strategy
    from kuavo_train.training.pipeline import Pipeline

    cfg = _run_config(["profile=demo", *args.overrides], args.config_dir)
    check_run_dir(cfg.run_dir)
    get_strategy(cfg)  # as in train
    t0 = time.perf_counter()
    ensure_demo_inputs(cfg)
    t1 = time.perf_counter()
    Pipeline(cfg).run()
    t2 = time.perf_counter()
    _after_training(cfg)
    t3 = time.perf_counter()
    print(f"demo wall time {_minutes(t3 - t0)}: base and datasets {_minutes(t1 - t0)}, stages with their "
          f"forgetting-matrix rows {_minutes(t2 - t1)} (each row's time is in train.log), report {_minutes(t3 - t2)}")


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


def _after_training(cfg) -> None:
    """The report of the run, ending with its final model's closed-loop success per task."""
    from kuavo_train.evaluation.run_evaluation import evaluate_run

    with _run_log(cfg):
        report = evaluate_run(cfg)
    rows = report["matrices"].get("success")
    if rows:
        # The last row of the success matrix: the final model on the same seeded held-out episodes
        # `kuavo-train infer` runs through the deployment wrapper (they agree episode by episode),
        # so they are not run a second time.
        episodes = cfg.evaluation.final_episodes
        print(f"final model of {cfg.run_dir}, closed loop in its simulator ({episodes} held-out scenes per task; "
              f"`kuavo-train infer --run {cfg.run_dir}` runs them through the deployment wrapper):")
        for name, rate in zip(report["task_names"], rows[-1]):
            print(f"  {name:<22} " + ("no simulator for this dataset" if rate is None else f"success {rate:.0%}"))
    print(f"report: {Path(cfg.run_dir) / 'report.md'} (matrices and metrics in report.json, figures *.png)")


def _print_infer(run_dir: Path, episodes: int, batch_size: int = 1) -> None:
    from kuavo_train.evaluation.closed_loop import infer_run

    results = infer_run(run_dir, episodes=episodes, batch_size=batch_size)
    print(f"final model of {run_dir}, closed loop in its simulator ({episodes} held-out scenes per task, "
          f"{min(batch_size, episodes)} at a time):")
    for name, rate in results.items():
        print(f"  {name:<22} " + ("no simulator for this dataset" if rate is None else f"success {rate:.0%}"))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def cmd_infer(args) -> None:
    from kuavo_train.run_state import RunState

    episodes, batch_size = args.episodes, args.batch_size
    if episodes is None or batch_size is None:
        # as the run's own final matrix row was evaluated, so that the numbers are the same
        ev = (RunState.load_existing(Path(args.run)).data.get("config") or {}).get("evaluation") or {}
        final = ev.get("closed_loop_final_episodes")  # None: closed_loop_episodes (EvaluationSettings.final_episodes)
        final = (ev.get("closed_loop_episodes") or 0) if final is None else final
        episodes = episodes or (final if final > 0 else 10)
        batch_size = batch_size or ((ev.get("closed_loop_batch_size") or 1) if final > 0 else 1)
    _print_infer(Path(args.run), episodes, batch_size)


def _csv(cast):
    """A comma-separated option as a list, each value once in the order given: a strategy or seed
    named twice would be one run counted twice, and its spread would look smaller than it is."""
    return lambda v: list(dict.fromkeys(cast(x) for x in v.split(",") if x))


def compare_strategies(named: list[str] | None) -> list[str]:
    """The strategies `compare` runs: the named ones, or every one with the recipe first (the first
    is the reference the others' differences are tested against)."""
    from kuavo_train.config.schema import DEFAULT_STRATEGY
    from kuavo_train.strategies import names

    return named or sorted(names(), key=lambda n: n != DEFAULT_STRATEGY)


def cmd_compare(args) -> None:
    from kuavo_train.benchmark.compare import run_comparison

    overrides = ["profile=demo", *args.overrides] if args.demo else list(args.overrides)
    if args.demo:
        ensure_demo_inputs(_run_config(overrides, args.config_dir))
    result = run_comparison(overrides, out_dir=Path(args.out), strategies=compare_strategies(args.strategies),
                            seeds=args.seeds, config_dir=args.config_dir)
    print(result["table"])
    print(f"comparison: {Path(args.out) / 'comparison.md'}")


def cmd_benchmark(args) -> None:
    from kuavo_train.benchmark.metaworld import DEFAULT_STRATEGIES, FULL, SMOKE, BenchmarkSpec, check_spec, run_benchmark

    sizes = dict(SMOKE if args.smoke else FULL)
    for name in sizes:
        if getattr(args, name, None) is not None:
            sizes[name] = getattr(args, name)
    # stock-observation runs get their own folders (their datasets and models differ from ours)
    name = "metaworld" + ("-stock" if args.observation == "stock" else "") + ("-smoke" if args.smoke else "")
    spec = BenchmarkSpec(tasks=args.tasks, strategies=args.strategies or list(DEFAULT_STRATEGIES), seeds=args.seeds,
                         state_mode=args.state,
                         observation=args.observation,
                         data_dir=Path(args.data or f"data/{name}"), out_dir=Path(args.out or f"outputs/{name}"),
                         data_seed=args.data_seed, overrides=list(args.overrides), overwrite_data=args.overwrite_data,
                         command="kuavo-train " + " ".join(sys.argv[1:]), **sizes)
    if args.workers is not None:
        spec.workers = args.workers
    spec.threads = args.threads
    check_spec(spec)  # bad task names etc. fail here, before any data or model is made
    result = run_benchmark(spec)
    print(result["markdown"])
    print(f"benchmark: {spec.out_dir / 'benchmark.md'} (and benchmark.json; one run directory per seed and strategy)")


def cmd_export_merged(args) -> None:
    from kuavo_train.policy import adapters
    from kuavo_train.wrapper.policy.smolvla import export_merged, resolve_pretrained_dir

    for name, path in export_merged(args.path, Path(args.out) if args.out else None).items():
        print(f"{name}: {path} (stock SmolVLA checkpoint: the base with this task's adapter merged)")
    sizes = adapters.adapter_bytes(resolve_pretrained_dir(args.path))  # after the export checked the adapters
    print("adapter size per task: " + ", ".join(f"{n} {b / 1024:.1f} KiB" for n, b in sizes.items()))


def cmd_register_vlm(args) -> None:
    from huggingface_hub import try_to_load_from_cache

    from kuavo_train.policy import factory, vlm_cache
    from kuavo_train.wrapper.policy.smolvla import resolve_pretrained_dir

    pretrained = resolve_pretrained_dir(args.path)
    cfg = factory.read_pretrained_config(pretrained)  # registers a bundled VLM in this machine's model cache
    if vlm_cache.is_embedded(cfg.vlm_model_name):
        print(f"{pretrained}: VLM {cfg.vlm_model_name} is resolvable on this machine (stock LeRobot can load it now)")
    else:  # a hub VLM is never bundled: nothing to register, and its files may or may not be here
        cached = isinstance(try_to_load_from_cache(cfg.vlm_model_name, "config.json"), str)  # else None or a marker
        where = ("in this machine's model cache" if cached
                 else "not in this machine's model cache: stock LeRobot downloads it")
        print(f"{pretrained}: VLM {cfg.vlm_model_name} is a hub model, not bundled (nothing to register); {where}")


def cmd_evaluate(args) -> None:
    from kuavo_train.evaluation.run_evaluation import evaluate_run

    if args.run is not None:
        cfg = _config_of_run(Path(args.run), args.overrides)
    else:
        cfg = _run_config(args.overrides, args.config_dir)
    with _run_log(cfg):
        evaluate_run(cfg)


def _run_log(cfg):
    """The run's train.log gets the lines of a command that evaluates it (rows made again, their
    times), as it has the training's; the main process writes it, as in training."""
    import contextlib

    import kuavo_train.processes as processes
    from kuavo_train.logs import LOG_FILE, logging_to

    run_log = Path(cfg.run_dir) / LOG_FILE
    return logging_to(run_log) if processes.is_main() and run_log.parent.is_dir() else contextlib.nullcontext()


def _config_of_run(run_dir: Path, overrides: list[str] = ()):
    """The config a run was trained with, as recorded in its run.json (its paths found from here),
    with `key=value` overrides of its fields (e.g. evaluation.closed_loop_episodes=20, data_root=)."""
    from kuavo_train.config.loading import recorded_config_with
    from kuavo_train.run_state import RUN_FILE, RunState

    return recorded_config_with(RunState.load_existing(run_dir).recorded_config(), list(overrides),
                                str(Path(run_dir) / RUN_FILE))


ENVIRONMENT_HELP = """\
environment:
  HF_ENDPOINT=URL     a Hugging Face mirror for hub downloads
  HF_HUB_OFFLINE=1    never contact a hub (models must be in the local cache or local folders)
"""

OVERRIDES_HELP = """\
common overrides (Hydra key=value; any config field works, see configs/policy/):
  profile=demo                    the embedded offline default (tiny base, demo world)
  task=all | task=tasks/<name>    every stage in order (skipping complete ones) or one stage
  run_dir=DIR                     where the run is written (resumed if it exists)
  data_root=DIR                   folder holding one dataset per task (<data_root>/<task name>)
  seed=N                          training seed
  strategy=NAME                   configs/policy/strategy/NAME.yaml: replay_freeze_decay (default, the
                                  spec's recipe; alias sequential_spec), sequential_naive, joint, ...
  policy.pretrained_path=DIR|HUB_ID   the base model (default lerobot/smolvla_base)
  stages.<task>.max_epoch=N, stages.<task>.optimizer_lr=X, dataloader.batch_size=N
""" + ENVIRONMENT_HELP

DEMO_INPUTS_HELP = """\
common overrides (Hydra key=value on top of profile=demo; see configs/policy/profile/demo.yaml):
  demo.seed=N                     seed of the generated scenes and of the base's pretraining
  demo.image_size=N               camera images N x N pixels
  demo.num_train_episodes=N, demo.num_val_episodes=N    demonstrations / held-out scenes per task
  demo.pretrain_vision_steps=N, demo.pretrain_skill_steps=N    the base's two pretraining phases
"""

EVALUATE_HELP = """\
common overrides (Hydra key=value; with --run, fields of the run's recorded config):
  run_dir=DIR                     the run (without --run: with the overrides that trained it)
  data_root=DIR                   folder holding one dataset per task (<data_root>/<task name>)
  evaluation.closed_loop_episodes=N    held-out scenes per task and row (0: no closed loop)
  evaluation.action_error_episodes=N   held-out episodes per task for the action error
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kuavo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", default=None, help="folder with smolvla_sequential_base.yaml (default: this checkout's configs/policy)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_, epilog=OVERRIDES_HELP):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        sp.add_argument("overrides", nargs="*", help="Hydra overrides key=value (see below)")
        # also accepted after the subcommand; SUPPRESS keeps a value given before it
        sp.add_argument("--config-dir", default=argparse.SUPPRESS, help="folder with smolvla_sequential_base.yaml")
        return sp

    add("demo", cmd_demo, "the full pipeline on the embedded offline default")
    add("train", cmd_train, "the sequential pipeline (task=all or task=tasks/<name>)")
    e = add("evaluate", cmd_evaluate, "forgetting matrices and report of a run (--run DIR, or the overrides that trained it)",
          EVALUATE_HELP + ENVIRONMENT_HELP)
    e.add_argument("--run", default=None, help="run directory: its recorded config is used, with any key=value "
                                                "overrides of its fields (e.g. evaluation.closed_loop_episodes=20, "
                                                "data_root=DIR)")
    b = add("build-base", cmd_build_base, "build the tiny offline SmolVLA base", DEMO_INPUTS_HELP)
    b.add_argument("--out", default=None, help="folder of the base (default: demo.base_dir, outputs/demo/base)")
    b.add_argument("--overwrite", action="store_true", help="replace a base already there")
    m = add("make-data", cmd_make_data, "generate the Kuavo demo world datasets", DEMO_INPUTS_HELP)
    m.add_argument("--out", default=None, help="folder of the datasets (default: data_root, outputs/demo/datasets)")
    m.add_argument("--tasks", nargs="+", default=None, help="space-separated task names (default: all four)")
    m.add_argument("--train-episodes", type=int, default=None, help="demonstrations per task (default: demo.num_train_episodes)")
    m.add_argument("--val-episodes", type=int, default=None, help="held-out scenes per task (default: demo.num_val_episodes)")
    m.add_argument("--seed", type=int, default=None, help="seed of the scenes (default: demo.seed)")
    m.add_argument("--overwrite", action="store_true", help="replace datasets already there")
    rv_help = "make a checkpoint's bundled tiny VLM resolvable on this machine (for stock LeRobot)"
    rv = sub.add_parser("register-vlm", help=rv_help, description=rv_help)
    rv.set_defaults(fn=cmd_register_vlm)
    rv.add_argument("path", help="run directory, checkpoint or pretrained_model/ folder")
    x_help = "one stock checkpoint per task of a model with per-task adapters (strategy lora_per_task)"
    x = sub.add_parser("export-merged", help=x_help, description=x_help)
    x.set_defaults(fn=cmd_export_merged)
    x.add_argument("path", help="run directory (its final model), checkpoint or pretrained_model/ folder")
    x.add_argument("--out", default=None, help="folder of the merged models (default for a run directory: its "
                                              "merged/; needed for a checkpoint)")
    i = sub.add_parser("infer", help="closed-loop success of a run's final model in its simulator (demo world, "
                                     "MetaWorld), through the deployment wrapper",
                       description="Closed-loop success per task of a run's final model, through the inference "
                                   "wrapper, on the held-out scenes its forgetting matrix used. With neither option "
                                   "it runs the episodes of the run's final matrix row, so its numbers are that row's.")
    i.set_defaults(fn=cmd_infer)
    i.add_argument("--run", default="outputs/demo/run", help="run directory (default: the demo run)")
    i.add_argument("--episodes", type=_positive_int, default=None,
                   help="held-out scenes per task (default: the run's final-row episodes, or 10 if it had none)")
    i.add_argument("--batch-size", type=_positive_int, default=None,
                   help="episodes stepped together (lerobot-eval's --eval.batch_size; other noise, same scenes; "
                        "default: the run's evaluation.closed_loop_batch_size, or 1)")
    c = add("compare", cmd_compare, "run several strategies (and seeds) on the same data and tabulate them")
    # comma-separated, so that Hydra overrides may follow the options
    c.add_argument("--strategies", type=_csv(str), default=None,
                   help="comma-separated; the first is the reference the others are tested against (default: "
                        "every strategy in configs/policy/strategy/, aliases aside, replay_freeze_decay first)")
    c.add_argument("--seeds", type=_csv(int), default=[0], help="comma-separated, e.g. 0,1 (default: 0)")
    c.add_argument("--out", default="outputs/demo/compare",
                   help="folder of the runs and comparison.md (default: outputs/demo/compare)")
    c.add_argument("--no-demo", dest="demo", action="store_false", help="do not apply profile=demo")
    bm = sub.add_parser("benchmark", help="closed-loop benchmark in a simulator we did not write (MetaWorld)",
                        description="Generate scripted-expert MetaWorld datasets, train the strategies (--strategies) "
                                    "on the task sequence with the same pipeline, evaluate each stage closed loop on "
                                    "held-out seeds.")
    bm.set_defaults(fn=cmd_benchmark)
    bm.add_argument("suite", choices=["metaworld"])
    bm.add_argument("overrides", nargs="*", help="Hydra overrides key=value on top of profile=metaworld, right after "
                                                 "'metaworld' (before the options)")
    bm.add_argument("--tasks", type=lambda v: [x for x in v.split(",") if x], default=["push-v3", "pick-place-v3", "drawer-open-v3", "door-open-v3"],
                    help="comma-separated MetaWorld v3 task names with a scripted expert, in training order")
    bm.add_argument("--strategies", type=_csv(str), default=None,
                    help="comma-separated (default: replay_freeze_decay,sequential_naive,joint)")
    bm.add_argument("--seeds", type=_csv(int), default=[0], help="training seeds, e.g. 0,1")
    bm.add_argument("--episodes", type=int, default=None, help="held-out seeds evaluated per task after each earlier stage (full: 10)")
    bm.add_argument("--final-episodes", dest="final_episodes", type=int, default=None,
                    help="held-out seeds evaluated per task for the final model (full: 20)")
    bm.add_argument("--train-episodes", dest="train_episodes", type=int, default=None, help="expert demos per task (full: 40)")
    bm.add_argument("--eval-seeds", dest="eval_seeds", type=int, default=None, help="held-out seeds stored per task (full: 20)")
    bm.add_argument("--epochs", type=int, default=None, help="epochs per stage (full: see benchmark/metaworld.py FULL)")
    bm.add_argument("--state", choices=["full", "agent"], default=None,
                    help="observation.state: the full 39-dim MetaWorld observation (default) or the 4-dim agent state")
    bm.add_argument("--observation", choices=["ours", "stock"], default="ours",
                    help="ours (default) or stock: LeRobot's own metaworld env (its camera, flips, 4-dim agent state, "
                         "instructions, 500 steps), recorded and evaluated in it, comparable with "
                         "lerobot-eval --env.type=metaworld (default folders data/metaworld-stock, outputs/metaworld-stock)")
    bm.add_argument("--workers", type=int, default=None,
                    help="processes for simulator episodes, recording and evaluating (default: "
                         "KUAVO_METAWORLD_WORKERS, or min(2, CPUs))")
    bm.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1: see BenchmarkSpec.threads)")
    bm.add_argument("--data", default=None, help="dataset folder (default data/metaworld, with -stock and -smoke "
                                                 "added for --observation stock and --smoke)")
    bm.add_argument("--out", default=None, help="output folder (default outputs/metaworld, with -stock and -smoke "
                                                "added likewise)")
    bm.add_argument("--data-seed", dest="data_seed", type=int, default=0, help="seed of the training and held-out scenes")
    bm.add_argument("--overwrite-data", dest="overwrite_data", action="store_true",
                    help="generate the datasets again even if they match (on a resumed call too)")
    bm.add_argument("--smoke", action="store_true", help="CI size: 1 demo and 1 evaluation episode per task, 1 epoch per stage")
    from kuavo_train.cli.convert import add_convert_parser

    add_convert_parser(sub)
    return p


def offline_if_embedded(argv: list[str], *, demo_command: bool = False) -> None:
    """The embedded default never needs a model hub: go offline before huggingface_hub is
    imported (it reads the setting once), or every file lookup retries a host that is not
    there. An explicit HF_HUB_OFFLINE from the user always wins."""
    import os

    embedded = demo_command or "profile=demo" in argv
    if "--run" in argv and argv.index("--run") + 1 < len(argv):
        from kuavo_train.run_state import RunState

        try:
            state = RunState.load(Path(argv[argv.index("--run") + 1]))
            run_cfg = state.data.get("config", {})
            # the demo's runs and the MetaWorld benchmark's (its datasets carry meta/metaworld.json) use the local tiny base
            embedded |= run_cfg.get("demo") is not None or any(
                (state.recorded_path(s["dataset"]["root"]) / "meta" / "metaworld.json").is_file()
                for s in run_cfg.get("stages", {}).values())
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if embedded:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    import kuavo_train.processes as processes
    from kuavo_train.cli.errors import one_line_errors

    args = build_parser().parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    offline_if_embedded(raw, demo_command=args.command in ("demo", "build-base", "make-data", "benchmark")
                        or (args.command == "compare" and args.demo))
    _setup_logging()
    with one_line_errors():
        args.fn(args)
    processes.finish()


if __name__ == "__main__":
    main()
