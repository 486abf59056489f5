"""Compose the Hydra config (CLI or Python) and turn it into a validated RunConfig."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kuavo_train.config.schema import BASE_FILE, ConfigError, RunConfig, parse_run_config

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
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("overrides", BASE_FILE, first) from None


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and validate; every problem becomes a one-line ConfigError."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "<config>"
        msg = str(exc).strip().splitlines()[0]
        raise ConfigError(str(key), BASE_FILE, msg) from None
    container.pop("hydra", None)
    return parse_run_config(container)


def load_run_config(overrides: list[str] | None = None, config_dir: str | Path | None = None) -> RunConfig:
    return to_run_config(compose(overrides, config_dir))
