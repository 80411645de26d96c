"""Route search: the searcher base and registry, static baselines, Optuna, MCTS, and Ray.

Names are imported on first use (PEP 562), so ``layerroute.search.commands`` stays light; using
any of them, or ``get_searcher``, registers every searcher in ``SEARCHERS``.
"""

from importlib import import_module

from layerroute.lazy import lazy_attributes

__all__ = ["SEARCHERS", "RandomSearch", "SearchConfig", "SearchError", "Searcher", "get_searcher",
           "register_searcher", "run_search"]
SEARCHER_MODULES = (".baselines", ".mcts", ".optuna_search")  # each registers its searchers on import


def load_searchers() -> None:
    """Import every searcher module, which registers it."""
    for name in SEARCHER_MODULES:
        import_module(name, __name__)


__getattr__ = lazy_attributes(__name__, dict.fromkeys(__all__, ".base"), first=SEARCHER_MODULES)
