"""The routing-policy interface: one batched call that picks a route per sample.

Every way of choosing routes (a static route, a baseline, an Optuna route, a PPO policy, a
distilled router) is a ``RoutingPolicy``. ``layerroute.evaluation.evaluate`` accepts one and
calls ``route_batch`` on each padded batch of prompts, so all of them are evaluated the same
way, with the same results files.

A saved policy is a directory: ``policy_config.json`` (``{"type": ..., "model": fingerprint,
...}``, written with ``indent=2, sort_keys=True``) plus, for learned policies, weights in
``*.safetensors``. ``load_policy`` reads the type and dispatches through ``POLICIES``;
nothing is ever unpickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from layerroute.errors import FingerprintMismatchError, LayerRouteError
from layerroute.executor import RouteExecutor
from layerroute.models import ModelFingerprint
from layerroute.registry import Registry
from layerroute.route import Route
from layerroute.store import atomic_write_json, describe_file, read_json

CONFIG_NAME = "policy_config.json"


class PolicyError(LayerRouteError, ValueError):
    """A saved policy that is missing, corrupt, of an unknown type, or made for another model."""


POLICIES = Registry("policy type", PolicyError)


def register_policy(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
    """Class decorator: register ``cls`` under ``cls.type``; a type may be registered once."""
    return POLICIES.add(cls.type, cls)


class RoutingPolicy(ABC):
    """Picks one route per sample of a batch.

    ``route_batch`` receives the left-padded prompt tokens ([B, T] ids and mask) and the
    executor, and may walk the model (reading hidden states) to decide. Subclasses that can
    be saved implement ``config`` / ``from_config`` (and ``state_dict`` for weights).
    """

    type: ClassVar[str]

    @abstractmethod
    def route_batch(self, executor: RouteExecutor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> list[Route]:
        """One route per row of ``input_ids``."""

    def config(self) -> dict:
        raise PolicyError(f"{type(self).__name__} cannot be saved")

    @classmethod
    def from_config(cls, config: dict, directory: Path, executor: RouteExecutor) -> RoutingPolicy:
        raise PolicyError(f"{cls.__name__} cannot be loaded")

    def save(self, directory: str | Path) -> Path:
        """Write ``policy_config.json`` (and any weights the subclass writes) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_weights(directory)
        atomic_write_json(directory / CONFIG_NAME, {"type": self.type, **self.config()})
        return directory

    def save_weights(self, directory: Path) -> None:
        """Learned policies write their safetensors here (called before the config)."""


@register_policy
class StaticPolicy(RoutingPolicy):
    """The same route for every sample (a static route, a baseline or an Optuna route)."""

    type = "static"

    def __init__(self, route: Route):
        self.route = route

    def route_batch(self, executor, input_ids, attention_mask):
        self.route.fingerprint.check_matches(executor.fingerprint, "policy")
        return [self.route] * input_ids.shape[0]

    def config(self) -> dict:
        return {"model": self.route.fingerprint.to_dict(), "route": self.route.to_dict()}

    @classmethod
    def from_config(cls, config, directory, executor):
        return cls(Route.from_dict(config.get("route"), executor.fingerprint))


def load_policy(path: str | Path, executor: RouteExecutor) -> RoutingPolicy:
    """A saved policy for ``executor``'s model: a policy directory, or a route JSON file."""
    path = Path(path)
    if path.is_file() and path.name != CONFIG_NAME:
        what = "a route file" if path.suffix == ".json" else describe_file(path)
        if what == "a route file":
            return StaticPolicy(Route.load(path, executor.fingerprint))
        raise PolicyError(f"{path} is {what}, not a saved policy: give a policy directory (with {CONFIG_NAME}; "
                          f"train-ppo exports one to OUT/policy, train-router writes one) or a route JSON file")
    config_path = path / CONFIG_NAME if path.is_dir() else path
    config = read_json(config_path, PolicyError, f"{path} is not a saved policy: {config_path.name} is missing")
    if not isinstance(config, dict) or config.get("type") not in POLICIES:
        kind = config.get("type") if isinstance(config, dict) else None
        raise PolicyError(f"{config_path}: unknown policy type {kind!r}; known: {', '.join(sorted(POLICIES))}")
    try:
        ModelFingerprint.from_dict(config.get("model") or {}).check_matches(executor.fingerprint, "policy")
    except FingerprintMismatchError as exc:
        raise PolicyError(f"{config_path}: {exc}") from None
    return POLICIES[config["type"]].from_config(config, config_path.parent, executor)
