"""Compose the Hydra config (CLI or Python) and turn it into a validated RunConfig."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kuavo_train.config.schema import BASE_FILE, ConfigError, ConfigSyntaxError, RunConfig, parse_run_config
from kuavo_train.errors import first_line

CONFIG_NAME = "smolvla_sequential_base"


def default_config_dir() -> Path:
    """`configs/policy` of this checkout (the package is installed in editable mode)."""
    return Path(__file__).resolve().parents[2] / "configs" / "policy"


def compose(overrides: list[str] | None = None, config_dir: str | Path | None = None) -> DictConfig:
    """Hydra composition without @hydra.main, for the `kuavo-train` CLI and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir or default_config_dir()).resolve()
    if not (config_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError("--config-dir", str(config_dir), f"no {CONFIG_NAME}.yaml in {config_dir}")
    check_strategy_override(overrides or [], config_dir)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides or []))
    except yaml.YAMLError as exc:  # a config file that is not YAML (OmegaConf.load raises PyYAML's error as is)
        raise yaml_syntax_error(exc) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError("overrides", BASE_FILE, first_line(exc)) from None


def check_strategy_override(overrides: list[str], config_dir: Path) -> None:
    """`strategy=X` names a file of the strategy config group: say which ones exist."""
    known = sorted(p.stem for p in (config_dir / "strategy").glob("*.yaml"))
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "strategy" and value and value not in known:
            raise ConfigError("strategy", BASE_FILE, f"unknown strategy {value!r} (choose one of {', '.join(known)}; "
                                                     f"each is a file of configs/policy/strategy/)")


def yaml_syntax_error(exc: yaml.YAMLError, path: str | Path | None = None) -> ConfigSyntaxError:
    """PyYAML's multi-line error as one line naming the file and the line."""
    mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
    problem_mark = getattr(exc, "problem_mark", None)
    source = str(path or (mark.name if mark is not None else "<config>"))
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    problem = ", ".join(p for p in parts if p) or str(exc).strip().splitlines()[0]
    if problem_mark is not None and mark is not problem_mark:
        problem += f" (at line {problem_mark.line + 1}, column {problem_mark.column + 1})"
    elif mark is not None:
        problem += f" (column {mark.column + 1})"
    return ConfigSyntaxError(source, mark.line + 1 if mark is not None else None, problem)


def check_yaml_files(config_dirs: list[str | Path]) -> None:
    """YAML syntax of every config file in these folders, one line naming the first bad file and line.

    For the spec entry point, whose @hydra.main composes before our code runs (Hydra
    would print the parser's traceback); the CLI catches the same error in `compose`."""
    from omegaconf._utils import get_yaml_loader

    for d in config_dirs:
        for path in sorted(Path(d).rglob("*.yaml")):
            try:
                with open(path, encoding="utf-8") as f:
                    yaml.load(f, Loader=get_yaml_loader())
            except yaml.YAMLError as exc:
                raise yaml_syntax_error(exc, path) from None
            except (OSError, UnicodeDecodeError):
                continue  # Hydra reports unreadable files itself


def check_run_dir(run_dir: str | Path) -> None:
    """run_dir must be (or be creatable as) a writable folder; checked before anything is written."""
    path = Path(run_dir).expanduser().absolute()

    def fail(problem: str):
        raise ConfigError("run_dir", BASE_FILE, problem)

    def exists(p: Path) -> bool:
        try:
            return p.exists()
        except OSError:  # e.g. a parent we may not search: reported below as not writable
            return False

    if exists(path) and not path.is_dir():
        fail(f"{run_dir} is an existing file, not a folder")
    existing = path
    while not exists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        fail(f"cannot create {run_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"{run_dir} is" if existing == path else f"cannot create {run_dir}: {existing} is"
        fail(f"{what} not writable (read-only)")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and validate; every problem becomes a one-line ConfigError."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "<config>"
        msg = first_line(exc)
        raise ConfigError(str(key), BASE_FILE, msg) from None
    container.pop("hydra", None)
    return parse_run_config(container)


def load_run_config(overrides: list[str] | None = None, config_dir: str | Path | None = None) -> RunConfig:
    return to_run_config(compose(overrides, config_dir))


_MISSING = object()


def recorded_config_with(recorded: dict, overrides: list[str], source: str) -> RunConfig:
    """A run's recorded config (`RunState.recorded_config`) with `key=value` overrides of its own
    fields (Hydra's value syntax). There is no config tree to compose here, so config groups
    (`profile=`, `strategy=`) and added or deleted keys are refused. `data_root=` moves every
    dataset the recorded data_root held (`<data_root>/<task>`, where the task configs place them)."""
    cfg = OmegaConf.create(recorded)
    OmegaConf.set_struct(cfg, True)
    old_root = recorded.get("data_root")
    for item in overrides:
        key, sep, value = item.partition("=")
        found = OmegaConf.select(cfg, key, default=_MISSING) if sep and not key.startswith(("+", "~")) else _MISSING
        if found is _MISSING or OmegaConf.is_dict(found):
            raise ConfigError("overrides", source, f"{item!r}: with --run, give key=value for a field of the run's "
                              "recorded config (config groups, added and deleted keys need the config tree: "
                              "evaluate without --run)")
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
        except (yaml.YAMLError, OmegaConfBaseException) as exc:
            raise ConfigError(key, source, first_line(exc)) from None
        if key == "data_root" and old_root is not None:
            for name, stage in cfg.stages.items():
                if Path(str(stage.dataset.root)) == Path(old_root) / name:
                    stage.dataset.root = str(Path(str(cfg.data_root)) / name)
    try:
        return to_run_config(cfg)
    except ConfigError as exc:  # the value comes from the recorded config or these overrides, not a config file
        raise ConfigError(exc.field_path, source, exc.problem) from None
