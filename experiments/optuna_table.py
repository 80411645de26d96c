"""Optuna per-task routes against the full model and every static baseline, on held-out test splits.

For each task: routes are fitted on the first ``--search-limit`` examples of the search split
(every static baseline and an Optuna study per budget; Optuna's ``--top`` best trials are
re-scored on the first ``--val-limit`` validation-split examples and the best there is kept,
except at its ``lambda`` point, whose trade-off is the reward's), then scored on the first
``--test-limit`` examples of the test split: accuracy with a 95% Wilson interval and blocks.
Rows: the full model; each baseline and Optuna at 0.9 and 0.8 of the blocks (every baseline is
the full model at 1.0); Optuna at 1.0 (it may skip blocks, no penalty); and Optuna at its own
best point (``--lam`` > 0, no hard budget). Test scoring uses the shared ``Objective``:
``correct`` is the task's own scoring rule (margin > 0), as ``layerroute eval`` counts it.

Resumable and written as it goes: finished rows go to ``<run-dir>/rows.jsonl`` (a results store),
each Optuna study to ``<run-dir>/<task>/optuna-<point>/`` (its own store and ``study.db``), and
``OUT/optuna_table.md`` and ``.json`` (``--out``; headed by the command and the date) are rewritten
after every row. One command makes the whole table (the committed one: ``--out experiments/results``)::

    OMP_NUM_THREADS=1 nohup python -m layerroute.experiments.optuna_table --out experiments/results \
        > runs/optuna_table.log 2>&1 &
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path


from layerroute.config import option, parse_config
from layerroute.experiments import SeededArgs
from layerroute.tables import ci, pct, table, write_result

BASELINE_NAMES = ("unified", "drop_last", "similarity", "greedy", "random")
DEFAULT_TASKS = ("suite", "gen:add2", "gen:mul", "gen:compare", "gen:numwords")


@dataclass
class Args(SeededArgs):
    tasks: str = option(",".join(DEFAULT_TASKS), "comma-separated tasks")
    search_limit: int = option(256, "search-split examples the routes are fitted on")
    val_limit: int = option(256, "validation-split examples that choose among Optuna's top trials")
    top: int = option(3, "Optuna trials re-scored on validation")
    test_limit: int = option(100, "test-split examples every row is scored on")
    trials: int = option(16, "Optuna trials per study")
    lam: float = option(1.0, "lambda of Optuna's own best point (the `lambda` rows)")
    batch_rows: int = option(32, "rows per objective call")
    run_dir: str = option("runs/optuna_table", "the resumable stores of the run")


def test_row(test, route) -> dict:
    """Accuracy (95% Wilson CI) and blocks of ``route`` on the ``test`` objective."""
    from layerroute.search.baselines import route_stats

    stats = route_stats(test, route)
    return {**{k: stats[k] for k in ("accuracy", "ci95", "n", "blocks")}, "layers": list(route.layers)}


def optuna_route(ex, tok, task, examples, point: str, args, out: Path, val=None):
    """The route of an Optuna study on the search examples (resumable under ``out``): the best on
    ``val`` among its ``args.top`` best trials, or the best on the search examples without ``val``."""
    from layerroute.objective import Objective
    from layerroute.route import Route
    from layerroute.search import run_search
    from layerroute.search.optuna_search import OptunaConfig, OptunaSearch
    from layerroute.store import ResultsStore

    budget, lam = (None, args.lam) if point == "lambda" else (float(point), 0.0)
    obj = Objective(ex, tok, task, examples, budget=budget, lam=lam, batch_rows=args.batch_rows)
    searcher = OptunaSearch(obj, OptunaConfig(trials=args.trials), seed=args.seed)
    header = {"kind": "search:optuna", "settings": {**searcher.settings(), "budget": budget, "lambda": lam},
              "model": ex.fingerprint.to_dict(), "task": task.name, "split": "search", "seed": args.seed}
    with ResultsStore(out, header) as store:
        summary = run_search(searcher, store, progress=False)
        records = [r for r in store.records if r.get("type") != "summary"]
    if val is None:
        return Route.from_dict(summary["route"], ex.fingerprint), summary
    from layerroute.search.baselines import choose_on_validation
    from layerroute.search.optuna_search import top_routes

    top = {r["number"]: r for r in top_routes(records, args.top)}
    chosen, _ = choose_on_validation(val, {n: searcher.route(r["layers"]) for n, r in top.items()})
    return searcher.route(top[chosen]["layers"]), {**summary, "trial": chosen, "reward": top[chosen]["reward"]}


def plan(L: int):
    """(method, point) rows in the order they are worth having: cheap and telling first, greedy last."""
    rows = [("full", "1.0")]
    for ratio in ("0.8", "0.9"):
        rows += [("optuna", ratio)] + [(b, ratio) for b in BASELINE_NAMES if b != "greedy"]
    rows += [("optuna", "lambda"), ("optuna", "1.0"), ("greedy", "0.9"), ("greedy", "0.8")]  # 0.8 extends 0.9's order
    return rows


def format_table(rows: list[dict], args: Args) -> list[str]:
    lines = [f"Routes fitted on the first {args.search_limit} search-split examples; scored on the first "
             f"{args.test_limit} test-split examples (seed {args.seed}). Optuna: TPE, {args.trials} trials, skip "
             f"space, margin reward, median pruning; its {args.top} best trials re-scored on the first "
             f"{args.val_limit} validation-split examples and the best there kept; `lambda` = its own best point "
             f"with lambda = {args.lam:g} and no hard budget (chosen on the search split). Accuracy with 95% Wilson "
             f"CI; blocks executed per token (of 30).", ""]
    lines += table(["task", "method", "budget", "blocks", "accuracy", "95% CI", "n"],
                   [[r["task"], r["method"], r["point"], r["blocks"], pct(r["accuracy"]), ci(r["ci95"]), r["n"]]
                    for r in rows])
    lines += ["", "## Does anything beat the full model?", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        full = next((r for r in mine if r["method"] == "full"), None)
        if full is None:
            continue
        better = [r for r in mine if r["method"] != "full" and r["ci95"][0] > full["ci95"][1]]
        higher = [r for r in mine if r["method"] != "full" and r["accuracy"] > full["accuracy"]]
        if better:
            verdict = "beaten outside the CIs by " + ", ".join(f"{r['method']}@{r['point']}" for r in better)
        elif higher:
            verdict = ("nothing beats the full model outside the 95% CIs; higher point estimates (within the CIs): "
                       + ", ".join(f"{r['method']}@{r['point']} {pct(r['accuracy'])}" for r in higher))
        else:
            verdict = "nothing beats the full model"
        lines.append(f"- **{task}** (full {pct(full['accuracy'])}, {len(mine)} rows done): {verdict}.")
    return lines


def write_table(rows: list[dict], args: Args) -> None:
    write_result(args.path("optuna_table"), "Optuna per-task routes against the full model and the static "
                 "baselines (SmolLM2-135M-Instruct)", format_table(rows, args), {"settings": asdict(args), "rows": rows})


def main(argv=None) -> None:
    from layerroute.budget import blocks_for_ratio
    from layerroute.objective import Objective
    from layerroute.search.baselines import BASELINES
    from layerroute.store import ResultsStore
    from layerroute.tasks import get_task

    args = parse_config(Args, argv, __doc__.splitlines()[0])
    ex, tok = args.executor(args.threads)
    L, out = ex.num_layers, Path(args.run_dir)
    skip = ("model", "out", "run_dir", "tasks", "threads")
    header = {"kind": "optuna_table", "settings": {k: v for k, v in asdict(args).items() if k not in skip},
              "model": ex.fingerprint.to_dict(), "task": "many", "split": "test", "seed": args.seed}
    with ResultsStore(out / "rows.jsonl", header) as store:
        rows = [r for r in store.records if r.get("type") == "row"]
        for name in args.tasks.split(","):
            task = get_task(name, seed=args.seed)
            cal = Objective.from_task(ex, tok, task, "search", args.search_limit, args.seed,
                                      batch_rows=args.batch_rows)
            test = Objective.from_task(ex, tok, task, "test", args.test_limit, args.seed, batch_rows=args.batch_rows)
            val = Objective.from_task(ex, tok, task, "validation", args.val_limit, args.seed,
                                      batch_rows=args.batch_rows)
            scored = {}
            for method, point in plan(L):
                key = f"{task.name}|{method}@{point}"
                if key in store.done():
                    continue
                t = time.time()
                extra = {}
                if method == "full":
                    route = ex.route()
                elif method == "optuna":
                    route, summary = optuna_route(ex, tok, task, cal.examples, point, args,
                                                  out / task.name.replace(":", "-") / f"optuna-{point}",
                                                  None if point == "lambda" else val)
                    extra = {"search_reward": summary["reward"], "pruned": summary["pruned"]}
                else:
                    route = BASELINES[method](cal, blocks_for_ratio(float(point), L), args.seed)
                if route.layers not in scored:
                    scored[route.layers] = test_row(test, route)
                row = {"type": "row", "key": key, "task": task.name, "method": method, "point": point,
                       **scored[route.layers], **extra, "seconds": round(time.time() - t, 1)}
                store.append(row)
                rows.append(row)
                write_table(rows, args)
                print(f"{key}: {100 * row['accuracy']:.1f}% at {row['blocks']} blocks ({row['seconds']} s)",
                      flush=True)


if __name__ == "__main__":
    main()
