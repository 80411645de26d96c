"""Routers distilled from searched routes: per-layer networks (``network``), their training
(``training``), and loading into a frozen LLM (``routed_model``). Using any name of this package
registers the ``"router"`` routing policy. Names are imported on first use (PEP 562), so
``layerroute.routers.commands`` stays light."""

from importlib import import_module

_FROM = {**dict.fromkeys(("RouterConfig", "RouterError", "RouterNetwork", "route_prompts", "walk", "window_means"),
                         ".network"),
         **dict.fromkeys(("RoutedModel", "RouterPolicy", "load_routers", "save_routers"), ".routed_model")}
__all__ = sorted(_FROM)


def __getattr__(name):
    if name in _FROM:
        import_module(".routed_model", __name__)  # registers the "router" policy type
        return getattr(import_module(_FROM[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
