"""Static baselines: one route for every input, at a target share of the blocks.

Each baseline sees only calibration examples (the task's ``search`` split) and returns a
route that executes exactly ``floor(ratio * L)`` blocks, in order:

* ``unified``: skips spread evenly over the middle layers (the first and last tenth stay).
* ``drop_last``: drop the last blocks.
* ``similarity``: drop the contiguous run of blocks whose input and output hidden states are
  most alike (angular distance at the last prompt token; Gromov et al., "The Unreasonable
  Ineffectiveness of the Deeper Layers").
* ``greedy``: remove, one at a time, the block whose removal hurts the calibration loss (gold
  NLL per token) least.
* ``random``: skip a seeded random set of blocks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from tqdm.auto import tqdm

from layerroute.errors import RouteError
from layerroute.executor import RouteExecutor
from layerroute.route import Route
from layerroute.scoring import encode_texts, gold_nll_per_token, left_pad, task_prompts

BASELINES: dict[str, Callable] = {}


def register_baseline(name: str):
    def deco(fn):
        if name in BASELINES:
            raise ValueError(f"baseline {name!r} is already registered")
        BASELINES[name] = fn
        return fn
    return deco


def blocks_for_ratio(ratio: float, num_layers: int) -> int:
    """Blocks a ratio buys: ``floor(ratio * L)``, so a baseline never runs more than its budget."""
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 < ratio <= 1:
        raise RouteError(f"compute ratio must be in (0, 1], got {ratio!r}")
    k = math.floor(ratio * num_layers + 1e-9)  # the epsilon keeps 0.7 * 30 at 21
    if k < 1:
        raise RouteError(f"ratio {ratio} of {num_layers} blocks leaves no block to run; the minimum is "
                         f"{1 / num_layers:.3f}")
    return k


@dataclass
class Calibration:
    """What the baselines may look at: the model and calibration examples of one task."""

    executor: RouteExecutor
    tokenizer: object
    task: object
    examples: list
    seed: int = 0
    batch_size: int = 8
    progress: bool = False
    _hidden: torch.Tensor | None = field(default=None, repr=False)
    _greedy_order: list[int] = field(default_factory=list, repr=False)  # shared by every budget

    @classmethod
    def from_task(cls, executor: RouteExecutor, tokenizer, task, limit: int | None = 32, seed: int = 0,
                  **kwargs) -> Calibration:
        """Calibrate on the first ``limit`` examples of ``task``'s search split, never on test."""
        from layerroute.evaluation import limit_examples

        examples = limit_examples(task.split("search", seed).examples, limit, "--calib-limit")
        if not examples:
            raise RouteError(f"task {task.name} has no calibration (search split) examples")
        return cls(executor, tokenizer, task, examples, seed=seed, **kwargs)

    @cached_property
    def prompts(self) -> list[str]:
        return task_prompts(self.tokenizer, self.task, self.examples)

    def loss(self, route: Route) -> float:
        """Mean gold NLL per token along ``route`` over the calibration examples."""
        nll = []
        for i in range(0, len(self.examples), self.batch_size):
            examples, prompts = self.examples[i:i + self.batch_size], self.prompts[i:i + self.batch_size]
            nll += gold_nll_per_token(self.executor, self.tokenizer, self.task, examples, prompts,
                                      [route] * len(examples))[0]
        return sum(nll) / len(nll)

    def last_token_states(self) -> torch.Tensor:
        """[L+1, N, H] identity-route hidden states at each prompt's last token."""
        if self._hidden is None:
            ids_all = encode_texts(self.tokenizer, self.prompts)
            parts = []
            for i in range(0, len(ids_all), self.batch_size):
                ids, mask = left_pad(ids_all[i:i + self.batch_size], self.tokenizer, self.executor.device)
                hs = self.executor(ids, mask, output_hidden_states=True, logits_to_keep=1).hidden_states
                parts.append(torch.stack([h[:, -1].float() for h in hs]))
            self._hidden = torch.cat(parts, dim=1)
        return self._hidden


def _skip(cal: Calibration, skipped) -> Route:
    fp = cal.executor.fingerprint
    return Route(tuple(i for i in range(fp.num_layers) if i not in set(skipped)), fp)


