"""layerroute: make a frozen LLM spend the right depth on each input.

Core API: ``load_model`` loads a frozen causal LM, ``Route`` says which blocks a sample runs,
and ``RouteExecutor`` runs the model along per-sample routes, exactly.

Names are imported on first use (PEP 562), so ``import layerroute`` and the command line's
``--help`` load neither torch nor transformers.
"""

from .errors import (FingerprintMismatchError, InputError, LayerRouteError, ModelFileError, ModelNotFoundError,
                     NotExactError, RouteError, UnsupportedModelError)
from .harness import install_backend as _install_lm_eval_backend
from .lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__():
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DEFAULT_MODEL", "FingerprintMismatchError", "Generation", "InputError", "LayerRouteError", "ModelFileError",
    "ModelFingerprint", "ModelNotFoundError", "NotExactError", "Route", "RouteError", "RouteExecutor", "RouteKVCache",
    "RouteState", "RoutedOutput", "SelfCheck", "UnsupportedModelError", "decoder_stack", "load_model",
    "model_fingerprint", "self_check",
]
