"""PPO routing policy against the full model, static baselines, the Optuna route and the MCTS oracle.

    OMP_NUM_THREADS=1 python -m layerroute.experiments.ppo_table [--timesteps 8192 --lam 1.0]

The committed ``experiments/results/ppo_table.md`` is::

    OMP_NUM_THREADS=1 python -m layerroute.experiments.ppo_table --lam 0 --budget 0.8 --train-limit 256 \
        --timesteps 32768 --baselines unified,drop_last,similarity,random --out experiments/results

Trains PPO (``per_sample`` mode) on the search split of a generated task, then scores on the
held-out test split: the full model, the PPO policy (greedy), every static baseline and the
Optuna route at the PPO policy's measured compute (``floor(mean blocks)``, chosen on
search-split calibration samples), and the MCTS oracle (it reads each test sample's label: an
upper bound, not a result). Accuracy with 95% Wilson CIs, mean blocks, training cost. Rows are
kept in a resumable store under ``--run-dir``, and ``OUT/ppo_table.md`` and ``ppo_curve.png``
(``--out``) are rewritten after every row (``ppo_table.json`` beside them: the command, the
date, the settings and the rows), so a killed run keeps what finished.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layerroute import RouteExecutor, load_model
from layerroute.evaluation import evaluate, wilson_interval
from layerroute.objective import Objective
from layerroute.route import Route
from layerroute.config import option, parse_config
from layerroute.experiments import SeededArgs
from layerroute.store import ResultsStore
from layerroute.tables import acc_ci, pct, table, write_result
from layerroute.tasks import get_task



@dataclass
class Args(SeededArgs):
    task: str = option("gen", "task spec")
    mode: str = option("per_sample", "PPO env mode", choices=["per_sample", "cola"])
    lam: float = option(1.0, "compute penalty lambda")
    budget: str = option(None, "hard budget of the PPO episodes: a share (0.8) or a block count", type=str)
    timesteps: int = option(8192, "PPO environment steps")
    n_envs: int = option(16, "parallel environments")
    n_steps: int = option(32, "PPO rollout steps per environment")
    train_limit: int = option(128, "search samples PPO trains on")
    test_limit: int = option(150, "test samples every row is scored on")
    calib_limit: int = option(32, "search samples the static routes and Optuna are chosen on")
    line_limit: int = option(64, "search samples for the static routes' reward line")
    baselines: str = option(None, "comma-separated static baselines (default: all)", type=str)
    optuna_trials: int = option(30, "Optuna trials (0: skip)")
    mcts_limit: int = option(24, "test samples for the MCTS oracle (0: skip)")
    mcts_simulations: int = option(40, "MCTS simulations per sample")
    run_dir: str = option("runs/ppo-table", "the resumable stores of the run")


def _row(name: str, kind: str, res, extra: dict | None = None) -> dict:
    return {"type": "row", "key": name, "name": name, "kind": kind, "n": res.n, "accuracy": res.accuracy,
            "ci95": list(res.ci95), "mean_blocks": res.mean_blocks, **(extra or {})}


def _layers(row: dict, num_layers: int) -> list | None:
    """The static route of a row (the full model's is the identity)."""
    if row["name"] == "full model":
        return list(range(num_layers))
    return (row.get("route") or {}).get("layers")


def write_outputs(rows: list[dict], curve: list[dict], line: dict | None, train: dict, args: Args,
                  chance: float | None) -> None:
    """The markdown table, its JSON and the learning-curve PNG, from whatever has finished."""
    lines = [f"PPO: mode {args.mode}, lambda {args.lam}, budget {args.budget or 'none'}, reward margin, trained on "
             f"{args.train_limit} search-split samples; {train.get('timesteps', '?')} environment steps in {train.get('wall_s', '?')} s "
             f"({train.get('threads', '?')} torch thread(s), CPU). Static baselines and the Optuna route are "
             f"chosen on {args.calib_limit} search-split samples at the PPO policy's measured compute. "
             f"Test: the first {args.test_limit} test-split examples" +
             (f"; chance is {100 * chance:.0f}%." if chance else "."), ""]
    lines += table(["method", "kind", "accuracy (95% CI)", "mean blocks", "n", "training cost"],
                   [[r["name"], r["kind"], acc_ci(r["accuracy"], r["ci95"]), f"{r['mean_blocks']:.2f}", r["n"],
                     r.get("cost", "")] for r in rows])
    lines += _verdicts(rows)
    lines += ["", "MCTS rows read each test sample's label (ORACLE): an upper bound, not a comparable result; the "
              "null row is the same search handed a random wrong label, the level chance alone reaches.",
              "", "![learning curve](ppo_curve.png)"]
    write_result(args.path("ppo_table"), f"PPO routing policy on {args.model}, task `{args.task}` (test split, seed "
                 f"{args.seed})", lines, {"settings": asdict(args), "training": train, "rows": rows, "line": line})
    if curve:
        _plot_curve(curve, line, args)


def _verdicts(rows: list[dict]) -> list[str]:
    """PPO against the best static route and against the Optuna route, CIs considered."""
    lines = []
    ppo = next((r for r in rows if r["name"] == "ppo"), None)
    statics = [r for r in rows if r["kind"] in ("static", "search") and r["accuracy"] is not None]
    if ppo and statics:
        best = max(statics, key=lambda r: r["accuracy"])
        verdict = "does NOT beat" if ppo["accuracy"] <= best["accuracy"] else "beats"
        overlap = ppo["ci95"][0] <= best["ci95"][1] and best["ci95"][0] <= ppo["ci95"][1]
        lines += ["", f"**PPO {verdict} the best static route** ({best['name']}: {pct(best['accuracy'])} at "
                      f"{best['mean_blocks']:.2f} blocks, against PPO's {pct(ppo['accuracy'])} at "
                      f"{ppo['mean_blocks']:.2f} blocks)" + ("; the 95% CIs overlap, so the difference is not "
                                                             "significant." if overlap else ".")]
    opt = next((r for r in rows if r["name"] == "optuna"), None)
    if ppo and opt:
        overlap = ppo["ci95"][0] <= opt["ci95"][1] and opt["ci95"][0] <= ppo["ci95"][1]
        if ppo["accuracy"] <= opt["accuracy"]:
            word = "does NOT beat it"
        else:
            word = "scores higher, within overlapping 95% CIs: not a significant win" if overlap else "beats it"
        lines.append(f"Against the Optuna route ({pct(opt['accuracy'])} at {opt['mean_blocks']:.2f} blocks): "
                     f"PPO {word}.")
    return lines


def _plot_curve(curve: list[dict], line: dict | None, args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["timesteps"] for c in curve], [c["mean_reward"] for c in curve], marker="o", ms=3,
            label="PPO (mean episode reward per rollout)")
    if line:
        ax.axhline(line["reward"], color="tab:red", ls="--", label=f"best static route ({line['name']})")
        if "full" in line:
            ax.axhline(line["full"], color="gray", ls=":", label="full model")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"reward (margin - {args.lam} x blocks/L)")
    ax.set_title(f"PPO on {args.task}, search split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.path("ppo_curve.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    from layerroute.envs.routing_env import LayerRoutingVecEnv
    from layerroute.policies.ppo import train_ppo
    from layerroute.search import get_searcher, run_search
    from layerroute.search.baselines import BASELINES, baseline_route

    model, tok = load_model(args.model)
    ex = RouteExecutor(model)
    L = ex.num_layers
    task = get_task(args.task, seed=args.seed)
    test = task.split("test", args.seed)
    chance = sum(1 / len(e.choices) for e in test.examples) / len(test.examples) if task.kind == "choice" else None
    run = Path(args.run_dir)
    base = {"model": ex.fingerprint.to_dict(), "task": task.name, "seed": args.seed}

    # 1. PPO on the search split (resumes from run/train)
    venv = LayerRoutingVecEnv(args.n_envs, ex, tok, task, mode=args.mode, lam=args.lam, limit=args.train_limit,
                              seed=args.seed, budget=args.budget)
    settings = {k: getattr(args, k) for k in ("mode", "lam", "n_envs", "n_steps", "train_limit")}
    if args.budget is not None:  # (absent from older stores' settings, which stay valid)
        settings["budget"] = args.budget
    with ResultsStore(run / "train", {"kind": "train-ppo", "settings": settings, "split": "search", **base}) as st:
        _, policy = train_ppo(venv, st, args.timesteps, seed=args.seed, n_steps=args.n_steps, batch_size=256,
                              progress=False)
        curve = [r for r in st.records if r.get("type") == "curve"]
        train = {"timesteps": max(c["timesteps"] for c in curve) if curve else 0, "threads": args.threads,
                 "wall_s": round(sum(r.get("wall_s_this_run", 0) for r in st.records if r.get("type") == "summary"))}
    print(f"trained: {train}", flush=True)

    # 2. the table, resumable row by row
    tsettings = {**settings, "timesteps": args.timesteps, "test_limit": args.test_limit,
                 "calib_limit": args.calib_limit}
    with ResultsStore(run / "table", {"kind": "ppo-table", "settings": tsettings, "split": "test", **base}) as table:
        rows = [r for r in table.records if r.get("type") == "row"]
        line = next((r for r in table.records if r.get("type") == "line"), None)

        def add(name, kind, routes, extra=None):
            if name in table.done():
                return next(r for r in rows if r["name"] == name)
            same = None if not isinstance(routes, Route) else next(
                (r for r in rows if _layers(r, L) == list(routes.layers)), None)
            if same is not None:  # the same static route was scored already: the same numbers
                r = {**same, "key": name, "name": name, "kind": kind, **(extra or {}), "same_as": same["name"]}
            else:
                t0 = time.perf_counter()
                res = evaluate(ex, tok, test, routes, limit=args.test_limit, progress=False, batch_size=16)
                r = _row(name, kind, res, {"eval_s": round(time.perf_counter() - t0, 1), **(extra or {})})
            table.append(r)
            rows.append(r)
            write_outputs(rows, curve, line, train, args, chance)
            print(f"{name}: {r['accuracy']:.3f} at {r['mean_blocks']:.2f} blocks", flush=True)
            return r

        add("full model", "reference", ex.route(None), {"route": ex.route(None).to_dict()})
        ppo = add("ppo", "learned (PPO)", policy,
                  {"cost": f"{train['timesteps']} env steps, {train['wall_s']} s"})
        k = min(L, max(1, math.floor(ppo["mean_blocks"] + 1e-9)))  # static routes run each block at most once
        ratio = k / L
        cal = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, option="--calib-limit")
        statics = {}
        for name in (args.baselines.split(",") if args.baselines else BASELINES):
            route = baseline_route(name, cal, ratio, args.seed)
            statics[name] = route
            add(f"{name} @{k}", "static", route, {"route": route.to_dict()})
        if args.optuna_trials and "optuna" not in table.done():
            cls = get_searcher("optuna")
            obj = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, option="--calib-limit",
                                      budget=k)
            searcher = cls(obj, cls.Config(trials=args.optuna_trials), seed=args.seed)
            t0 = time.perf_counter()
            with ResultsStore(run / "optuna", {"kind": "search:optuna", "settings": {**searcher.settings(), "k": k},
                                               "split": "search", **base}) as ost:
                summary = run_search(searcher, ost)
            route = Route.from_dict(summary["route"], ex.fingerprint)
            statics["optuna"] = route
            add("optuna", "search", route, {"route": route.to_dict(), "cost": f"{args.optuna_trials} trials, "
                                            f"{time.perf_counter() - t0:.0f} s"})
        if line is None:  # the best static route's mean reward on the training objective
            obj = venv.core.obj
            samples = list(range(min(args.line_limit, len(obj))))
            by_layers = {}
            for r in statics.values():
                if r.layers not in by_layers:
                    by_layers[r.layers] = obj.mean_reward(r, samples)
            rewards = {name: by_layers[r.layers] for name, r in statics.items()}
            best = max(rewards, key=rewards.get)
            line = {"type": "line", "key": "line", "name": f"{best} @{k}", "reward": rewards[best],
                    "full": by_layers.get(tuple(range(L))) if tuple(range(L)) in by_layers else
                    obj.mean_reward(ex.route(None), samples), "rewards": rewards, "samples": len(samples)}
            table.append(line)
            write_outputs(rows, curve, line, train, args, chance)
        # the MCTS oracle under the same budget (the per-layer space: edits of the full route take no hard
        # budget), and beside it its chance level, the same search toward a seeded random wrong option
        for key, name, kind, null in (("mcts", f"MCTS oracle (<= {k} blocks)", "ORACLE", None),
                                      ("mcts-null", "MCTS null labels (its chance level)", "chance", args.seed)):
            if not args.mcts_limit or key in table.done() or (null is not None and test.kind != "choice"):
                continue
            cls = get_searcher("mcts")
            obj = Objective(ex, tok, test, list(test.examples)[:args.mcts_limit], lam=args.lam, budget=k,
                            null_seed=null)
            searcher = cls(obj, cls.Config(simulations=args.mcts_simulations, space="sequential"), seed=args.seed)
            t0 = time.perf_counter()
            with ResultsStore(run / key, {"kind": "search:mcts", "settings": {**searcher.settings(), "k": k},
                                          "split": "test", "labels": "null" if null is not None else "gold",
                                          **base}) as mst:
                run_search(searcher, mst)
                recs = [r for r in mst.records if "identity" in r]
            right = sum(bool(r["correct"]) for r in recs)
            r = {"type": "row", "key": key, "name": name, "kind": kind, "n": len(recs),
                 "accuracy": right / len(recs), "ci95": list(wilson_interval(right, len(recs))),
                 "mean_blocks": sum(r["blocks"] for r in recs) / len(recs),
                 "cost": f"{args.mcts_simulations} simulations/sample, {time.perf_counter() - t0:.0f} s"}
            table.append(r)
            rows.append(r)
        write_outputs(rows, curve, line, train, args, chance)
    print(f"wrote {args.path('ppo_table.md')}, .json and {args.path('ppo_curve.png')}")


if __name__ == "__main__":
    main()
