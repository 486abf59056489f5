"""Sequential multi-task SmolVLA training, the spec's entry point (section 7).

    python kuavo_train/train_smolvla_sequential.py --config-path=../configs/policy \
        --config-name=smolvla_sequential_base task=tasks/task1_moving_grasp

`task=all` (the default) trains every stage in order and skips finished ones.
"""

import sys
from pathlib import Path

from kuavo_train.cli.main import offline_if_embedded

offline_if_embedded(sys.argv[1:])  # before hydra/huggingface_hub are imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

HERE = Path(__file__).resolve().parent


def _config_dirs(argv: list[str]) -> list[Path]:
    """The folders Hydra will read configs from: --config-path (relative to this file) and --config-dir."""
    dirs = {"--config-path": ["../configs/policy"], "--config-dir": []}
    short = {"-cp": "--config-path", "-cd": "--config-dir"}
    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        name = short.get(name, name)
        if name in dirs:
            value = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                dirs[name] = [value] if name == "--config-path" else [*dirs[name], value]
    return [HERE / d for d in dirs["--config-path"]] + [Path(d) for d in dirs["--config-dir"]]


# Hydra's own flags that take a value (as `--flag=value` or `--flag value`).
_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


def _plain_overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides when the command is a plain run of the default config (what the
    `kuavo-train` CLI composes the same way); None for anything else Hydra handles itself (another
    config name, extra config dirs, --multirun, --cfg, --help...)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name, sep, value = arg.partition("=")
        if name in _VALUE_FLAGS:
            value = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
            skip = not sep
            if name in ("--config-dir", "-cd") or (name in ("--config-name", "-cn") and value != "smolvla_sequential_base"):
                return None
        elif arg.startswith("-"):
            return None
        elif not name.lstrip("+~").startswith("hydra."):
            out.append(arg)
    return out


def check_config_files() -> None:
    """@hydra.main composes before main() runs and turns a YAML syntax error, an unknown strategy
    or a key the config does not have into a traceback or a many-line report: check them first
    (composing the same config as the `kuavo-train` CLI does), for one line naming the file and
    the field."""
    from kuavo_train.cli.errors import one_line_errors
    from kuavo_train.config.loading import CONFIG_NAME, check_strategy_override, check_yaml_files, load_run_config
    from kuavo_train.config.schema import ConfigError
    from kuavo_train.strategies import get_strategy

    dirs = _config_dirs(sys.argv[1:])
    with one_line_errors():
        if not (dirs[0] / f"{CONFIG_NAME}.yaml").is_file():  # Hydra resolves it from this file's folder
            raise ConfigError("--config-path", str(dirs[0].resolve()),
                              f"no {CONFIG_NAME}.yaml in {dirs[0].resolve()} (a relative --config-path is relative "
                              f"to {HERE}, not to the current folder)")
        check_yaml_files(dirs)
        check_strategy_override(sys.argv[1:], dirs[0])
        overrides = _plain_overrides(sys.argv[1:])
        if overrides is not None:
            get_strategy(load_run_config(overrides, dirs[0]))  # its options and its learning rates


@hydra.main(version_base="1.3", config_path="../configs/policy", config_name="smolvla_sequential_base")
def main(cfg: DictConfig) -> None:
    import kuavo_train.processes as processes
    from kuavo_train.cli.errors import one_line_errors
    from kuavo_train.logs import quiet
    from kuavo_train.config.loading import check_run_dir, to_run_config
    from kuavo_train.training.pipeline import Pipeline

    quiet()
    with one_line_errors():
        run_cfg = to_run_config(cfg)
        check_run_dir(run_cfg.run_dir)
        Pipeline(run_cfg).run()
    processes.finish()  # under accelerate launch, as kuavo-train does


if __name__ == "__main__":
    check_config_files()
    main()
