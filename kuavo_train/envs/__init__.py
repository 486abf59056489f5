"""Our simulators for stock LeRobot: gymnasium environments and their `EnvConfig` types.

`--env.type=kuavo_demo` (the Kuavo demo world) and `--env.type=kuavo_metaworld` (MetaWorld
as our benchmark trains on it) are registered on import. Stock `lerobot-eval` imports this
package through the `lerobot_env_kuavo` plugin distribution (plugins/lerobot_env_kuavo),
and our own closed-loop evaluation runs the same environments with the same seeding
(rollout.py, seeding.py).
"""

from kuavo_train.envs.configs import KuavoDemoEnvConfig, KuavoMetaWorldEnvConfig

__all__ = ["KuavoDemoEnvConfig", "KuavoMetaWorldEnvConfig"]
