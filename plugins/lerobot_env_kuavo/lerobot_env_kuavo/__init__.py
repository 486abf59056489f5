"""Imported by stock LeRobot at the start of `lerobot-eval` / `lerobot-train`
(`lerobot.utils.import_utils.register_third_party_plugins`): registers
`--env.type=kuavo_demo` and `--env.type=kuavo_metaworld`.

It also makes a kuavo_train checkpoint given as `--policy.path` loadable on its own: a
checkpoint of the embedded tiny base names its VLM by a local id that exists on no hub,
so the bundled copy (`pretrained_model/vlm/`) is registered in the Hugging Face cache
when missing, and the process goes offline (every lookup of that id is local).
"""

import json
import logging
import sys
from pathlib import Path

import kuavo_train.envs  # noqa: F401  (registers the env types)


def _policy_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--policy.path="):
            return arg.split("=", 1)[1]
        if arg == "--policy.path" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _prepare_embedded_vlm(argv: list[str]) -> None:
    path = _policy_path(argv)
    if not path or not (Path(path) / "config.json").is_file():
        return
    try:
        from kuavo_train.policy import vlm_cache

        name = json.loads((Path(path) / "config.json").read_text()).get("vlm_model_name")
        if vlm_cache.is_embedded(name):
            vlm_cache.ensure_available(name, path)
    except Exception as exc:  # never stop stock LeRobot; its own loading error will say more
        logging.warning("lerobot_env_kuavo: could not prepare the embedded VLM of %s: %s", path, exc)


_prepare_embedded_vlm(sys.argv[1:])
