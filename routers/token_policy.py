"""Per-token routers as a routing policy: ``evaluate`` (and ``layerroute eval --router DIR``) scores a
task with the routers deciding per token and block, at prefill and at every decoded token.

Every sample keeps the identity route (``route_batch``); the decisions happen inside the blocks.
``evaluate`` asks the policy for its ``token_executor``: a ``RouteExecutor`` on the same frozen
model whose ``advance`` runs every walk token-sparse under the routers' rule, deciding from the
state entering each block (``TokenDecisions``). So the one scoring path (``layerroute.scoring``:
letter rows, packed cloze rows, gold continuations, cached greedy decoding) runs per-token
routed without a new argument, and cached decoding stays exact under the rule.

The executor counts the executed (token, block) pairs of real (unpadded) tokens over everything
it ran; ``executed_blocks()`` is the realised mean of executed blocks per token, which
``evaluate`` reports in place of blocks per sample. Under kv-kept a skipped pair still costs its
K/V projections (``experiments/bench_token_sparse.py`` counts them).
"""

from __future__ import annotations

from pathlib import Path

from layerroute.errors import RouteError
from layerroute.executor import RouteExecutor
from layerroute.policies.base import RoutingPolicy, register_policy
from layerroute.scoring import packing_verdict, set_packing_verdict
from layerroute.sparse import DENSE

from .network import RouterError
from .token_router import (CONFIG_NAME, RULES, TokenDecisions, TokenRouterNetwork, check_threshold, load_token_routers,
                           save_token_routers)


class TokenRoutingExecutor(RouteExecutor):
    """``base``'s model, with every walk decided per token by ``routers`` and run under ``rule``."""

    def __init__(self, base: RouteExecutor, routers: TokenRouterNetwork, rule: str, threshold: float | None = None):
        super().__init__(base.model, verify=False)
        self.check = base.check  # the same model, checked when ``base`` was made
        self.routers, self.rule, self.threshold = routers, rule, threshold
        self.executed = 0  # executed (real token, block) pairs
        self.pairs = 0  # real (token, block) pairs walked

    def advance(self, state, chains, *, token_mask=None, cache=None, record=None, token_rule: str = DENSE):
        if token_mask is not None:  # a caller's own mask runs as given
            return super().advance(state, chains, token_mask=token_mask, cache=cache, record=record,
                                   token_rule=token_rule)
        real = state.attention_mask[:, -state.hidden.shape[1]:]  # [B, q] the real tokens of this call
        decide = TokenDecisions(self.routers, self.threshold)

        def counted(layer, hidden):
            keep = decide(layer, hidden)
            if keep.shape != real.shape:
                raise RouteError("per-token routers run every sample along the identity route (its blocks are "
                                 "decided per token); a route that skips or repeats blocks cannot be combined "
                                 "with them")
            self.executed += int((keep & real).sum())
            self.pairs += int(real.sum())
            return keep

        return super().advance(state, chains, token_mask=counted, cache=cache, record=record, token_rule=self.rule)

    def executed_blocks(self) -> float:
        """Mean executed blocks per real token over every walk so far (nan before any)."""
        return self.num_layers * self.executed / self.pairs if self.pairs else float("nan")


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
        routed = TokenRoutingExecutor(executor, self.net, self.rule, self.threshold)
        verdict = packing_verdict(executor)
        if verdict is not None:  # packing is a property of the model, checked on the plain walk
            set_packing_verdict(routed, verdict)
        return routed

    def config(self) -> dict:
        return {"model": dict(self.net.config.model), "token_router_config": CONFIG_NAME, "rule": self.rule,
                "threshold": self.threshold}

    @classmethod
    def from_config(cls, config, directory, executor):
        return cls.load(directory, executor, rule=config.get("rule"), threshold=config.get("threshold"))

    def save_weights(self, directory: Path) -> None:
        save_token_routers(directory, self.net)


__all__ = ["TokenRouterPolicy", "TokenRoutingExecutor"]
