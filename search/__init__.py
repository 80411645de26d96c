"""Route search: the searcher base and registry, static baselines, Optuna, MCTS, and Ray.

Names are imported on first use (PEP 562), so ``layerroute.search.commands`` stays light; using
any of them, or ``get_searcher``, registers every searcher in ``SEARCHERS``.
"""

from importlib import import_module

__all__ = ["SEARCHERS", "RandomSearch", "SearchConfig", "SearchError", "Searcher", "get_searcher",
           "register_searcher", "run_search"]


def load_searchers() -> None:
    """Import every searcher module, which registers it (baselines, the MCTS oracle, Optuna)."""
    for name in ("baselines", "mcts", "optuna_search"):
        import_module(f".{name}", __name__)


def __getattr__(name):
    if name in __all__:
        load_searchers()
        return getattr(import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
