"""An executor whose every walk is decided per token: the seam per-token policies plug into ``evaluate``.

A per-token policy (trained token routers, ``routers/token_policy.py``; a ``per_token`` PPO policy,
``policies/ppo_policy.py``) routes every sample along the identity route and decides, inside each
block, which tokens execute it. ``evaluate`` asks such a policy for its ``token_executor(executor)``:
a ``DecidingExecutor`` on the same frozen model whose ``advance`` makes a fresh decider for the call
(``decider(state, real)``, a callable ``(layer, hidden [B, q, H]) -> bool [B, q]``, as the executor's
``token_mask`` takes) and runs the blocks token-sparse under ``rule``. So the one scoring path
(``layerroute.scoring``: letter rows, packed cloze rows, gold continuations, cached greedy decoding) is
routed per token without a new argument, and cached decoding stays exact under the rule.

It counts the executed (token, block) pairs of real (unpadded) tokens over every walk;
``executed_blocks()`` is the realised mean of executed blocks per token, which ``evaluate`` reports in
place of blocks per sample.
"""

from __future__ import annotations

import torch

from .errors import RouteError
from .executor import RouteExecutor, RouteState
from .scoring import packing_verdict, set_packing_verdict
from .sparse import DENSE, check_rule


class DecidingExecutor(RouteExecutor):
    """``base``'s model, every walk decided per token by ``decider`` and run under ``rule``.
    Subclasses implement ``decider``."""

    def __init__(self, base: RouteExecutor, rule: str):
        super().__init__(base.model, verify=False)
        self.check = base.check  # the same model, checked when ``base`` was made
        if packing_verdict(base) is not None:  # packing is a property of the model, checked on the plain walk
            set_packing_verdict(self, packing_verdict(base))
        self.rule = check_rule(rule)
        self.executed = 0  # executed (real token, block) pairs
        self.pairs = 0  # real (token, block) pairs walked

    def decider(self, state: RouteState, real: torch.Tensor):
        """A callable ``(layer, hidden [B, q, H]) -> bool [B, q]`` for one walk from ``state``;
        ``real`` [B, q] marks the call's real tokens."""
        raise NotImplementedError

    def advance(self, state, chains, *, token_mask=None, cache=None, record=None, token_rule: str = DENSE):
        if token_mask is not None:  # a caller's own mask runs as given
            return super().advance(state, chains, token_mask=token_mask, cache=cache, record=record,
                                   token_rule=token_rule)
        real = state.attention_mask[:, -state.hidden.shape[1]:]  # [B, q] the real tokens of this call
        decide = self.decider(state, real)

        def counted(layer, hidden):
            keep = decide(layer, hidden)
            if keep.shape != real.shape:
                raise RouteError("per-token policies run every sample along the identity route (its blocks are "
                                 "decided per token); a route that skips or repeats blocks cannot be combined "
                                 "with them")
            self.executed += int((keep & real).sum())
            self.pairs += int(real.sum())
            return keep

        return super().advance(state, chains, token_mask=counted, cache=cache, record=record, token_rule=self.rule)

    def executed_blocks(self) -> float:
        """Mean executed blocks per real token over every walk so far (nan before any)."""
        return self.num_layers * self.executed / self.pairs if self.pairs else float("nan")
