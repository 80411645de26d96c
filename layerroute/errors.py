"""Exceptions raised by layerroute. Each names what was wrong and how to fix it."""


class LayerRouteError(Exception):
    """Base class of every error layerroute raises on bad input."""


class InputError(LayerRouteError, ValueError):
    """An argument out of range or of the wrong shape (no tokens, ``max_new_tokens < 1``, ...)."""


class ModelNotFoundError(LayerRouteError, FileNotFoundError):
    """A model name or path that is neither a file, a directory, nor a reachable hub id."""


class ModelFileError(LayerRouteError, ValueError):
    """A model file or directory that exists but cannot be read (corrupt GGUF, config or weights)."""


class UnsupportedModelError(LayerRouteError, TypeError):
    """A model whose structure the executor cannot walk (encoder-only, no decoder stack, ...)."""


class NotExactError(UnsupportedModelError):
    """A model on which the identity route does not reproduce the model's own forward."""


class RouteError(LayerRouteError, ValueError):
    """A route that is malformed or cannot run on the given model."""


class FingerprintMismatchError(RouteError):
    """A route (or any saved artifact) made for a different model."""


class TaskError(LayerRouteError, ValueError):
    """A task spec, data file or option that is malformed, unknown or unavailable."""
