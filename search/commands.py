"""The search plug-in's commands: ``search NAME``, ``baselines``, ``analyze``, ``signal`` and ``demo``.

Registered through the ``layerroute.commands`` entry point. Only argparse runs at import time;
each handler imports what it needs, builds typed configs and calls the library.
"""

from __future__ import annotations

import sys

from layerroute.args import (SPLIT_CHOICES, _core_check, add_model_args, add_task_args, default_output, identity,
                             load, task_of, task_options)
from layerroute.cli import Command, check_task_flags
from layerroute.errors import InputError, LayerRouteError
from layerroute.runs import run_header

CALIB_LIMIT = VAL_LIMIT = 256  # as layerroute.search.baselines (a test keeps them equal)


def check_baselines(value, allow_optuna: bool = True) -> list[str]:
    """Registered static baselines, comma-separated (``optuna`` too where the table can run it)."""
    from .baselines import BASELINES

    known = [*BASELINES, *(["optuna"] if allow_optuna else [])]
    names = [s.strip() for s in (value if isinstance(value, list) else str(value).split(","))]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InputError(f"unknown baseline(s) {', '.join(map(repr, unknown or names))}; choose from "
                         f"{', '.join(known)}")
    return names


# ---- search NAME ----------------------------------------------------------------------------

def cmd_search(args) -> int:
    """``layerroute search NAME``: any registered searcher, into a resumable results store (on Ray with
    ``--workers`` or ``--ray-address``)."""
    from dataclasses import asdict

    from . import get_searcher
    from .base import config_from_args
    from .distributed import SearchSpec, check_ray_args
    from layerroute.budget import Budget
    from layerroute.store import ResultsStore

    cls = get_searcher(args.searcher)
    config = config_from_args(cls.Config, args)
    Budget.parse(args.budget)  # refuse a bad budget before loading anything
    task = task_of(args)
    check_task_flags(args, task)
    if args.null and task.kind != "choice":
        raise InputError(f"--null replaces each label with a random wrong option, but task {task.name} is a "
                         f"{task.kind} task without options")
    on_ray = args.workers is not None or bool(args.ray_address)
    if on_ray:
        check_ray_args(args.workers, args.ray_address)
    # The same spec builds the searcher here and, on Ray, in every actor.
    spec = SearchSpec(searcher=cls.name, task=args.task, config=asdict(config), task_options=task_options(args),
                      model=args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      split=args.split, limit=args.limit, seed=args.seed,
                      objective=dict(reward=args.reward, lam=args.lam, budget=args.budget, batch_rows=args.batch_rows,
                                     null_seed=args.seed if args.null else None))
    with ResultsStore(default_output(args, f"search-{cls.name}")) as store:  # the lock, before the model loads
        searcher = spec.build(task)
        summary, route = _search(args, cls, spec, searcher, store, task, on_ray)
        print(search_summary(summary, route, store.path, len(searcher.objective), args.split, store.header))
    return 0


def _search(args, cls, spec, searcher, store, task, on_ray):
    """Open the store, run the searcher into it; (summary, best route or None), route.json written."""
    from .base import run_search
    from .distributed import run_search_distributed

    common = {k: v for k, v in identity(args).items() if k not in spec.config}  # the searcher's own options:
    header = run_header(f"search:{cls.name}", searcher.objective.executor, task, args.split, args.seed,
                        {**common, **searcher.settings()}, labels="null" if args.null else "gold")  # as settings()
    if args.null:
        print(f"note: --null: every label is a seeded random wrong option; the results are the chance level of "
              f"{cls.name}'s figures, never results", file=sys.stderr)
    elif cls.oracle:
        print(f"note: {cls.name} reads the labels of the samples it routes; its rewards are an oracle upper bound",
              file=sys.stderr)
    # A per-sample search's records stand alone, so a larger (or smaller) --limit resumes its store.
    store.open(header, overwrite=args.overwrite, growable=("limit",) if cls.per_sample else ())
    if on_ray:
        summary = run_search_distributed(spec, store, args.workers, args.ray_address, searcher=searcher)
    else:
        summary = run_search(searcher, store)
    if "route" not in summary:
        return summary, None
    from layerroute.route import Route

    route = Route.from_dict(summary["route"], searcher.objective.executor.fingerprint)
    route.save(store.path.parent / "route.json")
    return summary, route