@register_baseline("unified")
def unified(cal: Calibration, k: int) -> Route:
    L = cal.executor.num_layers
    n_skip, edge = L - k, max(1, L // 10)
    lo, hi = edge, L - edge  # middle layers [lo, hi)
    if n_skip > hi - lo:
        lo, hi = 0, L
    positions = sorted({lo + int(i * (hi - lo) / n_skip + (hi - lo) / (2 * n_skip)) for i in range(n_skip)}) \
        if n_skip else []
    return _skip(cal, positions)


@register_baseline("drop_last")
def drop_last(cal: Calibration, k: int) -> Route:
    return _skip(cal, range(k, cal.executor.num_layers))


@register_baseline("similarity")
def similarity(cal: Calibration, k: int) -> Route:
    L, n = cal.executor.num_layers, cal.executor.num_layers - k
    if n == 0:
        return _skip(cal, [])
    h = cal.last_token_states()  # h[l] enters block l; h[L] leaves the last block
    def distance(start: int) -> float:
        cos = torch.nn.functional.cosine_similarity(h[start], h[start + n], dim=-1).clamp(-1, 1)
        return float(torch.arccos(cos).mean() / math.pi)
    best = min(range(L - n + 1), key=distance)
    return _skip(cal, range(best, best + n))


@register_baseline("greedy")
def greedy(cal: Calibration, k: int) -> Route:
    L, order = cal.executor.num_layers, cal._greedy_order
    for _ in tqdm(range(len(order), L - k), desc=f"greedy removal to {k} blocks", disable=not cal.progress):
        losses = {i: cal.loss(_skip(cal, order + [i])) for i in range(L) if i not in order}
        order.append(min(losses, key=losses.get))
    return _skip(cal, order[: L - k])


@register_baseline("random")
def random_skip(cal: Calibration, k: int) -> Route:
    L = cal.executor.num_layers
    return _skip(cal, random.Random(cal.seed).sample(range(L), L - k))


def baseline_route(name: str, cal: Calibration, ratio: float) -> Route:
    """The route of baseline ``name`` at compute ``ratio``."""
    if name not in BASELINES:
        raise RouteError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return BASELINES[name](cal, blocks_for_ratio(ratio, cal.executor.num_layers))


def run_baselines(executor: RouteExecutor, tokenizer, task, budgets, names=None, *, limit=None,
                  calib_limit: int = 32, seed: int = 0, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Evaluate every baseline at every budget on the test split, calibrated on the search split.

    Returns one row per (baseline, budget) plus the full model, each with its route.
    """
    from layerroute.evaluation import evaluate

    names = list(names or BASELINES)
    cal = Calibration.from_task(executor, tokenizer, task, calib_limit, seed, batch_size=batch_size, progress=progress)
    test = task.split("test", seed)
    rows, seen = [], {}
    plan = [("full", 1.0)] + [(n, b) for b in budgets for n in names if b < 1.0]
    for name, ratio in plan:
        route = executor.route() if name == "full" else baseline_route(name, cal, ratio)
        if route.layers not in seen:  # baselines that agree share one evaluation
            seen[route.layers] = evaluate(executor, tokenizer, test, route, batch_size=batch_size, limit=limit,
                                          progress=progress)
        res = seen[route.layers]
        rows.append({"baseline": name, "budget": ratio, "blocks": route.cost, "accuracy": res.accuracy,
                     "ci95": res.ci95, "gold_nll": res.mean_gold_nll, "n": res.n, "route": route.to_dict()})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| baseline | budget | blocks | accuracy | 95% CI | gold NLL/token | n |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        ci = "" if r["ci95"] is None else f"{100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}"
        lines.append(f"| {r['baseline']} | {r['budget']:.2f} | {r['blocks']} | {acc} | {ci} | "
                     f"{r['gold_nll']:.3f} | {r['n']} |")
    return "\n".join(lines)


def plot_curves(rows: list[dict], path, title: str) -> None:
    """Accuracy (with 95% CI) against executed blocks, one line per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    full = next(r for r in rows if r["baseline"] == "full")
    for name in dict.fromkeys(r["baseline"] for r in rows if r["baseline"] != "full"):
        pts = sorted([full] + [r for r in rows if r["baseline"] == name], key=lambda r: r["blocks"])
        if pts[0]["accuracy"] is None:
            continue
        x = [r["blocks"] for r in pts]
        y = [100 * r["accuracy"] for r in pts]
        err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in pts], [100 * (r["ci95"][1] - r["accuracy"]) for r in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, alpha=0.85)
    ax.set_xlabel("executed blocks per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
