"""Route search: the searcher base and registry, static baselines, Optuna, MCTS, and Ray.

Importing this package registers every searcher in ``SEARCHERS``.
"""

from .base import SEARCHERS, RandomSearch, Searcher, SearchConfig, SearchError, get_searcher, register_searcher, \
    run_search
from . import baselines  # noqa: F401  (registers the static baselines as searchers)
from . import mcts  # noqa: F401  (registers the per-sample MCTS oracle)
from . import optuna_search  # noqa: F401  (registers the Optuna per-task searcher)

__all__ = ["SEARCHERS", "RandomSearch", "SearchConfig", "SearchError", "Searcher", "get_searcher",
           "register_searcher", "run_search"]
