"""layerroute: make a frozen LLM spend the right depth on each input.

Core API: ``load_model`` loads a frozen causal LM, ``Route`` says which blocks a sample runs,
and ``RouteExecutor`` runs the model along per-sample routes, exactly.

Names are imported on first use (PEP 562), so ``import layerroute`` and the command line's
``--help`` load neither torch nor transformers.
"""

from importlib import import_module

from .errors import (FingerprintMismatchError, InputError, LayerRouteError, ModelFileError, ModelNotFoundError,
                     NotExactError, RouteError, UnsupportedModelError)
from .harness import install_backend as _install_lm_eval_backend

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(("Generation", "RouteExecutor", "RouteKVCache", "RoutedOutput", "RouteState", "SelfCheck",
                     "self_check"), ".executor"),
    **dict.fromkeys(("DEFAULT_MODEL", "ModelFingerprint", "decoder_stack", "load_model", "model_fingerprint"),
                    ".models"),
    "Route": ".route",
}

# lm-evaluation-harness, where installed, learns the model name "layerroute" once lm-eval's registry is
# imported (nothing of lm-eval is imported here)
_install_lm_eval_backend()


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layerroute' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DEFAULT_MODEL", "FingerprintMismatchError", "Generation", "InputError", "LayerRouteError", "ModelFileError",
    "ModelFingerprint", "ModelNotFoundError", "NotExactError", "Route", "RouteError", "RouteExecutor", "RouteKVCache",
    "RouteState", "RoutedOutput", "SelfCheck", "UnsupportedModelError", "decoder_stack", "load_model",
    "model_fingerprint", "self_check",
]