def search_summary(summary: dict, route, path, n: int, split: str, header: dict) -> str:
    """What a search found, in a few lines, and the files it wrote (the Pareto front's routes included).
    An oracle's figure comes with its chance level: its null twin's, or how to get it."""
    from .labels import is_null_store

    folder = path.parent
    if route is not None:
        lines = [f"best route: {route.describe()}; mean reward {summary['reward']:.4f} on {n} {split}-split samples"]
        for r in summary.get("front") or []:
            lines.append(f"  Pareto front: {r['blocks']:>3} blocks, mean reward {r['reward']:.4f}, trial {r['trial']}: "
                         f"layers {r['layers']}")
        files = [path, folder / "route.json"] + ([folder / "pareto.png"] if (folder / "pareto.png").exists() else [])
    else:
        lines = [f"{summary.get('label', 'per-sample search')}: {summary.get('samples', 0)} samples"]
        if summary.get("oracle_accuracy") is not None:
            null = is_null_store(header)
            which = "null labels (chance level)" if null else "ORACLE (upper bound)"
            lines.append(f"  {which}: full model {100 * summary['identity_accuracy']:.1f}%, best route per sample "
                         f"{100 * summary['oracle_accuracy']:.1f}% at {summary['mean_best_blocks']:.2f} blocks")
            if not null:
                lines.append(_chance_line(folder, header))
        elif "mean_best_reward" in summary:
            lines.append(f"  mean best reward {summary['mean_best_reward']:.4f} at "
                         f"{summary['mean_best_blocks']:.2f} blocks")
        files = [path]
    return "\n".join(lines + [f"wrote {', '.join(map(str, files))}"])


def _chance_line(folder, header: dict) -> str:
    """The chance level beside an oracle's figure: its null twin's (the same search with --null, as
    ``analyze`` checks it), else how to get it."""
    from .analyze import load_mcts
    from .labels import check_pair, null_twin

    twin = null_twin(folder)
    try:
        null_header, nulls = load_mcts(twin)
        check_pair(header, null_header, folder, twin)
    except (LayerRouteError, OSError):  # no twin, an unfinished one or another search's: say how to get one
        return (f"  its chance level: run the same command with --null --output {twin}, then "
                f"`layerroute analyze {folder}`")
    right = sum(bool(r["correct"]) for r in nulls)
    return (f"  its chance level (null labels, {twin}): best route per sample {100 * right / len(nulls):.1f}% "
            f"of {len(nulls)}; compare with `layerroute analyze {folder}`")


def build_search(p) -> None:
    from . import SEARCHERS
    from .base import add_config_arguments

    searchers = p.add_subparsers(dest="searcher", required=True, metavar="NAME")
    for name, cls in sorted(SEARCHERS.items()):
        doc = (cls.__doc__ or "").strip()
        q = searchers.add_parser(name, help=doc.splitlines()[0], description=doc,
                                 formatter_class=p.formatter_class)
        add_model_args(q)
        add_task_args(q, output="a directory for results.jsonl and route.json (default: runs/search-NAME-TASK)")
        q.add_argument("--split", default="search", choices=SPLIT_CHOICES,
                       help="the split to search on (default: search; never choose routes on test)")
        q.add_argument("--reward", default="margin", choices=["margin", "correct"],
                       help="margin: gold minus best wrong option log-likelihood (dense); correct: 1 or 0")
        q.add_argument("--lambda", dest="lam", type=float, default=0.0, help="compute penalty per share of blocks")
        q.add_argument("--budget", default=None, help="hard budget: a share of blocks (0.8) or a block count (24)")
        q.add_argument("--batch-rows", type=int, default=64, help="token rows per executor call")
        q.add_argument("--workers", type=int, default=None,
                       help="spread the units over N Ray actors on a local Ray (one torch thread, or GPU, each)")
        q.add_argument("--ray-address", default=None, help="join the Ray cluster at HOST:PORT instead")
        q.add_argument("--null", action="store_true",
                       help="search against null labels (a seeded random wrong option per sample, choice tasks): the "
                            "chance level that an oracle's figures are read against")
        add_config_arguments(q, cls.Config)
        q.set_defaults(func=cmd_search)


# ---- baselines, demo ------------------------------------------------------------------------

def cmd_baselines(args) -> int:
    from .baselines import BASELINES, format_table, plot_curves, run_baselines
    from layerroute.executor import RouteExecutor
    from layerroute.store import ResultsStore, atomic_write

    budgets = [float(b) for b in args.budgets.split(",")]
    names = check_baselines(args.baselines) if args.baselines else list(BASELINES)
    task = task_of(args)
    check_task_flags(args, task)
    with ResultsStore(default_output(args, "baselines")) as store:  # the single-writer lock, before the model loads
        model, tok = load(args)
        ex = RouteExecutor(model)
        store.open(run_header("baselines", ex, task, "test", args.seed, identity(args)), overwrite=args.overwrite)
        rows = run_baselines(ex, tok, task, budgets, names, limit=args.limit, calib_limit=args.calib_limit,
                             val_limit=args.val_limit, seed=args.seed, batch_size=args.batch_size, store=store)
        table = format_table(rows)
        print(table)
        plot_curves(rows, store.path.parent / "baselines.png", f"{args.model} on {args.task} (test split)")
        atomic_write(store.path.parent / "table.md", table + "\n")
        print(f"wrote {store.path}, table.md and baselines.png")
    return 0


