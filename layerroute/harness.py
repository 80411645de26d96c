"""lm-evaluation-harness: the ``layerroute`` model backend is registered with lm-eval, lazily.

``import layerroute`` calls ``install_backend``: where lm-eval is installed, the name
``layerroute`` goes into lm-eval's model registry as a placeholder (``BACKEND``) that lm-eval
imports only when a run asks for that model. The registration waits until lm-eval's registry is
imported (an import hook; at once if it already is), so ``import layerroute`` imports nothing of
lm-eval, and nothing of layerroute's plug-in folders. lm-eval 0.4.13 has no plug-in entry point,
so its own ``lm_eval`` command cannot find the backend; ``layerroute lm-eval ARGS``
(``run_lm_eval``) registers it, then runs lm-eval's command line with ``ARGS``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

from .errors import LayerRouteError

NAME = "layerroute"
BACKEND = "layerroute.policies.lm_eval_backend:LayerRouteLM"
INSTALL = 'pip install "layerroute[lm-eval]"'
REGISTRY = "lm_eval.api.registry"


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


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds lm-eval's registry module as the path finder does, and registers the backend once it ran."""

    def find_spec(self, name, path=None, target=None):
        if name != REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
                register_backend()
            spec.loader.exec_module = exec_module
        return spec


def install_backend() -> None:
    """Register the backend now if lm-eval's registry is imported, else as soon as it is."""
    if REGISTRY in sys.modules:
        register_backend()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


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
