"""Static baselines: one route for every input, at a target share of the blocks.

Each baseline sees only calibration examples (an ``Objective`` over the task's ``search``
split) and returns a route that executes exactly ``k = floor(ratio * L)`` blocks, in order:

* ``unified``: skips spread evenly over the middle layers (the first and last tenth stay).
* ``drop_last``: drop the last blocks.
* ``similarity``: drop the contiguous run of blocks whose input and output hidden states are
  most alike (angular distance at the last prompt token; Gromov et al., "The Unreasonable
  Ineffectiveness of the Deeper Layers").
* ``greedy``: remove, one at a time, the block whose removal keeps the objective's mean
  reward (the margin by default) highest, reusing the prefix before each candidate.
* ``random``: skip a seeded random set of blocks.

Each baseline is also a searcher (``layerroute search greedy --budget 0.8 ...``).

Fit on search, choose on validation, report on test: ``run_baselines`` (``layerroute
baselines``) fits each baseline on ``CALIB_LIMIT`` (256) search-split samples by default, scores
every candidate on ``VAL_LIMIT`` (256) validation-split samples, and the best static route at a
budget (``best``; Optuna's pick among its top trials, too) is the one with the best validation
score, never the best on the samples it was fitted to.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from layerroute.budget import blocks_for_ratio
from layerroute.errors import RouteError
from layerroute.evaluation import evaluate, wilson_interval
from layerroute.executor import RouteExecutor
from layerroute.objective import Objective, memoised
from layerroute.registry import Registry
from layerroute.route import Route
from layerroute.tables import ci, pct, table

from .base import Searcher, register_searcher


class BaselineSearch(Searcher):
    """A static baseline as a searcher: one unit, the route at the objective's budget."""

    def units(self) -> list[str]:
        return ["route"]

    def search(self, keys):
        obj = self.objective
        k = obj.max_blocks if obj.max_blocks is not None else obj.num_layers
        for key in keys:
            route = BASELINES[self.name](obj, min(k, obj.num_layers), self.seed)
            yield {"key": key, "layers": list(route.layers), "blocks": route.cost,
                   "reward": obj.mean_reward(route)}

    def summarize(self, records):
        r = records[-1]
        return {"route": self.route(r["layers"]).to_dict(), "reward": r["reward"], "blocks": r["blocks"]}


BASELINES = Registry("baseline", RouteError)  # name -> fn(objective, k, seed) -> Route


def register_baseline(name: str):
    """Register ``fn(objective, k, seed) -> Route`` as static baseline ``name`` (and as a searcher)."""
    def deco(fn):
        BASELINES.add(name, fn)
        register_searcher(type(f"{name.title().replace('_', '')}Baseline", (BaselineSearch,),
                               {"name": name, "__doc__": fn.__doc__}))
        return fn
    return deco


def _skip(obj: Objective, skipped) -> Route:
    fp, skipped = obj.executor.fingerprint, set(skipped)
    return Route(tuple(i for i in range(fp.num_layers) if i not in skipped), fp)


last_token_states = Objective.last_token_states  # [L+1, N, H], computed once per objective


