"""Gymnasium environments that treat layer routing as a Markov decision process.

``gym.make("layerroute/LayerRouting-v0")`` builds ``LayerRoutingEnv`` (with no arguments: the
embedded SmolLM2-135M and a generated task); ``LayerRoutingVecEnv`` is its batched SB3
``VecEnv``. The MDP (modes, observation, budget rules) is defined in ``layerroute.envs.mdp``.
"""

from gymnasium.envs.registration import register, registry

ENV_ID = "layerroute/LayerRouting-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="layerroute.envs.routing_env:LayerRoutingEnv")


def __getattr__(name):  # the envs import SB3 and the objective: load them on first use
    if name in ("LayerRoutingEnv", "LayerRoutingVecEnv", "RoutingCore", "build_core"):
        from . import routing_env

        return getattr(routing_env, name)
    raise AttributeError(name)


__all__ = ["ENV_ID", "LayerRoutingEnv", "LayerRoutingVecEnv", "RoutingCore", "build_core"]
