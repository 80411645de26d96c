"""Routing policies: the one batched interface every way of choosing routes answers, and the
saved-policy registry (``load_policy``). PPO policies and routers register here too."""

from .base import POLICIES, PolicyError, RoutingPolicy, StaticPolicy, load_policy, register_policy
from .ppo_policy import PPOPolicy

__all__ = ["POLICIES", "PPOPolicy", "PolicyError", "RoutingPolicy", "StaticPolicy", "load_policy", "register_policy"]
