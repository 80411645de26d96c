"""The ``layerroute`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LayerRouteError
from .models import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF id, model directory or .gguf file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _load(args, check_supported: bool = True):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, check_supported=check_supported)


def cmd_info(args) -> int:
    from .errors import UnsupportedModelError
    from .models import decoder_stack

    model, _ = _load(args, check_supported=False)
    print(f"model:      {args.model} ({type(model).__name__})")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    try:
        stack = decoder_stack(model)
    except UnsupportedModelError as exc:
        print("supported:  no")
        print(f"reason:     {exc}")
        return 1
    fp = stack.fingerprint
    windows = sorted({w for w in stack.windows if w is not None})
    print(f"layers:     {fp.num_layers} decoder blocks of {fp.block_params:,} parameters")
    print(f"hidden:     {fp.hidden_size}")
    print(f"attention:  {stack.attn_implementation}" + (f", sliding windows {windows}" if windows else ""))
    print("supported:  yes")
    return 0


def cmd_run(args) -> int:
    from .executor import RouteExecutor
    from .tasks.prompts import render_prompt

    model, tok = _load(args)
    ex = RouteExecutor(model)
    route = ex.route(args.route)
    ids = tok(render_prompt(tok, args.prompt, chat=not args.no_chat), return_tensors="pt",
              add_special_tokens=False).input_ids
    out = ex.generate(ids, routes=route, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out.sequences[0, ids.shape[1]:]
    print(f"route: {route.describe()}", file=sys.stderr)
    print(tok.decode(new, skip_special_tokens=True).strip())
    return 0


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (see `layerroute tasks`), jsonl:PATH or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--fields", default=None, help="for jsonl:/hf: tasks, e.g. question=q,answer=a,choices=options")
    p.add_argument("--kind", default=None, choices=["choice", "generate", "loglik"], help="for jsonl:/hf: tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (and generated suites)")
    p.add_argument("--limit", type=int, default=None, help="score at most N examples of the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help="directory for results.json and per-sample JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")


def _task(args):
    from .tasks import get_task

    options = {"seed": args.seed}
    if args.fields:
        options["fields"] = dict(kv.split("=", 1) for kv in args.fields.split(","))
    if args.kind:
        options["kind"] = args.kind
    return get_task(args.task, **options)


_NOT_SETTINGS = ("func", "overwrite", "output", "batch_size", "batch_rows", "debug", "workers", "ray_address")


def _identity(args) -> dict:
    """The arguments that define a run's results (a store with others is refused, not resumed)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}


def cmd_eval(args) -> int:
    from .evaluation import eval_header, evaluate, write_summary
    from .executor import RouteExecutor
    from .store import ResultsStore

    task = _task(args)
    split = task.split(args.split, args.seed)
    model, tok = _load(args)
    ex = RouteExecutor(model)
    if args.baseline:
        from layerroute.objective import Objective
        from layerroute.search.baselines import baseline_route

        cal = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, option="--calib-limit")
        route = baseline_route(args.baseline, cal, args.budget, args.seed)
    else:
        route = ex.route(args.route)
    print(f"route: {route.describe()}", file=sys.stderr)
    store = None
    if args.output:
        store = ResultsStore(args.output, eval_header(ex, task, args.split, args.seed, _identity(args)),
                             overwrite=args.overwrite)
    try:
        result = evaluate(ex, tok, split, route, batch_size=args.batch_size, limit=args.limit, store=store)
        print(result.summary())
        if store is not None:
            write_summary(store, result, {"route": route.to_dict(), "task_source": task.source})
            print(f"wrote {store.path}")
    finally:
        if store is not None:
            store.close()
    return 0


def cmd_baselines(args) -> int:
    from .executor import RouteExecutor
    from layerroute.search.baselines import BASELINES, format_table, plot_curves, run_baselines
    from .store import ResultsStore, atomic_write

    budgets = [float(b) for b in args.budgets.split(",")]
    names = args.baselines.split(",") if args.baselines else list(BASELINES)
    task = _task(args)
    model, tok = _load(args)
    ex = RouteExecutor(model)
    out = args.output or f"runs/baselines-{args.task.replace(':', '-').replace('/', '-')}"
    header = {"kind": "baselines", "settings": _identity(args), "model": ex.fingerprint.to_dict(), "task": task.name,
              "split": "test", "seed": args.seed}
    with ResultsStore(out, header, overwrite=args.overwrite) as store:
        rows = run_baselines(ex, tok, task, budgets, names, limit=args.limit, calib_limit=args.calib_limit,
                             seed=args.seed, batch_size=args.batch_size, store=store)
        table = format_table(rows)
        print(table)
        plot_curves(rows, store.path.parent / "baselines.png", f"{args.model} on {args.task} (test split)")
        atomic_write(store.path.parent / "table.md", table + "\n")
        print(f"wrote {store.path}, table.md and baselines.png")
    return 0