@register_baseline("unified")
def unified(obj: Objective, k: int, seed: int = 0) -> Route:
    """Skips spread evenly over the middle layers (the first and last tenth stay)."""
    L = obj.num_layers
    n_skip, edge = L - k, max(1, L // 10)
    lo, hi = edge, L - edge  # middle layers [lo, hi)
    if n_skip > hi - lo:
        lo, hi = 0, L
    positions = sorted({lo + int(i * (hi - lo) / n_skip + (hi - lo) / (2 * n_skip)) for i in range(n_skip)}) \
        if n_skip else []
    return _skip(obj, positions)


@register_baseline("drop_last")
def drop_last(obj: Objective, k: int, seed: int = 0) -> Route:
    """Drop the last blocks."""
    return _skip(obj, range(k, obj.num_layers))


@register_baseline("similarity")
def similarity(obj: Objective, k: int, seed: int = 0) -> Route:
    """Drop the contiguous run of blocks whose input and output states are most alike."""
    L, n = obj.num_layers, obj.num_layers - k
    if n == 0:
        return _skip(obj, [])
    h = obj.last_token_states()  # h[l] enters block l; h[L] leaves the last block

    def distance(start: int) -> float:
        cos = torch.nn.functional.cosine_similarity(h[start], h[start + n], dim=-1).clamp(-1, 1)
        return float(torch.arccos(cos).mean() / math.pi)
    best = min(range(L - n + 1), key=distance)
    return _skip(obj, range(best, best + n))


@dataclass
class GreedyProgress:
    """Greedy removal on one objective so far: the blocks removed, in order (kept across calls)."""

    order: list[int] = field(default_factory=list)


@memoised
def greedy_progress(obj: Objective, reuse_prefix: bool = True) -> GreedyProgress:
    """The removal order found so far on ``obj`` (with or without prefix reuse; a resumed run sets it)."""
    return GreedyProgress()


@memoised
def greedy_cost(obj: Objective) -> dict:
    """The work of greedy removal on ``obj``, summed over both modes' calls: per-sample block executions,
    per-sample finishes (LM head and scoring) and seconds."""
    return {"sample_blocks": 0, "sample_finishes": 0, "seconds": 0.0}


def greedy_order(obj: Objective, k: int, reuse_prefix: bool = True) -> list[int]:
    """Blocks in the order greedy removal drops them, down to ``k`` kept (kept on ``obj``: ``greedy_progress``).

    Each round removes the block whose removal keeps the mean reward highest (ties: the lowest
    index). With ``reuse_prefix`` (the default) a candidate's route is not run from the start:
    every candidate of a round shares the blocks kept before it, so the state after them is
    advanced one block at a time and each candidate runs only the rest (a round of ``K`` kept
    blocks costs ``K(K+1)/2`` block executions per sample instead of ``K(K-1)``). Without it,
    each candidate is scored from the embeddings (the reference the tests compare against).
    ``greedy_cost(obj)`` counts the work. Each chunk's embedded rows come from ``obj.prefixes``.
    """
    order, cost = greedy_progress(obj, reuse_prefix).order, greedy_cost(obj)
    L = obj.num_layers
    for _ in tqdm(range(len(order), L - k), desc=f"greedy removal to {k} blocks", leave=False):
        start = time.perf_counter()
        kept = [i for i in range(L) if i not in order]
        totals = dict.fromkeys(kept, 0.0)
        for chunk in obj.batches(range(len(obj))):
            _greedy_round(obj, chunk, kept, totals, cost, reuse_prefix)
        order.append(max(totals, key=totals.get))  # ties: the lowest index (dicts keep order)
        cost["seconds"] += time.perf_counter() - start
    return order[: L - k]


def _greedy_round(obj: Objective, chunk: list[int], kept: list[int], totals: dict, cost: dict,
                  reuse_prefix: bool) -> None:
    """Add each candidate removal's summed reward on ``chunk`` to ``totals``."""
    n = len(chunk)
    begun = obj.prefixes.pin(chunk, lambda: obj.begin(chunk))
    state = begun
    for pos, i in enumerate(kept):
        if reuse_prefix:
            chain, base = kept[pos + 1:], state  # the kept blocks before i already ran in `state`
        else:
            chain, base = kept[:pos] + kept[pos + 1:], begun
        totals[i] += float(obj.finish(obj.advance(base, [chain] * n)).reward.sum())
        cost["sample_blocks"] += n * len(chain)
        cost["sample_finishes"] += n
        if reuse_prefix and pos + 1 < len(kept):
            state = obj.advance(state, [[i]] * n)
            cost["sample_blocks"] += n


@register_baseline("greedy")
def greedy(obj: Objective, k: int, seed: int = 0) -> Route:
    """Remove, one at a time, the block whose removal keeps the mean reward highest."""
    return _skip(obj, greedy_order(obj, k))


@register_baseline("random")
def random_skip(obj: Objective, k: int, seed: int = 0) -> Route:
    """Skip a seeded random set of blocks."""
    L = obj.num_layers
    return _skip(obj, random.Random(seed).sample(range(L), L - k))


def baseline_route(name: str, obj: Objective, ratio: float, seed: int = 0) -> Route:
    """The route of baseline ``name`` at compute ``ratio``, chosen on ``obj``'s examples."""
    return BASELINES.get_or_raise(name)(obj, blocks_for_ratio(ratio, obj.num_layers), seed)


CALIB_LIMIT = 256  # search-split samples a static route is fitted on, by default
VAL_LIMIT = 256  # validation-split samples that choose between candidate routes, by default


def route_stats(obj: Objective, route: Route | tuple[int, ...]) -> dict:
    """One route on every example of ``obj``: ``n``, ``blocks``, mean ``reward`` and, on choice tasks,
    ``correct``, ``accuracy`` and its 95% Wilson ``ci95`` (None elsewhere). Computed once per route."""
    return _route_stats(obj, tuple(route.layers if isinstance(route, Route) else route))


@memoised
def _route_stats(obj: Objective, layers: tuple[int, ...]) -> dict:
    scores = obj.score(range(len(obj)), [layers] * len(obj))
    n, stats = len(obj), {"n": len(obj), "blocks": len(layers), "reward": float(scores.reward.mean()),
                          "correct": None, "accuracy": None, "ci95": None}
    if obj.task.kind == "choice":
        k = int(scores.correct.sum())
        stats.update(correct=k, accuracy=k / n, ci95=list(wilson_interval(k, n)))
    return stats


def remember_route_stats(obj: Objective, layers, stats: dict) -> None:
    """Take ``stats`` (for example from a stored row) as ``route_stats(obj, layers)``: a resumed run."""
    _route_stats.remember(obj, stats, tuple(layers))


def validation_key(stats: dict) -> tuple[float, float]:
    """How candidate routes are ranked on validation: accuracy (choice tasks), then mean reward."""
    return (stats["accuracy"] if stats["accuracy"] is not None else 0.0, stats["reward"])


def choose_on_validation(val: Objective, candidates: dict[str, Route]) -> tuple[str, dict[str, dict]]:
    """The name of the candidate route that scores best on ``val`` (``validation_key``; ties: the first
    given), and every candidate's validation stats (``route_stats``)."""
    if not candidates:
        raise RouteError("no candidate routes to choose from")
    table = {name: route_stats(val, route) for name, route in candidates.items()}
    return max(table, key=lambda name: validation_key(table[name])), table


def run_baselines(executor: RouteExecutor, tokenizer, task, budgets, names=None, *, limit=None,
                  calib_limit: int = CALIB_LIMIT, val_limit: int = VAL_LIMIT, seed: int = 0, batch_size: int = 8,
                  progress: bool = True, store=None) -> list[dict]:
    """Every baseline at every budget on the test split: fitted on the first ``calib_limit`` search-split
    samples, scored on the first ``val_limit`` validation-split samples, then evaluated on the test split.

    ``names`` may add ``"optuna"``: an Optuna study on the same calibration samples and budget whose
    top trials are re-scored on validation (``optuna_route``). With two or more names, each budget
    also gets a ``best`` row: the row at that budget with the best validation score
    (``validation_key``), never chosen on the test split.

    Returns one row per (baseline, budget) plus the full model, each with its route, ``calib_n`` and
    its validation stats (``val``). With a ``ResultsStore``, each row is appended when done and rows
    already there are not redone.
    """
    names = list(names or BASELINES)
    for n in names:
        if n not in BASELINES and n != "optuna":
            raise RouteError(f"unknown baseline {n!r}; choose from {', '.join(BASELINES)} (or optuna)")
    blocks = {b: blocks_for_ratio(b, executor.num_layers) for b in budgets}  # validates before any work
    stored = {r["key"]: r for r in (store.records if store is not None else []) if r.get("type") == "row"}
    per_budget = names + ["best"] if len(names) > 1 else names
    plan = [("full", 1.0)] + [(n, b) for b in budgets for n in per_budget if blocks[b] < executor.num_layers]
    cal = val = None
    test, rows, seen = task.split("test", seed), [], {}
    for name, ratio in plan:
        key = f"{name}@{ratio:g}"
        if key in stored:
            rows.append(stored[key])
            continue
        if name == "best":
            mine = [r for r in rows if r["budget"] == ratio and r["baseline"] != "best"]
            chosen = max(mine, key=lambda r: validation_key(r["val"]))
            row = {**chosen, "key": key, "baseline": "best", "chosen": chosen["baseline"]}
        else:
            if name != "full" and cal is None:
                cal = Objective.from_task(executor, tokenizer, task, "search", calib_limit, seed,
                                          option="--calib-limit")
                val = Objective.from_task(executor, tokenizer, task, "validation", val_limit, seed,
                                          option="--val-limit")
            if name == "optuna":
                from .optuna_search import optuna_route

                route = optuna_route(cal, blocks[ratio], seed, validation=val)
            else:
                route = executor.route() if name == "full" else baseline_route(name, cal, ratio, seed)
            if route.layers not in seen:  # baselines that agree share one evaluation
                seen[route.layers] = evaluate(executor, tokenizer, test, route, batch_size=batch_size, limit=limit,
                                              progress=progress)
            res = seen[route.layers]
            row = {"type": "row", "key": key, "baseline": name, "budget": ratio, "blocks": route.cost,
                   "accuracy": res.accuracy, "ci95": res.ci95, "gold_nll": res.mean_gold_nll, "n": res.n,
                   "route": route.to_dict(), "calib_n": None if name == "full" else len(cal),
                   "val": None if name == "full" else route_stats(val, route)}
        if store is not None:
            store.append(row)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["baseline", "budget", "blocks", "accuracy", "95% CI", "gold NLL/token", "n", "calib n", "val accuracy",
              "val n"]
    body = []
    for r in rows:
        val = r.get("val") or {}
        val_acc = "" if val.get("accuracy") is None else pct(val["accuracy"])
        name = f"best ({r['chosen']})" if r["baseline"] == "best" else r["baseline"]
        body.append([name, f"{r['budget']:.2f}", r["blocks"], pct(r["accuracy"]), ci(r["ci95"]), f"{r['gold_nll']:.3f}",
                     r["n"], r.get("calib_n") or "", val_acc, val.get("n", "")])
    return "\n".join(table(header, body))


def plot_curves(rows: list[dict], path, title: str) -> None:
    """Accuracy (with 95% CI) against executed blocks, one line per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerroute.tables import error_bars

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    full = next(r for r in rows if r["baseline"] == "full")
    for name in dict.fromkeys(r["baseline"] for r in rows if r["baseline"] != "full"):
        pts = sorted([full] + [r for r in rows if r["baseline"] == name], key=lambda r: r["blocks"])
        if pts[0]["accuracy"] is None:
            continue
        x = [r["blocks"] for r in pts]
        y = [100 * r["accuracy"] for r in pts]
        err = error_bars([r["accuracy"] for r in pts], [r["ci95"] for r in pts])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, alpha=0.85)
    ax.set_xlabel("executed blocks per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
