"""layerroute: make a frozen LLM spend the right depth on each input.

Core API: ``load_model`` loads a frozen causal LM, ``Route`` says which blocks a sample runs,
and ``RouteExecutor`` runs the model along per-sample routes, exactly.
"""

from .errors import (FingerprintMismatchError, InputError, LayerRouteError, ModelFileError, ModelNotFoundError,
                     NotExactError, RouteError, UnsupportedModelError)
from .executor import Generation, RouteExecutor, RouteKVCache, RoutedOutput, RouteState, SelfCheck, self_check
from .models import DEFAULT_MODEL, ModelFingerprint, decoder_stack, load_model, model_fingerprint
from .route import Route

__version__ = "0.1.0"

# lm-evaluation-harness, where installed, learns the model name "layerroute" (nothing heavy is imported)
from .harness import register_backend as _register_lm_eval_backend  # noqa: E402

_register_lm_eval_backend()

__all__ = [
    "DEFAULT_MODEL", "FingerprintMismatchError", "Generation", "InputError", "LayerRouteError", "ModelFileError",
    "ModelFingerprint", "ModelNotFoundError", "NotExactError", "Route", "RouteError", "RouteExecutor", "RouteKVCache",
    "RouteState", "RoutedOutput", "SelfCheck", "UnsupportedModelError", "decoder_stack", "load_model",
    "model_fingerprint", "self_check",
]
