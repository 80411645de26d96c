"""Routers distilled from searched routes: per-layer networks (``network``), their training
(``training``), and loading into a frozen LLM (``routed_model``). Importing this package
registers the ``"router"`` routing policy."""

from .network import RouterConfig, RouterError, RouterNetwork, route_prompts, walk, window_means
from .routed_model import RoutedModel, RouterPolicy, load_routers, save_routers

__all__ = ["RoutedModel", "RouterConfig", "RouterError", "RouterNetwork", "RouterPolicy", "load_routers",
           "route_prompts", "save_routers", "walk", "window_means"]
