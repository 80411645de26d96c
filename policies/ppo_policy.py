"""``PPOPolicy``: a trained PPO actor as a ``RoutingPolicy`` (torch and safetensors only).

Saved as ``policy_config.json`` (type ``ppo``, the model fingerprint and weights digest, the MDP mode and limits,
the observation projection's size, the network's shape) plus ``policy.safetensors`` (the
actor's weights and the projection). Loading rebuilds the network and reads the tensors;
nothing is unpickled, and SB3 is not needed. ``route_batch`` walks the model with the
executor, reads each prompt's hidden state before every decision, and acts greedily (argmax);
in ``edit`` mode it walks the full route once (the observed states), then edits it greedily.

A ``per_token`` policy decides token groups, not routes: every sample keeps the identity route, and
``token_executor`` gives ``evaluate`` a ``PerTokenPPOExecutor`` that takes the env's decisions inside
the blocks (``envs/routing_env.py``'s ``_token_step``): before block ``t`` each row's state, pooled over
its real tokens, is observed with ``t`` and the compute so far; the actor's greedy bits (logit > 0,
SB3's deterministic MultiBinary) pick which of the row's ``G`` contiguous token groups run the block
(kv-kept); a block whose chosen tokens would break the budget, or that none chose, is skipped by
every token. Where evaluation differs from the env: the env pools a sample's prompt tokens, here a
row's real tokens (the same rows for letter questions; cloze and gold-continuation rows add their
continuation); a sample with several rows decides per row; and a decoded token belongs to the last
group, so it runs the blocks whose last group ran at the prefill.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from layerroute.envs.mdp import MDPSpec, ObsProjection, Progress, check_finite, full_route_points, observe, pool
from layerroute.route import Route
from layerroute.sparse import KV_KEPT
from layerroute.store import atomic_save_safetensors, check_tensors, check_weights_digest, read_safetensors
from layerroute.token_walk import DecidingExecutor

from .base import CONFIG_NAME, PolicyError, RoutingPolicy, register_policy

WEIGHTS = "policy.safetensors"


class RouteEncoder(nn.Module):
    """Observation -> features: ``[obs, one-hot of the position's layer]`` -> Linear -> Tanh."""

    def __init__(self, obs_dim: int, num_layers: int, features_dim: int = 64):
        super().__init__()
        self.num_layers = num_layers
        self.net = nn.Sequential(nn.Linear(obs_dim + num_layers + 1, features_dim), nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        L = self.num_layers
        layer = (obs[:, -2] * L).round().long().clamp(0, L)  # [B] the position feature as a layer index
        return self.net(torch.cat([obs, nn.functional.one_hot(layer, L + 1).to(obs.dtype)], dim=1))


class ActorNet(nn.Module):
    """The actor of SB3's ActorCriticPolicy with ``RouteEncoder`` features: same module names
    (``policy_net`` as SB3's ``mlp_extractor.policy_net``, ``action_net``), so weights map 1:1."""

    def __init__(self, obs_dim: int, num_layers: int, num_actions: int, features_dim: int = 64,
                 pi: tuple[int, ...] = (64,)):
        super().__init__()
        self.arch = {"obs_dim": obs_dim, "num_layers": num_layers, "num_actions": num_actions,
                     "features_dim": features_dim, "pi": list(pi), "activation": "tanh"}
        self.features = RouteEncoder(obs_dim, num_layers, features_dim)
        layers, d = [], features_dim
        for h in pi:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.policy_net = nn.Sequential(*layers)
        self.action_net = nn.Linear(d, num_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Action logits [B, num_actions]."""
        return self.action_net(self.policy_net(self.features(obs)))


@register_policy
class PPOPolicy(RoutingPolicy):
    """A PPO-trained actor that routes each prompt by reading its hidden states (greedy)."""

    type = "ppo"

    def __init__(self, actor: ActorNet, proj: ObsProjection, spec: MDPSpec, fingerprint, meta: dict | None = None,
                 weights_digest: str | None = None):
        self.actor, self.proj, self.spec = actor.eval(), proj, spec
        self.fingerprint, self.meta, self.weights_digest = fingerprint, dict(meta or {}), weights_digest

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> list[int]:
        return self.actor(obs.float()).argmax(-1).tolist()

    @property
    def token_executor(self):
        """per_token: ``executor -> PerTokenPPOExecutor`` (what ``evaluate`` scores with); None in the other modes."""
        return (lambda executor: PerTokenPPOExecutor(executor, self)) if self.spec.mode == "per_token" else None

    @torch.no_grad()
    def route_batch(self, executor, input_ids, attention_mask):
        self.fingerprint.check_matches(executor.fingerprint, "policy")
        if self.spec.mode == "per_token":  # the identity route; the blocks decide per token (token_executor)
            return [executor.route(None)] * input_ids.shape[0]
        state = executor.begin(input_ids, attention_mask)
        real = attention_mask.bool()
        if self.spec.mode == "edit":
            return self._edit_routes(executor, state, real)
        progress = [Progress() for _ in range(input_ids.shape[0])]
        done = [False] * len(progress)
        while not all(done):
            obs = observe(self.spec, self.proj, pool(state.hidden, real), progress)
            chains = []
            for b, a in enumerate(self.act(obs)):
                if done[b]:
                    chains.append(())
                    continue
                chain, progress[b], done[b] = self.spec.apply(progress[b], a)
                chains.append(chain)
            state = executor.advance(state, chains)
            check_finite(state.hidden, "while the PPO policy walked the model")
        return [Route(p.chain, executor.fingerprint) for p in progress]

    def _edit_routes(self, executor, state, real) -> list[Route]:
        """``edit`` mode: the full route's pooled states at the spec's points, then greedy edits."""
        spec, B = self.spec, real.shape[0]
        _, pooled = full_route_points(spec.edit_points, state, lambda st, c: executor.advance(st, [c] * B),
                                      lambda st: pool(st.hidden, real))
        progress, done = [spec.start()] * B, [False] * B
        while not all(done):
            for b, a in enumerate(self.act(observe(spec, self.proj, pooled, progress))):
                if not done[b]:
                    progress[b], done[b] = spec.edit(progress[b], a)
        return [Route(p.chain, executor.fingerprint) for p in progress]

    def config(self) -> dict:
        s = self.spec
        return {"model": self.fingerprint.to_dict(), "mode": s.mode, "num_layers": s.num_layers,
                "max_blocks": s.max_blocks, "max_steps": s.max_steps, "token_groups": s.token_groups,
                **({"max_edits": s.max_edits, "obs_points": s.obs_points} if s.mode == "edit" else {}),
                "obs": {"dim": self.proj.dim, **self.proj.meta}, "arch": self.actor.arch, "training": self.meta,
                "weights": WEIGHTS, "weights_digest": self.weights_digest}

    def save_weights(self, directory: Path) -> None:
        tensors = {f"actor.{k}": v for k, v in self.actor.state_dict().items()}
        tensors.update(self.proj.tensors())
        atomic_save_safetensors(directory / WEIGHTS, tensors, metadata={"format": "layerroute.ppo_policy",
                                                                        "mode": self.spec.mode})

    @classmethod
    def from_config(cls, config, directory, executor):
        digest = config.get("weights_digest")
        check_weights_digest(executor.model, digest, directory, PolicyError, "PPO policy",
                             "train it again on this checkpoint (layerroute train-ppo)")
        path = Path(directory) / WEIGHTS
        tensors = read_safetensors(path, PolicyError, f"{directory} has no {WEIGHTS}: the policy's weights are missing")
        try:
            arch, obs = config["arch"], config["obs"]
            actor = ActorNet(int(arch["obs_dim"]), int(arch["num_layers"]), int(arch["num_actions"]),
                             int(arch["features_dim"]), tuple(int(h) for h in arch["pi"]))
            spec = MDPSpec(config["mode"], int(config["num_layers"]), config.get("max_blocks"),
                           config.get("max_steps"), int(config.get("token_groups", 8)),
                           int(config.get("max_edits", 4)), int(config.get("obs_points", 4)))
            dim, hidden = int(obs["dim"]), executor.fingerprint.hidden_size
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise PolicyError(f"{directory}: the saved PPO policy is corrupt or incomplete ({type(exc).__name__}: "
                              f"{exc})") from None
        with safe_open(str(path), "pt") as f:
            saved = f.metadata() or {}
        if actor.arch["num_actions"] != spec.num_actions or saved.get("mode", spec.mode) != spec.mode:
            raise PolicyError(f"{directory}: the policy was trained in mode {saved.get('mode', '?')!r} (its actor has "
                              f"{actor.arch['num_actions']} actions) but {CONFIG_NAME} says mode {spec.mode!r} "
                              f"({spec.num_actions} actions): the config was edited; a policy runs only the mode it "
                              f"was trained in")
        expected = {f"actor.{k}": v for k, v in actor.state_dict().items()}
        expected.update({"obs.mean": torch.empty(hidden), "obs.components": torch.empty(dim, hidden),
                         "obs.scale": torch.empty(dim)})
        check_tensors(tensors, expected, path, PolicyError, CONFIG_NAME)
        actor.load_state_dict({k[len("actor."):]: v for k, v in tensors.items() if k.startswith("actor.")})
        proj = ObsProjection.from_tensors(tensors, {k: v for k, v in obs.items() if k != "dim"})
        if spec.num_layers != executor.num_layers or spec.obs_size(proj.dim) != actor.arch["obs_dim"]:
            raise PolicyError(f"{directory}: the policy's shapes do not fit {executor.fingerprint.describe()}")
        return cls(actor, proj, spec, executor.fingerprint, config.get("training"), digest)


class PerTokenPPOExecutor(DecidingExecutor):
    """A ``per_token`` PPO policy's decisions inside every block (see the module docstring)."""

    def __init__(self, base, policy: PPOPolicy):
        super().__init__(base, KV_KEPT)  # the env's rule
        self.policy = policy
        self.last_group: torch.Tensor | None = None  # [B, L] whether the last prefill ran each block's last group

    def decider(self, state, real):
        spec, L, B = self.policy.spec, self.num_layers, real.shape[0]
        if state.past > 0 and self.last_group is not None and self.last_group.shape[0] == B:
            last = self.last_group.to(real.device)  # decoding: new tokens are in the last group
            return lambda layer, hidden: last[:, layer, None] & real
        k = real.long().cumsum(1) - 1
        groups = torch.where(real, k * spec.token_groups // real.sum(1, keepdim=True).clamp(min=1), -1)  # [B, q]
        tokens = real.sum(1).clamp(min=1).float()
        progress = [Progress() for _ in range(B)]
        self.last_group = torch.zeros(B, L, dtype=torch.bool)
        rows = torch.arange(B, device=real.device)[:, None]

        def decide(layer, hidden):
            obs = observe(spec, self.policy.proj, pool(hidden, real), progress)
            bits = (self.policy.actor(obs.float()) > 0).to(real.device)  # [B, G]
            run = torch.where(groups >= 0, bits[rows, groups.clamp(min=0)], torch.zeros_like(real))
            eff = (run.sum(1) / tokens).tolist()
            for b, p in enumerate(progress):
                if eff[b] > spec.left(p) + 1e-9 or eff[b] == 0:  # the env's budget rule: the block is skipped
                    run[b], eff[b] = False, 0.0
                progress[b] = Progress(layer + 1, p.blocks + eff[b], p.chain + ((layer,) if eff[b] else ()))
                self.last_group[b, layer] = bool(eff[b]) and bool(bits[b, -1])
            return run

        return decide