def build_baselines(p) -> None:
    add_model_args(p)
    add_task_args(p, output="a directory for results.jsonl, table.md and baselines.png "
                            "(default: runs/baselines-TASK)")
    p.add_argument("--budgets", default="1.0,0.9,0.8,0.7", help="shares of the blocks, comma-separated")
    p.add_argument("--baselines", default=None,
                   help="comma-separated subset of unified, drop_last, similarity, greedy, random, optuna (default: "
                        "all but optuna)")
    p.add_argument("--calib-limit", type=int, default=CALIB_LIMIT, help="search-split examples each baseline is "
                   "fitted on")
    p.add_argument("--val-limit", type=int, default=VAL_LIMIT, help="validation-split examples that choose the best "
                   "static route per budget (and Optuna's route among its top trials)")


def cmd_demo(args) -> int:
    """The earlier demo on the embedded default: routed generation, then baselines on the suite."""
    from layerroute.executor import RouteExecutor
    from layerroute.tasks.prompts import render_prompt

    model, tok = load(args)
    ex = RouteExecutor(model)
    print(f"# {args.model}: {ex.fingerprint.describe()}\n")
    question = "What is the capital of France?"
    ids = tok(render_prompt(tok, question), return_tensors="pt", add_special_tokens=False).input_ids
    print(f"## One prompt along three routes: {question!r}\n")
    print("| route | blocks | answer |\n|---|---|---|")
    for spec in ("identity", "skip:20-24", "repeat:10"):
        out = ex.generate(ids, routes=spec, max_new_tokens=16, eos_token_id=tok.eos_token_id)
        text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")
        print(f"| {spec} | {ex.route(spec).cost} | {text} |")
    print("\n## Static baselines on the generated suite (test split)\n", flush=True)
    args.task, args.fields, args.kind, args.baselines, args.scoring, args.extract = "suite", None, None, None, None, None
    args.overwrite = True
    return cmd_baselines(args)


def build_demo(p) -> None:
    add_model_args(p)
    p.add_argument("--budgets", default="1.0,0.9,0.8,0.7")
    p.add_argument("--limit", type=int, default=40, help="test examples per evaluation (kept small for a demo)")
    p.add_argument("--calib-limit", type=int, default=16)
    p.add_argument("--val-limit", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/demo")


# ---- analyze, signal ------------------------------------------------------------------------

def cmd_analyze(args) -> int:
    """``layerroute analyze STORE``: oracle figures, action heatmap and reward histogram of an MCTS store."""
    from pathlib import Path

    from .analyze import report

    print(report(args.store, args.output, args.null_store))
    out = args.output or (args.store if Path(args.store).is_dir() else Path(args.store).parent)
    print(f"wrote {Path(out) / 'analyze.md'}, actions.png and rewards.png")
    return 0


def build_analyze(p) -> None:
    p.add_argument("store", help="an MCTS results store (folder or results.jsonl)")
    p.add_argument("--null", dest="null_store", default=None,
                   help="the same search run with --null (default: the folder STORE-null beside STORE)")
    p.add_argument("--output", default=None, help="folder for analyze.md and the PNGs (default: the store's folder)")


def cmd_signal(args) -> int:
    """``layerroute signal``: whether per-input routing can pay on this model and task (see search/signal.py)."""
    from layerroute.executor import RouteExecutor
    from layerroute.objective import Objective

    from .signal import check_request, signal, write_report

    task = task_of(args)
    check_task_flags(args, task)
    check_request(task, args.limit)  # before the model loads
    model, tok = load(args)
    obj = Objective.from_task(RouteExecutor(model), tok, task, args.split, args.limit, args.seed,
                              batch_rows=args.batch_rows)
    report = signal(obj, args.seed)
    out = default_output(args, "signal")
    print(write_report(report, out, "layerroute " + " ".join(sys.argv[1:])))
    print(f"wrote {out}/signal.md, signal.json and signal.png")
    return 0


def build_signal(p) -> None:
    add_model_args(p)
    add_task_args(p, output="a directory for signal.md, signal.json and signal.png (default: runs/signal-TASK)",
                  split="search")
    p.set_defaults(limit=200, batch_size=None)
    p.add_argument("--batch-rows", type=int, default=64, help="token rows per executor call")


def register() -> list[Command]:
    baseline_names = _core_check(lambda v: check_baselines(v))
    return [
        Command("search", "find routes with a registered searcher (see `layerroute search -h`)", build_search,
                cmd_search),
        Command("baselines", "every static baseline at several budgets: table and PNG", build_baselines,
                cmd_baselines, checks={"baselines": baseline_names}),
        Command("signal", "before training routers: can per-input routing pay on this model and task? "
                "(null-corrected oracle, static against per-input, predictability)", build_signal, cmd_signal,
                small={"limit": 20}),
        Command("analyze", "oracle figures of an MCTS store beside their chance level (its --null search)",
                build_analyze, cmd_analyze),
        Command("demo", "the earlier demo: routed generation along three routes, then static baselines", build_demo,
                cmd_demo),
    ]

