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


def check_config_files() -> None:
    """@hydra.main composes before main() runs and turns a YAML syntax error or an unknown
    strategy into a traceback: check them first, for one line naming the file and the line."""
    from kuavo_train.cli.errors import one_line_errors
    from kuavo_train.config.loading import check_strategy_override, check_yaml_files

    dirs = _config_dirs(sys.argv[1:])
    with one_line_errors():
        check_yaml_files(dirs)
        check_strategy_override(sys.argv[1:], dirs[0])


@hydra.main(version_base="1.3", config_path="../configs/policy", config_name="smolvla_sequential_base")
def main(cfg: DictConfig) -> None:
    from kuavo_train.cli.errors import one_line_errors
    from kuavo_train.logs import quiet
    from kuavo_train.config.loading import check_run_dir, to_run_config
    from kuavo_train.training.pipeline import Pipeline

    quiet()
    with one_line_errors():
        run_cfg = to_run_config(cfg)
        check_run_dir(run_cfg.run_dir)
        Pipeline(run_cfg).run()


if __name__ == "__main__":
    check_config_files()
    main()
