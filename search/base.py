"""The searcher base, its registry, and the driver that runs a searcher into a results store.

A searcher finds routes for one task under an ``Objective``. The driver (``run_search``) calls:

1. ``Searcher(objective, config, seed)``: once per process (once per Ray actor).
2. ``units()``: the keys of the work, e.g. one per sample (per-sample searchers such as MCTS)
   or one per trial. The driver drops keys already in the store, so a rerun resumes.
3. ``search(keys)``: yields one JSON-able record per key, each with ``"key"``, as soon as it
   is finished; the driver appends it to the store at once.
4. ``summarize(records)``: from every record (resumed ones included) the final summary, e.g.
   the best route; the driver writes it as the store's last record and saves ``route.json``
   when the summary names a ``"route"``.

A searcher's options are a dataclass ``Config`` whose fields carry ``help`` metadata; the
CLI builds ``layerroute search NAME`` options from it. ``RandomSearch`` is the reference.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from layerroute.config import add_config_arguments, config_from_args, option  # noqa: F401  (re-exported for searchers)
from layerroute.errors import LayerRouteError
from layerroute.objective import Objective
from layerroute.registry import Registry
from layerroute.route import Route
from layerroute.store import ResultsStore



class SearchError(LayerRouteError, ValueError):
    """A searcher name or option that cannot work."""


SEARCHERS = Registry("searcher", SearchError)


def register_searcher(cls: type[Searcher]) -> type[Searcher]:
    """Class decorator: register ``cls`` under ``cls.name``; a name may be registered once."""
    return SEARCHERS.add(cls.name, cls)


def get_searcher(name: str) -> type[Searcher]:
    from . import load_searchers

    load_searchers()  # every searcher module registers itself on import
    return SEARCHERS.get_or_raise(name)


@dataclass
class SearchConfig:
    """Options every searcher has (none yet); subclasses add their own fields."""

    def validate(self) -> None:
        """Raise ``SearchError`` on options that cannot work; called by ``Searcher.__init__``."""


class Searcher(ABC):
    """Finds routes for one task; see the module docstring for the call order."""

    name: ClassVar[str]
    Config: ClassVar[type[SearchConfig]] = SearchConfig
    per_sample: ClassVar[bool] = False  # True: one record per sample, each with its own route
    oracle: ClassVar[bool] = False  # True: it reads labels of the samples it routes (an upper bound)
    workdir: Path | None = None  # the results store's folder (set by the driver): for a searcher's own files

    def __init__(self, objective: Objective, config: SearchConfig | None = None, seed: int = 0):
        self.objective, self.config, self.seed = objective, config or self.Config(), seed
        self.config.validate()

    def units(self) -> list[str]:
        """Keys of the work (default: one per sample of the objective)."""
        return [ex.uid for ex in self.objective.examples]

    @abstractmethod
    def search(self, keys: list[str]) -> Iterator[dict]:
        """Yield one finished record (with ``"key"``) per key."""

    @abstractmethod
    def summarize(self, records: list[dict]) -> dict:
        """The final summary from every record."""

    # helpers -----------------------------------------------------------------------------
    def route(self, layers: Iterable[int]) -> Route:
        return Route(tuple(layers), self.objective.executor.fingerprint)

    def settings(self) -> dict:
        return {"searcher": self.name, **asdict(self.config)}


def run_search(searcher: Searcher, store: ResultsStore, progress: bool = True) -> dict:
    """Run the pending units of ``searcher`` into ``store``; return the summary."""
    searcher.workdir = store.path.parent
    units = searcher.units()
    done = store.done()
    keys = [k for k in units if k not in done]
    last = store.records[-1] if store.records else {}
    if not keys and last.get("type") == "summary" and last.get("units", len(units)) == len(units):
        return last  # a finished run: nothing to redo
    with tqdm(total=len(keys), desc=f"search {searcher.name}", unit="unit", disable=not progress) as bar:
        for record in searcher.search(keys):
            store.append(record)
            bar.update(1)
    wanted = set(units)  # a store grown past this run's --limit: summarize this run's units only
    records = [r for r in store.records if r.get("type") != "summary" and r.get("key") in wanted]
    summary = {"type": "summary", "units": len(records), **searcher.summarize(records)}
    store.append(summary)
    return summary


# ---- the reference searcher ----------------------------------------------------------------------

@dataclass
class RandomConfig(SearchConfig):
    trials: int = option(32, "random in-order routes to try (each scored on every sample)")
    repeat_prob: float = option(0.0, "chance that a kept layer runs twice")

    def validate(self) -> None:
        if self.trials < 1:
            raise SearchError(f"--trials must be at least 1, got {self.trials}")
        if not 0 <= self.repeat_prob <= 1:
            raise SearchError(f"--repeat-prob must be in [0, 1], got {self.repeat_prob}")


@register_searcher
class RandomSearch(Searcher):
    """One route per task: the best of ``trials`` random in-order routes within the budget
    (trial 0 is the identity route, or the first layers when the budget is smaller)."""

    name = "random_search"
    Config = RandomConfig

    def units(self) -> list[str]:
        return [f"trial-{t}" for t in range(self.config.trials)]

    def _layers(self, t: int) -> tuple[int, ...]:
        L = self.objective.num_layers
        cap = self.objective.max_blocks or L * 2
        if t == 0:
            return tuple(range(min(L, cap)))
        rng = random.Random(f"{self.seed}:{t}")
        counts = [0 if rng.random() < 0.3 else 2 if rng.random() < self.config.repeat_prob else 1 for _ in range(L)]
        layers = [i for i, c in enumerate(counts) for _ in range(c)]
        while len(layers) > cap:  # drop random blocks until the budget holds
            layers.pop(rng.randrange(len(layers)))
        return tuple(layers or [rng.randrange(L)])

    def search(self, keys):
        for key in keys:
            layers = self._layers(int(key.split("-")[1]))
            yield {"key": key, "layers": list(layers), "blocks": len(layers),
                   "reward": self.objective.mean_reward(layers)}

    def summarize(self, records):
        best = max(records, key=lambda r: r["reward"])
        return {"route": self.route(best["layers"]).to_dict(), "reward": best["reward"], "blocks": best["blocks"]}

