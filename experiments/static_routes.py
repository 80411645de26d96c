"""Static routes worth beating: every static baseline and Optuna, fitted on search, chosen on validation, scored on test.

At each budget (a share of the blocks), every static baseline (``unified``, ``drop_last``,
``similarity``, ``random``, ``greedy``) and an Optuna study are fitted on the first
``--calib-limit`` search-split samples; Optuna re-scores its ``--top`` best distinct trials on the
first ``--val-limit`` validation-split samples and keeps the best there; the **best static route**
at a budget is the row with the best validation score (accuracy, then mean margin;
``layerroute.search.baselines.validation_key``). Every row is then scored on the first
``--test-limit`` test-split samples: accuracy with a 95% Wilson interval, and blocks (a static
route runs the same blocks on every sample, so its mean blocks are its blocks). The test split
never chooses anything. Scoring is the shared ``Objective``: a sample is correct when the gold
option has the highest log-likelihood, as ``layerroute eval`` counts it.

Resumable and written as it goes: rows go to ``<run-dir>/rows.jsonl`` (a results store) and
``OUT/<name>.md`` and ``.json`` (``--out``) are rewritten after every row. ``greedy`` runs
last (it is the costly one; each budget extends the removal order of the one before). One command
makes the whole table (the committed one: ``--trials 12 --greedy-calib-limit 32 --out experiments/results``)::

    OMP_NUM_THREADS=1 nohup python -m layerroute.experiments.static_routes --out experiments/results \
        > runs/static_routes.log 2>&1 &
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from layerroute.config import option, parse_config
from layerroute.experiments import SeededArgs, experiment_command
from layerroute.search.base import SearchError
from layerroute.tables import ci as ci_text
from layerroute.tables import pct as pct_text

STATIC = ("full", "unified", "drop_last", "similarity", "random", "optuna", "greedy")


@dataclass
class Args(SeededArgs):
    task: str = option("gen", "the task (see `layerroute tasks`)")
    budgets: str = option("0.9,0.8,0.7", "shares of the blocks (the full model is always scored)")
    methods: str = option(",".join(STATIC), "the full model, static baselines and optuna, comma-separated")
    calib_limit: int = option(256, "search-split samples every route is fitted on")
    greedy_calib_limit: int = option(0, "search-split samples greedy is fitted on (0: --calib-limit)")
    val_limit: int = option(256, "validation-split samples that choose between candidates")
    test_limit: int = option(300, "test-split samples every row is scored on")
    trials: int = option(16, "Optuna trials per budget (TPE, median pruning)")
    top: int = option(3, "Optuna's best distinct trials (by search reward) re-scored on validation")
    batch_rows: int = option(64, "token rows per executor call")
    run_dir: str = option("runs/static_routes", "folder of the resumable results store")
    name: str = option("static_routes", "writes OUT/<name>.md and .json")

    def validate(self) -> None:
        unknown = set(self.methods.split(",")) - set(STATIC)
        if unknown:
            raise SearchError(f"unknown methods {sorted(unknown)}; use {', '.join(STATIC)}")
        self.require_positive("calib_limit", "val_limit", "test_limit", "trials", "top", "batch_rows", "threads",
                              error=SearchError)

    @property
    def ratios(self) -> list[float]:
        return [float(b) for b in self.budgets.split(",")]


def plan(args: Args) -> list[tuple[str, float]]:
    """(method, budget) in the order worth having: the full model, the cheap rows per budget, greedy last."""
    methods = args.methods.split(",")
    rows = [("full", 1.0)] * ("full" in methods) + [(m, b) for b in args.ratios for m in methods
                                                   if m not in ("full", "greedy")]
    return rows + [("greedy", b) for b in sorted(args.ratios, reverse=True) if "greedy" in methods]


def pct(stats: dict) -> str:
    return pct_text(stats["accuracy"])


def ci(stats: dict) -> str:
    return ci_text(stats["ci95"])


def best_static(rows: list[dict], budget: float) -> dict | None:
    """The static row at ``budget`` with the best validation score (ties: the earlier row)."""
    from layerroute.search.baselines import validation_key

    mine = [r for r in rows if r["budget"] == budget and r["method"] != "full"]
    return max(mine, key=lambda r: validation_key(r["val"])) if mine else None


def render(rows: list[dict], args: Args, command: str, L: int) -> tuple[str, dict]:
    """The markdown report and its JSON twin."""
    full = next((r for r in rows if r["method"] == "full"), None)
    dates = sorted(r["finished"] for r in rows)
    pending = [f"{m}@{b:g}" for m, b in plan(args) if not any(r["key"] == f"{m}@{b:g}" for r in rows)]
    greedy_n = args.greedy_calib_limit or args.calib_limit
    commands = list(dict.fromkeys(r.get("command", command) for r in rows))
    lines = [f"# Static routes worth beating on `{args.task}` ({args.model}, test split)", "",
             "Command" + (f": `{commands[0]}`" if len(commands) == 1 else "s (the run was resumed with other "
                          "arguments): " + "; ".join(f"`{c}`" for c in commands)), "",
             f"Date: {dates[0] if dates else '-'} to {dates[-1] if dates else '-'} (UTC; CPU, {args.threads} torch "
             f"thread(s), a 2-core machine shared with other jobs).", "",
             f"Every route is fitted on the first {args.calib_limit} search-split samples (greedy: {greedy_n}); "
             f"candidates are compared on the first {args.val_limit} validation-split samples; every row is scored on "
             f"the first {args.test_limit} test-split samples (seed {args.seed}), which choose nothing. Optuna: TPE, "
             f"{args.trials} trials per budget, skip space (exactly k blocks), margin reward, median pruning; its "
             f"{args.top} best distinct trials by search-split margin are re-scored on validation and the best there "
             f"is kept. **best static** = the static row at that budget with the best validation accuracy (ties: "
             f"mean validation margin). Accuracy with 95% Wilson CI; a static route runs the same blocks on every "
             f"sample, so mean blocks = blocks (of {L}).", "",
             "| budget | method | mean blocks | test accuracy | 95% CI | test n | val accuracy | val n | calib n |",
             "|---|---|---|---|---|---|---|---|---|"]

    def line(r, name=None):
        t, v = r["test"], r["val"]
        return (f"| {r['budget']:g} | {name or r['method']} | {t['blocks']} | {pct(t)} | {ci(t)} | {t['n']} | "
                f"{pct(v)} | {v['n']} | {r['calib_n'] or '-'} |")

    best = {}
    for b in [1.0] + args.ratios:
        mine = [r for r in rows if r["budget"] == b]
        lines += [line(r) for r in mine]
        chosen = best_static(rows, b) if b < 1.0 else None
        if chosen is not None:
            best[b] = chosen
            lines.append(line(chosen, f"**best static (validation): {chosen['method']}**"))
    if pending:
        lines += ["", f"Not done yet: {', '.join(pending)} (a best-static choice made without them may change)."]
    opt = [r for r in rows if r["method"] == "optuna"]
    if opt:
        lines += ["", "## Optuna's top trials, re-scored on validation", "",
                  "| budget | trial | blocks | search margin | val accuracy | val margin | chosen | test accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in opt:
            for c in r["candidates"]:
                test = pct(r["test"]) if c["chosen"] else ""
                lines.append(f"| {r['budget']:g} | {c['trial']} | {c['blocks']} | {c['search_reward']:.3f} | "
                             f"{pct(c['val'])} | {c['val']['reward']:.3f} | {'yes' if c['chosen'] else ''} | {test} |")
    if full is not None and best:
        lines += ["", "## Reading", ""]
        for b, chosen in best.items():
            t, f = chosen["test"], full["test"]
            top = max((r for r in rows if r["budget"] == b and r["method"] != "full"), key=lambda r: r["test"]["accuracy"])
            verdict = ("below the full model outside the CIs" if t["ci95"][1] < f["ci95"][0] else
                       "above the full model outside the CIs" if t["ci95"][0] > f["ci95"][1] else
                       "within the CIs of the full model")
            lines.append(f"- {b:g} ({t['blocks']} blocks): validation chose **{chosen['method']}**, {pct(t)} ({ci(t)}) "
                         f"on test, {verdict} ({pct(f)}, {ci(f)}); the best on test was {top['method']} "
                         f"({pct(top['test'])})" + (" - the same" if top is chosen else "") + ".")
    greedy = max((r for r in rows if r["method"] == "greedy"), key=lambda r: len(r["order"]), default=None)
    if greedy is not None:
        c, n, rounds = greedy["greedy_cost"], greedy["greedy_calib_n"], len(greedy["order"])
        naive = n * sum(K * (K - 1) for K in range(L, L - rounds, -1))
        lines += ["", "## Greedy's cost", "",
                  f"{rounds} removal rounds on {n} samples (order {greedy['order']}): {c['sample_blocks']:,} "
                  f"per-sample block executions with prefix reuse (counted), against {naive:,} when every candidate "
                  f"runs from the embeddings ({naive / c['sample_blocks']:.2f}x), plus {c['sample_finishes']:,} "
                  f"per-sample finishes (LM head and scoring) either way; {c['seconds'] / 60:.1f} min."]
    data = {"command": commands, "date": {"first_row": dates[0] if dates else None,
                                         "last_row": dates[-1] if dates else None},
            "args": asdict(args), "rows": rows, "pending": pending,
            "best_static": {f"{b:g}": r["method"] for b, r in best.items()}}
    return "\n".join(lines) + "\n", data


def main(argv=None) -> None:

    from layerroute.budget import blocks_for_ratio
    from layerroute.objective import Objective
    from layerroute.search.baselines import BASELINES, greedy_cost, greedy_progress, remember_route_stats, route_stats
    from layerroute.search.optuna_search import optuna_route
    from layerroute.store import ResultsStore, atomic_write, atomic_write_json
    from layerroute.tasks import get_task

    args = parse_config(Args, argv, __doc__.splitlines()[0])
    command = experiment_command("static_routes", argv)
    ex, tok = args.executor(args.threads)
    L, task = ex.num_layers, get_task(args.task, seed=args.seed)

    def objective(split, limit, flag):
        return Objective.from_task(ex, tok, task, split, limit, args.seed, option=flag, batch_rows=args.batch_rows)

    cal, val, test = (objective("search", args.calib_limit, "--calib-limit"),
                      objective("validation", args.val_limit, "--val-limit"),
                      objective("test", args.test_limit, "--test-limit"))
    greedy_cal = objective("search", args.greedy_calib_limit, "--greedy-calib-limit") \
        if args.greedy_calib_limit not in (0, args.calib_limit) else cal
    settings = {k: v for k, v in asdict(args).items()
                if k not in ("threads", "out", "run_dir", "name", "methods", "budgets")}
    header = {"kind": "static_routes", "settings": settings, "model": ex.fingerprint.to_dict(), "task": task.name,
              "split": "test", "seed": args.seed}
    with ResultsStore(Path(args.run_dir) / "rows.jsonl", header) as store:
        rows = [{"command": command, **r} for r in store.records if r.get("type") == "row"]
        for r in rows:  # a resumed run: routes scored before are not scored again
            remember_route_stats(val, r["layers"], r["val"])
            remember_route_stats(test, r["layers"], r["test"])
            if r["method"] == "greedy" and len(r["order"]) > len(greedy_progress(greedy_cal).order):
                greedy_progress(greedy_cal).order[:] = r["order"]
                greedy_cost(greedy_cal).update(r["greedy_cost"])
        for method, budget in plan(args):
            key = f"{method}@{budget:g}"
            if key in store.done():
                continue
            start, k, extra = time.time(), blocks_for_ratio(budget, L), {}
            if method == "full":
                route = ex.route()
            elif method == "optuna":
                candidates = []
                route = optuna_route(cal, k, args.seed, trials=args.trials, validation=val, top=args.top,
                                     details=candidates)
                extra = {"candidates": candidates}
            elif method == "greedy":
                route = BASELINES["greedy"](greedy_cal, k, args.seed)
                extra = {"greedy_calib_n": len(greedy_cal), "order": greedy_progress(greedy_cal).order[:L - k],
                         "greedy_cost": dict(greedy_cost(greedy_cal))}
            else:
                route = BASELINES[method](cal, k, args.seed)
            fitted_on = None if method == "full" else len(greedy_cal if method == "greedy" else cal)
            row = {"type": "row", "key": key, "command": command, "method": method, "budget": budget,
                   "layers": list(route.layers),
                   "calib_n": fitted_on, "val": route_stats(val, route), "test": route_stats(test, route), **extra,
                   "seconds": round(time.time() - start, 1),
                   "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
            store.append(row)
            rows.append(row)
            text, data = render(rows, args, command, L)
            atomic_write(args.path(f"{args.name}.md"), text)
            atomic_write_json(args.path(f"{args.name}.json"), data, indent=1, sort_keys=False)
            print(f"{key}: test {pct(row['test'])} ({ci(row['test'])}), val {pct(row['val'])}, {route.cost} blocks "
                  f"({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
