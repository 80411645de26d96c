"""lm-evaluation-harness: the ``layerroute`` model backend is registered with lm-eval, lazily.

``import layerroute`` calls ``register_backend``: where lm-eval is installed, the name
``layerroute`` goes into lm-eval's model registry as a placeholder (``BACKEND``) that lm-eval
imports only when a run asks for that model. Nothing of lm-eval beyond its (light) registry is
imported here, and nothing of layerroute's plug-in folders. lm-eval 0.4.13 has no plug-in entry
point, so its own ``lm_eval`` command cannot find the backend; ``layerroute lm-eval ARGS``
(``run_lm_eval``) registers it, then runs lm-eval's command line with ``ARGS``.
"""

from __future__ import annotations

import importlib.util
import sys

from .errors import LayerRouteError

NAME = "layerroute"
BACKEND = "layerroute.policies.lm_eval_backend:LayerRouteLM"
INSTALL = 'pip install "layerroute[lm-eval]"'


def register_backend() -> bool:
    """Register the ``layerroute`` backend with lm-eval if lm-eval is installed; True if it is."""
    if importlib.util.find_spec("lm_eval") is None:
        return False
    try:
        import lm_eval.models  # noqa: F401  (lm-eval's own names first: it imports them only into an empty registry)
        from lm_eval.api.registry import model_registry
    except ImportError:  # an lm-eval without this registry: `layerroute lm-eval` says so
        return False
    if NAME not in model_registry:
        model_registry.register(NAME, target=BACKEND)
    return True


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's command line (``lm_eval ARGS``) with the ``layerroute`` backend registered."""
    if not register_backend():
        raise LayerRouteError(f"`layerroute lm-eval` needs lm-evaluation-harness 0.4.13 or a compatible release: "
                              f"{INSTALL}")
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    return 0
