"""The route format: which blocks a sample runs, in which order.

A ``Route`` is a chain of block indices (the CoLa space): blocks may be skipped, repeated
and reordered. The Dr.LLM space, one ``skip | execute | repeat`` action per layer, is the
subset of chains that run layers in order; ``Route.from_actions`` and ``Route.actions``
convert between the two. A route carries the fingerprint of the model it was made for, and
running or loading it against another model is refused.

Short specs (``Route.parse``), joined with ``+``::

    identity                 every block once, in order
    skip:20-24               drop blocks 20..24 (inclusive); lists like skip:3,5,7-9 work too
    repeat:10                run block 10 twice in a row; repeat:10x3 runs it three times
    chain:0-9,9,10-29        an explicit chain of block indices
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import RouteError
from .store import atomic_write
from .stack import ModelFingerprint

FORMAT_VERSION = 1
_MAX_LAYERS = 100_000  # bounds a spec checked without a model
ACTIONS = ("skip", "execute", "repeat")


@dataclass(frozen=True)
class Route:
    """An executable chain of block indices for one model."""

    layers: tuple[int, ...]
    fingerprint: ModelFingerprint

    def __post_init__(self):
        layers = tuple(int(i) for i in self.layers)
        object.__setattr__(self, "layers", layers)
        n = self.fingerprint.num_layers
        if not layers:
            raise RouteError("empty route: a route must execute at least one block")
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise RouteError(f"layer index {bad[0]} is out of range: {self.fingerprint.describe()} has blocks 0..{n - 1}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def identity(cls, fingerprint: ModelFingerprint) -> Route:
        return cls(tuple(range(fingerprint.num_layers)), fingerprint)

    @classmethod
    def from_actions(cls, actions: Sequence[str | int], fingerprint: ModelFingerprint, repeat_times: int = 2) -> Route:
        """Dr.LLM space: one action per layer.

        An action is ``"skip"``/``0``, ``"execute"``/``1`` or ``"repeat"``/``2`` (``repeat_times``
        passes). An integer ``k > 2`` runs the layer ``k`` times in a row.
        """
        if len(actions) != fingerprint.num_layers:
            raise RouteError(f"got {len(actions)} actions but {fingerprint.describe()} needs one per layer")
        counts = []
        for i, a in enumerate(actions):
            if isinstance(a, str):
                if a not in ACTIONS:
                    raise RouteError(f"unknown action {a!r} at layer {i}; use one of {', '.join(ACTIONS)}")
                counts.append({"skip": 0, "execute": 1, "repeat": repeat_times}[a])
            elif isinstance(a, int) and not isinstance(a, bool) and a >= 0:
                counts.append(repeat_times if a == 2 else a)
            else:
                raise RouteError(f"unknown action {a!r} at layer {i}; use skip/execute/repeat or a pass count >= 0")
        return cls(tuple(i for i, c in enumerate(counts) for _ in range(c)), fingerprint)

    @classmethod
    def parse(cls, spec: str, fingerprint: ModelFingerprint) -> Route:
        """Build a route from a short spec (see the module docstring)."""
        n = fingerprint.num_layers
        counts = [1] * n
        chain = None
        for op, indices, passes in _read_spec(spec, n):
            if op == "chain":
                chain = indices
            else:
                for i in indices:
                    counts[i] = passes
        if chain is not None:
            return cls(tuple(chain), fingerprint)
        return cls(tuple(i for i, c in enumerate(counts) for _ in range(c)), fingerprint)

    # ---- views ----------------------------------------------------------------------------
    @property
    def cost(self) -> int:
        """Block executions per token."""
        return len(self.layers)

    @property
    def is_monotone(self) -> bool:
        """True when the route runs blocks in order (the Dr.LLM space)."""
        return all(a <= b for a, b in zip(self.layers, self.layers[1:]))

    def counts(self) -> list[int]:
        """How many times each block runs."""
        out = [0] * self.fingerprint.num_layers
        for i in self.layers:
            out[i] += 1
        return out

    def actions(self) -> list[str]:
        """Dr.LLM labels per layer (skip/execute/repeat); only for in-order routes."""
        if not self.is_monotone:
            raise RouteError(f"route {self.layers} reorders blocks, so it has no per-layer action form")
        return [ACTIONS[min(c, 2)] for c in self.counts()]

    def flops(self, num_tokens: int) -> float:
        """Estimated forward FLOPs of the executed blocks over a causal prompt of ``num_tokens``.

        Per block: 2 x parameters x tokens for the matmuls, plus 2 x T^2 x hidden for the
        causal attention scores and weighted values. Embedding and LM head are not counted.
        """
        fp = self.fingerprint
        if not fp.block_params:
            raise RouteError("this route's fingerprint has no block size, so FLOPs cannot be estimated")
        t = num_tokens
        return float(self.cost * (2 * fp.block_params * t + 2 * t * t * fp.hidden_size))

    def describe(self) -> str:
        counts = self.counts()
        skipped = [i for i, c in enumerate(counts) if c == 0]
        repeated = [i for i, c in enumerate(counts) if c > 1]
        order = "in order" if self.is_monotone else "reordered"
        return (f"{self.cost} block executions of {self.fingerprint.num_layers} ({order}); "
                f"skipped {_ranges(skipped) or 'none'}; repeated {_ranges(repeated) or 'none'}")

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "layerroute.route", "version": FORMAT_VERSION, "layers": list(self.layers),
                "model": self.fingerprint.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        atomic_write(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict, fingerprint: ModelFingerprint | None = None) -> Route:
        """Rebuild a route; with ``fingerprint``, refuse one made for another model."""
        if not isinstance(data, dict) or data.get("format") != "layerroute.route":
            raise RouteError("not a layerroute route (missing \"format\": \"layerroute.route\")")
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RouteError(f"route format version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise RouteError(f"route format version {version} is newer than this layerroute "
                             f"({FORMAT_VERSION}); upgrade layerroute")
        saved = ModelFingerprint.from_dict(data.get("model") or {})
        if fingerprint is not None:
            saved.check_matches(fingerprint)
            saved = fingerprint
        layers = data.get("layers")
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise RouteError(f"route layers must be a list of integers, got {layers!r}")
        return cls(tuple(layers), saved)

    @classmethod
    def load(cls, path: str | Path, fingerprint: ModelFingerprint | None = None) -> Route:
        """Read a route JSON file; every problem is a ``RouteError`` that names the file."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise RouteError(f"route file {path} does not exist") from None
        except OSError as exc:
            raise RouteError(f"cannot read route file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise RouteError(f"{path} is not a route file: it is not UTF-8 JSON text") from None
        if not text.strip():
            raise RouteError(f"route file {path} is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RouteError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data, fingerprint)
        except RouteError as exc:
            raise type(exc)(f"{path}: {exc}") from None


def resolve_route(spec: str | Route | None, fingerprint: ModelFingerprint) -> Route:
    """A Route from a Route, a JSON file path, a short spec, or None (identity)."""
    if spec is None:
        return Route.identity(fingerprint)
    if isinstance(spec, Route):
        spec.fingerprint.check_matches(fingerprint)
        return spec
    if _is_file(spec):
        return Route.load(spec, fingerprint)
    return Route.parse(spec, fingerprint)


def check_route_arg(spec: str) -> None:
    """Check a route argument before any model is loaded: a route file's format (the model
    match is checked later), or a spec's syntax (layer indices are checked against the model later)."""
    if _is_file(spec):
        Route.load(spec)
    else:
        _read_spec(spec, None)


def _is_file(spec: str) -> bool:
    return isinstance(spec, str) and (spec.endswith(".json") or Path(spec).is_file())


def _read_spec(spec: str, n: int | None) -> list[tuple[str, list[int], int]]:
    """The (op, block indices, passes) of each ``+``-joined part; ``n`` None checks syntax only."""
    if not isinstance(spec, str) or not spec.replace("+", " ").strip():
        raise RouteError(f"empty route spec {spec!r}; use identity, skip:, repeat: or chain: (joined with +)")
    parts = []
    for part in filter(None, (p.strip() for p in spec.split("+"))):
        name, _, arg = part.partition(":")
        op = name.strip().lower()
        if op in ("identity", "full", "all") and not arg:
            continue
        if op == "skip":
            parts.append((op, _indices(arg, n, part), 0))
        elif op == "repeat":
            idx, x, times = arg.partition("x")
            if x and not times.strip():
                raise RouteError(f"{part!r}: no pass count after 'x'; write repeat:10x3, or repeat:10 for two passes")
            k = _int(times, part) if x else 2
            if k < 2:
                raise RouteError(f"{part!r}: a repeat runs a block at least twice")
            parts.append((op, _indices(idx, n, part), k))
        elif op == "chain":
            parts.append((op, _indices(arg, n, part, allow_repeats=True), 1))
        elif Path(spec).is_dir():
            raise RouteError(f"{spec} is a directory, not a route file (JSON) or a route spec")
        elif "/" in spec:
            raise RouteError(f"route file {spec} does not exist (and it is not a route spec)")
        else:
            raise RouteError(f"unknown route action {name.strip()!r} in {spec!r}; use identity, skip:, repeat: or "
                             f"chain:")
    ops = {op for op, _, _ in parts}
    if "chain" in ops and ops & {"skip", "repeat"}:
        raise RouteError(f"{spec!r}: chain: cannot be combined with skip: or repeat:")
    return parts


def _int(text: str, part: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RouteError(f"{part!r}: {text!r} is not an integer") from None


def _indices(arg: str, n: int | None, part: str, allow_repeats: bool = False) -> list[int]:
    if not arg.strip():
        raise RouteError(f"{part!r} names no layers")
    out: list[int] = []
    for item in arg.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", item)
        if not m:
            raise RouteError(f"{part!r}: cannot read {item!r}; use indices like 3 or ranges like 20-24")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise RouteError(f"{part!r}: range {lo}-{hi} is backwards")
        bad = lo if lo < 0 else max(lo, n) if n is not None and hi >= n else None
        if bad is not None or hi >= _MAX_LAYERS:
            raise RouteError(f"layer index {hi if bad is None else bad} in {part!r} is out of range: the model has "
                             f"blocks 0..{'L-1' if n is None else n - 1}")
        out.extend(range(lo, hi + 1))
    if not allow_repeats and len(set(out)) != len(out):
        raise RouteError(f"{part!r} names a layer twice")
    return out


def _ranges(idx: list[int]) -> str:
    """[1,2,3,7] -> '1-3,7'."""
    parts, start = [], None
    for a, b in zip(idx, idx[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            parts.append(f"{start}-{a}" if a != start else str(a))
            start = None
    return ",".join(parts)
