"""Routers distilled from searched routes: per-layer networks (``network``), their training
(``training``), and loading into a frozen LLM (``routed_model``); per-token routers (``token_router``). Using any name of this package
registers the ``"router"`` routing policy. Names are imported on first use (PEP 562), so
``layerroute.routers.commands`` stays light."""

from layerroute.lazy import lazy_attributes

_FROM = {**dict.fromkeys(("RouterConfig", "RouterError", "RouterNetwork", "route_prompts", "walk", "window_means"),
                         ".network"),
         **dict.fromkeys(("RoutedModel", "RouterPolicy", "load_routers", "save_routers"), ".routed_model"),
         **dict.fromkeys(("TokenRoutedModel", "load_token_routers", "save_token_routers"), ".token_router")}
__all__ = sorted(_FROM)
__getattr__ = lazy_attributes(__name__, _FROM, first=(".routed_model",))  # (it registers the "router" policy)
