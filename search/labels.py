"""Router labels from per-sample search records, filtered against chance (robust labels).

On a four-option task a per-sample oracle finds, for most samples, some route that moves the
answer toward *any* option, the right one or a random wrong one. Such a route is chance, and a
router cannot learn it. The same search run against null labels (``layerroute search ... --null``:
a seeded random wrong option per sample) measures how far chance goes: its best routes' margin
gains over the full route. A gold record keeps its best route as a label only when that route's
margin gain exceeds the gain that at most ``share`` (5%) of the null records reach; every other
sample is labelled with the full route, which executes every block.
"""

from __future__ import annotations

import math
from pathlib import Path

from layerroute.errors import LayerRouteError

NULL_SHARE = 0.05


class LabelError(LayerRouteError, ValueError):
    """Stores that cannot give robust labels: a null store used as labels, no null search, ..."""


def is_null_store(header: dict) -> bool:
    return header.get("labels") == "null"


def margin_gain(record: dict) -> float:
    """How far the record's best route moves the margin toward its label, against the full route."""
    return float(record["margin"]) - float(record["identity"]["margin"])


def null_threshold(null_records: list[dict], share: float = NULL_SHARE) -> float:
    """The smallest margin gain that at most ``share`` of the null records exceed."""
    gains = sorted(margin_gain(r) for r in null_records)
    if not gains:
        raise LabelError("the null search has no finished samples, so chance cannot be measured")
    return gains[min(len(gains) - 1, math.ceil((1 - share) * len(gains)) - 1)]


def robust_layers(record: dict, threshold: float, num_layers: int) -> tuple[int, ...]:
    """The record's best route if its gain exceeds ``threshold``, else the full route."""
    if margin_gain(record) > threshold:
        return tuple(int(b) for b in record["layers"])
    return tuple(range(num_layers))


def null_twin(path) -> Path:
    """Where the null companion of a store (folder or file) lives: the folder ``DIR-null`` beside ``DIR``."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    return folder.with_name(folder.name + "-null")


def null_store_for(path) -> Path | None:
    """The conventional null companion of a store folder, if it exists."""
    twin = null_twin(path)
    return twin if twin.exists() else None


def check_pair(gold_header: dict, null_header: dict, gold_path, null_path) -> None:
    """A null store must be the gold store's search with --null: same task, split, seed and settings."""
    if is_null_store(gold_header):
        raise LabelError(f"{gold_path} was searched with --null (random wrong labels): it is a chance level, "
                         f"never labels or results; give the gold store and this one as its null")
    if not is_null_store(null_header):
        raise LabelError(f"{null_path} is not a null store (searched without --null)")
    keys = ("task", "split", "seed")
    diff = [k for k in keys if gold_header.get(k) != null_header.get(k)]
    g = {k: v for k, v in (gold_header.get("settings") or {}).items() if k not in ("null", "output")}
    n = {k: v for k, v in (null_header.get("settings") or {}).items() if k not in ("null", "output")}
    diff += sorted(k for k in set(g) | set(n) if g.get(k) != n.get(k))
    if diff:
        raise LabelError(f"{null_path} is not the null twin of {gold_path}: they differ in {', '.join(diff)}")
