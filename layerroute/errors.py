"""Exceptions raised by layerroute. Each names what was wrong and how to fix it."""


class LayerRouteError(Exception):
    """Base class of every error layerroute raises on bad input."""


class ModelNotFoundError(LayerRouteError, FileNotFoundError):
    """A model name or path that is neither a file, a directory, nor a reachable hub id."""


class UnsupportedModelError(LayerRouteError, TypeError):
    """A model whose structure the executor cannot walk (encoder-only, no decoder stack, ...)."""


class RouteError(LayerRouteError, ValueError):
    """A route that is malformed or cannot run on the given model."""


class FingerprintMismatchError(RouteError):
    """A route (or any saved artifact) made for a different model."""
