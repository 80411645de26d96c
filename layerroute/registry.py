"""``Registry``: named things (searchers, policy types, task factories), each registered once."""

from __future__ import annotations


class Registry(dict):
    """A dict of ``what`` by name; ``add`` refuses a name twice and ``get_or_raise`` an unknown
    one, both with ``error`` and a message that names the known entries."""

    def __init__(self, what: str, error: type[Exception]):
        super().__init__()
        self.what, self.error = what, error

    def add(self, name: str, obj):
        if name in self:
            raise self.error(f"{self.what} {name!r} is already registered (by {self[name].__qualname__})")
        self[name] = obj
        return obj

    def get_or_raise(self, name: str):
        if name not in self:
            raise self.error(f"unknown {self.what} {name!r}; choose from {', '.join(sorted(self))}")
        return self[name]
