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

Resumable and written as it goes: finished rows go to ``<out>/rows.jsonl`` (a results store),
each Optuna study to ``<out>/<task>/optuna-<point>/`` (its own store and ``study.db``), and
``experiments/results/optuna_table.md`` is rewritten after every row::

    OMP_NUM_THREADS=1 nohup python -m layerroute.experiments.optuna_table > runs/optuna_table.log 2>&1 &
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE_NAMES = ("unified", "drop_last", "similarity", "greedy", "random")
DEFAULT_TASKS = ("suite", "gen:add2", "gen:mul", "gen:compare", "gen:numwords")


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


def format_table(rows: list[dict], args) -> str:
    lines = ["# Optuna per-task routes against the full model and the static baselines (SmolLM2-135M-Instruct)", "",
             f"Routes fitted on the first {args.search_limit} search-split examples; scored on the first "
             f"{args.test_limit} test-split examples (seed {args.seed}). Optuna: TPE, {args.trials} trials, skip "
             f"space, margin reward, median pruning; its {args.top} best trials re-scored on the first "
             f"{args.val_limit} validation-split examples and the best there kept; `lambda` = its own best point "
             f"with lambda = {args.lam:g} and no hard budget (chosen on the search split). Accuracy with 95% Wilson CI; blocks executed per token (of 30).", "",
             "Command: `OMP_NUM_THREADS=1 python -m layerroute.experiments.optuna_table " + " ".join(args.argv) + "`",
             "", "| task | method | budget | blocks | accuracy | 95% CI | n |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['point']} | {r['blocks']} | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f} | {r['n']} |")
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
                       + ", ".join(f"{r['method']}@{r['point']} {100 * r['accuracy']:.1f}%" for r in higher))
        else:
            verdict = "nothing beats the full model"
        lines.append(f"- **{task}** (full {100 * full['accuracy']:.1f}%, {len(mine)} rows done): {verdict}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import sys

    from layerroute import RouteExecutor, load_model
    from layerroute.budget import blocks_for_ratio
    from layerroute.objective import Objective
    from layerroute.search.baselines import BASELINES
    from layerroute.store import ResultsStore, atomic_write
    from layerroute.tasks import get_task

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--search-limit", type=int, default=256)
    p.add_argument("--val-limit", type=int, default=256)
    p.add_argument("--top", type=int, default=3, help="Optuna trials re-scored on validation")
    p.add_argument("--test-limit", type=int, default=100)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--batch-rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/optuna_table")
    p.add_argument("--methods", default=None, help="only these methods (comma-separated), e.g. greedy")
    p.add_argument("--md", default=str(RESULTS / "optuna_table.md"))
    p.add_argument("--render", default=None, help="no compute: the table of the rows in these --out folders")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        from layerroute.store import read_store

        rows = [r for d in args.render.split(",") for r in read_store(Path(d) / "rows.jsonl")[1] if r.get("type") == "row"]
        order = {k: i for i, k in enumerate((t, m, p) for t in args.tasks.split(",") for m, p in plan(30))}
        rows.sort(key=lambda r: order.get((r["task"], r["method"], r["point"]), len(order)))
        argv = args.argv
        args.argv = [a for i, a in enumerate(argv) if a not in ("--render", "--md") and
                     (i == 0 or argv[i - 1] not in ("--render", "--md"))]
        atomic_write(args.md, format_table(rows, args).replace(
            "`\n", f"` (rows computed by separate processes with `--methods` and `--out`, then rendered with "
                   f"`--render {args.render}`)\n", 1))
        return
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ex = RouteExecutor(model)
    L, out = ex.num_layers, Path(args.out)
    skip = ("argv", "out", "tasks", "threads", "methods", "md", "render")
    header = {"kind": "optuna_table", "settings": {k: v for k, v in vars(args).items() if k not in skip},
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
                if key in store.done() or args.methods and method not in args.methods.split(","):
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
                atomic_write(args.md, format_table(rows, args))
                print(f"{key}: {100 * row['accuracy']:.1f}% at {row['blocks']} blocks ({row['seconds']} s)",
                      flush=True)


if __name__ == "__main__":
    main()
