"""Routing policies: the one batched interface every way of choosing routes answers, and the
saved-policy registry (``load_policy``). PPO policies and routers register here too. Names are
imported on first use (PEP 562), so ``layerroute.policies.commands`` stays light; using any of
them registers the PPO policy type."""

from layerroute.lazy import lazy_attributes

_FROM = {**dict.fromkeys(("POLICIES", "PolicyError", "RoutingPolicy", "StaticPolicy", "load_policy",
                          "register_policy"), ".base"), "PPOPolicy": ".ppo_policy"}
__all__ = sorted(_FROM)
__getattr__ = lazy_attributes(__name__, _FROM, first=(".ppo_policy",))  # (it registers the "ppo" policy type)
