"""Load trained routers into a frozen LLM, PEFT style, and save them without the base model.

A router directory holds ``routers.safetensors`` (router weights only), ``router_config.json``
(``RouterConfig``: sizes, the base model's fingerprint and weights digest) and a small
``policy_config.json`` pointer so that ``load_policy`` / ``layerroute eval --policy DIR``
find it. Loading checks, in this order, that the config exists and parses, that the base model
has the same shape and the same weights (``layerroute.models.weights_digest``), and that the
safetensors file is intact and holds exactly the expected tensors; each failure is a
``RouterError`` that says what is wrong. Weights are read with ``safetensors.torch.load_file``;
nothing is ever unpickled.

``RoutedModel`` wraps the frozen base. ``forward`` and ``generate`` take the usual Hugging Face
arguments; the routers pick each sample's route once at prefill, and generation keeps that
route for every new token (``RouteExecutor.generate``, whose KV cache has a slot per executed
block); the routing walk fills that cache, so the prompt runs only once. ``with model.disable_routing():`` runs the plain base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerroute.executor import RouteExecutor, check_left_padded
from layerroute.route import Route
from layerroute.policies.base import RoutingPolicy, register_policy

from .network import (CONFIG_NAME, WEIGHTS_NAME, RoutedBase, RouterConfig, RouterError, RouterNetwork, check_tau,
                      load_router_dir, route_prompts)


def save_routers(directory: str | Path, net: RouterNetwork) -> Path:
    """Write the router weights, ``router_config.json`` and the policy pointer into ``directory``."""
    return RouterPolicy(net).save(directory)


def load_routers(directory: str | Path, model: nn.Module) -> RouterNetwork:
    """Routers saved in ``directory``, checked against the frozen ``model`` (see the module docstring)."""
    return load_router_dir(directory, model, "router", RouterConfig, RouterNetwork, CONFIG_NAME, WEIGHTS_NAME,
                           route_file_hint="; run a route with --route")


@register_policy
class RouterPolicy(RoutingPolicy):
    """Routers as a routing policy: ``layerroute eval --policy DIR`` (or ``--router DIR``)."""

    type = "router"

    def __init__(self, net: RouterNetwork, budget=None, tau: float | None = None):
        self.net, self.budget, self.tau = net, budget, check_tau(tau)

    def route_batch(self, executor, input_ids, attention_mask):
        return route_prompts(self.net, executor, input_ids, attention_mask, self.budget, tau=self.tau)[0]

    def config(self) -> dict:
        return {"model": dict(self.net.config.model), "router_config": CONFIG_NAME}

    @classmethod
    def from_config(cls, config, directory, executor):
        return cls(load_routers(directory, executor.model))

    def save_weights(self, directory: Path) -> None:
        from layerroute.store import atomic_save_safetensors, atomic_write

        atomic_save_safetensors(directory / WEIGHTS_NAME, self.net.state_dict(), {"format": "layerroute.routers"})
        atomic_write(directory / CONFIG_NAME, self.net.config.to_json())


@dataclass
class RoutedCausalLMOutput:
    """``logits`` [B, T or logits_to_keep, V]; ``routes`` the route each sample ran (None when
    routing is disabled); ``router_logits`` [B, L, 3]."""

    logits: torch.Tensor
    routes: list[Route] | None = None
    router_logits: torch.Tensor | None = None

    def __getitem__(self, key):
        return getattr(self, key)


_GENERATE_DEFAULTS = ("do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


class RoutedModel(RoutedBase):
    """A frozen causal LM whose routers pick each sample's route at prefill; see the module docstring."""

    def __init__(self, base: nn.Module, routers: RouterNetwork, tokenizer=None, budget=None, tau: float | None = None):
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.routers = routers.eval().requires_grad_(False)
        self.executor = RouteExecutor(base)
        self.tokenizer, self.budget, self.tau = tokenizer, budget, check_tau(tau)
        self._routing = True

    @classmethod
    def from_pretrained(cls, base_model_or_path, router_dir: str | Path, *, device: str = "cpu", dtype=None,
                        budget=None, tau: float | None = None, trust_remote_code: bool = False) -> RoutedModel:
        """Wrap an already-loaded HF model, or load one by name or path with ``layerroute.load_model``.
        A directory of per-token routers (``train-token-router``) gives a ``TokenRoutedModel``, which
        decides per token and block at prefill and at every decoded token (``token_router.py``)."""
        from .token_router import TokenRoutedModel, is_token_router_dir

        if is_token_router_dir(router_dir):
            return TokenRoutedModel.from_pretrained(base_model_or_path, router_dir, device=device, dtype=dtype)
        tokenizer = None
        if isinstance(base_model_or_path, (str, Path)):
            from layerroute.models import load_model

            base_model_or_path, tokenizer = load_model(str(base_model_or_path), device=device, dtype=dtype,
                                                       trust_remote_code=trust_remote_code)
        return cls(base_model_or_path, load_routers(router_dir, base_model_or_path), tokenizer, budget, tau)

    @property
    def device(self) -> torch.device:
        return self.executor.device

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[Route]:
        """The route the routers pick for each prompt of a (left-padded) batch."""
        return route_prompts(self.routers, self.executor, input_ids, attention_mask, self.budget, tau=self.tau)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                logits_to_keep: int = 0, **kwargs) -> RoutedCausalLMOutput:
        """Logits of a batch of whole sequences; each sample's route is decided from its tokens."""
        if not self._routing:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                            **kwargs)
            return RoutedCausalLMOutput(out.logits)
        _unsupported(kwargs, "forward")
        routes, decided = route_prompts(self.routers, self.executor, input_ids, attention_mask, self.budget,
                                        tau=self.tau)
        out = self.executor(input_ids, attention_mask, routes, logits_to_keep=logits_to_keep)
        return RoutedCausalLMOutput(out.logits, routes, decided.logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                 seed: int | None = None, **kwargs) -> torch.Tensor:
        """Sequences [B, T + new], like ``transformers`` ``generate``; unset options come from the
        base model's ``generation_config``. Each sample keeps its routed route for every token."""
        given = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if not self._routing:
            opts = {k: v for k, v in given.items() if v is not None}
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      max_new_tokens=max_new_tokens or 20, **opts, **kwargs)
        _unsupported(kwargs, "generate")
        if attention_mask is not None:
            check_left_padded(attention_mask)  # before the routing walk
        gc = getattr(self.base, "generation_config", None)
        opts = {k: v if v is not None else getattr(gc, k, None) for k, v in given.items()}
        if not opts["do_sample"]:
            opts.update(do_sample=False, temperature=1.0, top_k=None, top_p=None)
        routes, decided = route_prompts(self.routers, self.executor, input_ids, attention_mask, self.budget,
                                        prefill=True, tau=self.tau)
        return self.executor.generate(input_ids, attention_mask, routes, max_new_tokens=max_new_tokens or 20,
                                      seed=seed, prefill=decided.prefill,
                                      **{**opts, "temperature": opts["temperature"] or 1.0}).sequences

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write only the routers (safetensors) and their config; never the base model's weights."""
        return save_routers(directory, self.routers)


def _unsupported(kwargs: dict, what: str) -> None:
    bad = sorted(k for k, v in kwargs.items() if v is not None and k not in ("use_cache", "return_dict"))
    if bad:
        raise RouterError(f"routed {what} does not support {', '.join(bad)}; disable routing "
                          f"(with model.disable_routing():) to use the base model's own {what}")
