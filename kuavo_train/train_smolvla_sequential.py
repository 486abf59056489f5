"""Sequential multi-task SmolVLA training, the spec's entry point (section 7).

    python kuavo_train/train_smolvla_sequential.py --config-path=../configs/policy \
        --config-name=smolvla_sequential_base task=tasks/task1_moving_grasp

`task=all` (the default) trains every stage in order and skips finished ones.
"""

import sys

from kuavo_train.cli.main import offline_if_embedded

offline_if_embedded(sys.argv[1:])  # before hydra/huggingface_hub are imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs/policy", config_name="smolvla_sequential_base")
def main(cfg: DictConfig) -> None:
    from kuavo_train.cli.errors import one_line_errors
    from kuavo_train.cli.main import quiet
    from kuavo_train.config.loading import to_run_config
    from kuavo_train.training.pipeline import Pipeline

    quiet()
    with one_line_errors():
        Pipeline(to_run_config(cfg)).run()


if __name__ == "__main__":
    main()
