"""Package attributes imported on first use (PEP 562), so that importing a package stays light."""

from __future__ import annotations

from importlib import import_module


def lazy_attributes(package: str, where: dict[str, str], first: tuple[str, ...] = ()):
    """A module ``__getattr__`` for ``package``: name -> the submodule (``.name``) that defines it.
    ``first``: submodules imported before any name is given out (those that register themselves)."""

    def __getattr__(name):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        for module in first:
            import_module(module, package)
        value = getattr(import_module(where[name], package), name)
        setattr(import_module(package), name, value)
        return value

    return __getattr__
