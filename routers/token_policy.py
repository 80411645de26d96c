"""Per-token routers as a routing policy: ``evaluate`` (and ``layerroute eval --router DIR``) scores a
task with the routers deciding per token and block, at prefill and at every decoded token.

Every sample keeps the identity route (``route_batch``); the decisions happen inside the blocks:
``token_executor`` gives ``evaluate`` a ``layerroute.token_walk.DecidingExecutor`` that decides from
the state entering each block (``TokenDecisions``) and runs the blocks token-sparse under the
routers' rule, and counts the realised executed blocks per token. Under kv-kept a skipped pair
still costs its K/V projections (``experiments/bench_token_sparse.py`` counts them).
"""

from __future__ import annotations

from pathlib import Path

from layerroute.executor import RouteExecutor
from layerroute.policies.base import RoutingPolicy, register_policy
from layerroute.token_walk import DecidingExecutor

from .network import RouterError
from .token_router import (CONFIG_NAME, RULES, TokenDecisions, TokenRouterNetwork, check_threshold, load_token_routers,
                           save_token_routers)


class TokenRoutingExecutor(DecidingExecutor):
    """``base``'s model, with every walk decided per token by ``routers`` and run under ``rule``."""

    def __init__(self, base: RouteExecutor, routers: TokenRouterNetwork, rule: str, threshold: float | None = None):
        super().__init__(base, rule)
        self.routers, self.threshold = routers, threshold

    def decider(self, state, real):
        return TokenDecisions(self.routers, self.threshold)


@register_policy
class TokenRouterPolicy(RoutingPolicy):
    """Per-token routers as a routing policy (``layerroute eval --router DIR`` with a token-router directory)."""

    type = "token_router"

    def __init__(self, net: TokenRouterNetwork, *, rule: str | None = None, threshold: float | None = None):
        self.net = net
        self.rule = net.config.rule if rule is None else rule
        if self.rule not in RULES:
            raise RouterError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        self.threshold = None if threshold is None else check_threshold(threshold)

    @classmethod
    def load(cls, directory: str | Path, executor: RouteExecutor, *, rule: str | None = None,
             threshold: float | None = None) -> TokenRouterPolicy:
        """The token routers in ``directory``, checked against ``executor``'s model (one ``RouterError`` line)."""
        return cls(load_token_routers(directory, executor.model), rule=rule, threshold=threshold)

    def route_batch(self, executor, input_ids, attention_mask):
        return [executor.route(None)] * input_ids.shape[0]

    def token_executor(self, executor: RouteExecutor) -> TokenRoutingExecutor:
        """An executor on ``executor``'s model whose walks these routers decide per token (fresh counts)."""
        return TokenRoutingExecutor(executor, self.net, self.rule, self.threshold)

    def config(self) -> dict:
        return {"model": dict(self.net.config.model), "token_router_config": CONFIG_NAME, "rule": self.rule,
                "threshold": self.threshold}

    @classmethod
    def from_config(cls, config, directory, executor):
        return cls.load(directory, executor, rule=config.get("rule"), threshold=config.get("threshold"))

    def save_weights(self, directory: Path) -> None:
        save_token_routers(directory, self.net)


__all__ = ["TokenRouterPolicy", "TokenRoutingExecutor"]