def cmd_search(args) -> int:
    """``layerroute search NAME``: any registered searcher, into a resumable results store."""
    from layerroute.objective import Objective
    from layerroute.search import get_searcher, run_search
    from layerroute.search.base import config_from_args
    from .budget import Budget
    from .executor import RouteExecutor
    from .route import Route
    from .store import ResultsStore

    cls = get_searcher(args.searcher)
    config = config_from_args(cls.Config, args)
    budget = Budget.parse(args.budget)
    task = _task(args)
    model, tok = _load(args)
    ex = RouteExecutor(model)
    obj = Objective.from_task(ex, tok, task, args.split, args.limit, args.seed, reward=args.reward, lam=args.lam,
                              budget=budget, batch_rows=args.batch_rows)
    searcher = cls(obj, config, seed=args.seed)
    header = {"kind": f"search:{cls.name}", "settings": {**_identity(args), **searcher.settings()},
              "model": ex.fingerprint.to_dict(), "task": task.name, "split": args.split, "seed": args.seed}
    if cls.oracle:
        print(f"note: {cls.name} reads the labels of the samples it routes; its rewards are an oracle upper bound",
              file=sys.stderr)
    out = args.output or f"runs/search-{cls.name}-{args.task.replace(':', '-').replace('/', '-')}"
    with ResultsStore(out, header, overwrite=args.overwrite) as store:
        summary = run_search(searcher, store)
        if "route" in summary:
            route = Route.from_dict(summary["route"], ex.fingerprint)
            route.save(store.path.parent / "route.json")
            print(f"best route: {route.describe()}; mean reward {summary['reward']:.4f} on {len(obj)} "
                  f"{args.split}-split samples")
            print(f"wrote {store.path} and {store.path.parent / 'route.json'}")
        else:
            print(f"wrote {store.path}")
    return 0


def cmd_tasks(args) -> int:
    from .tasks import list_tasks

    print("\n".join(list_tasks(usage=True)))
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: routed generation, then baselines on the suite."""
    from .executor import RouteExecutor
    from .tasks.prompts import render_prompt

    model, tok = _load(args)
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
    print(f"\n## Static baselines on the generated suite (test split)\n", flush=True)
    args.task, args.fields, args.kind, args.baselines = "suite", None, None, None
    args.overwrite = True
    return cmd_baselines(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="layers, parameters, and whether the model can be routed")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="generate with a route")
    _add_model_args(p)
    p.add_argument("--route", default=None,
                   help="JSON file or spec: identity, skip:20-24, repeat:10, repeat:10x3, chain:0-9,9,10-29 (join with +)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="accuracy, blocks per sample and throughput of a route or baseline on a task")
    _add_model_args(p)
    _add_task_args(p)
    p.add_argument("--split", default="test", choices=["search", "validation", "test", "all"])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--route", default=None, help="route JSON file or spec (default: identity)")
    group.add_argument("--baseline", default=None, help="static baseline: unified, drop_last, similarity, greedy, random")
    p.add_argument("--budget", type=float, default=0.8, help="share of blocks a --baseline may run")
    p.add_argument("--calib-limit", type=int, default=32, help="calibration examples for --baseline")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("baselines", help="every static baseline at several budgets: table and PNG")
    _add_model_args(p)
    _add_task_args(p)
    p.add_argument("--budgets", default="1.0,0.9,0.8,0.7")
    p.add_argument("--baselines", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--calib-limit", type=int, default=32, help="calibration examples from the search split")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("search", help="find routes with a registered searcher (see `layerroute search -h`)")
    searchers = p.add_subparsers(dest="searcher", required=True, metavar="NAME")
    from layerroute.search import SEARCHERS
    from layerroute.search.base import add_config_arguments

    for name, cls in sorted(SEARCHERS.items()):
        q = searchers.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0],
                                 description=(cls.__doc__ or "").strip())
        _add_model_args(q)
        _add_task_args(q)
        q.add_argument("--split", default="search", choices=["search", "validation", "test", "all"],
                       help="the split to search on (default: search; never choose routes on test)")
        q.add_argument("--reward", default="margin", choices=["margin", "correct"],
                       help="margin: gold minus best wrong option log-likelihood (dense); correct: 1 or 0")
        q.add_argument("--lambda", dest="lam", type=float, default=0.0, help="compute penalty per share of blocks")
        q.add_argument("--budget", default=None, help="hard budget: a share of blocks (0.8) or a block count (24)")
        q.add_argument("--batch-rows", type=int, default=64, help="token rows per executor call")
        add_config_arguments(q, cls.Config)
        q.set_defaults(func=cmd_search)

    p = sub.add_parser("tasks", help="list the task specs --task accepts")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("demo", help="the main job on the embedded default model, offline")
    _add_model_args(p)
    p.add_argument("--budgets", default="1.0,0.9,0.8,0.7")
    p.add_argument("--limit", type=int, default=40, help="test examples per evaluation (kept small for a demo)")
    p.add_argument("--calib-limit", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LayerRouteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
