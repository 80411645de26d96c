"""Routing policies: the one batched interface every way of choosing routes answers, and the
saved-policy registry (``load_policy``). PPO policies and routers register here too. Names are
imported on first use (PEP 562), so ``layerroute.policies.commands`` stays light; using any of
them registers the PPO policy type."""

from importlib import import_module

_FROM = {**dict.fromkeys(("POLICIES", "PolicyError", "RoutingPolicy", "StaticPolicy", "load_policy",
                          "register_policy"), ".base"), "PPOPolicy": ".ppo_policy"}
__all__ = sorted(_FROM)


def __getattr__(name):
    if name in _FROM:
        import_module(".ppo_policy", __name__)  # registers the "ppo" policy type
        return getattr(import_module(_FROM[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
