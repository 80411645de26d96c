"""The ``layerroute`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .errors import InputError, LayerRouteError
from .models import DEFAULT_MODEL


# ---- argument checks -------------------------------------------------------------------------
# Every argument is checked before any model is loaded or anything is written, in one place.
# Each check takes the raw value (a string, or what argparse's `type=` already made of it),
# returns the parsed value, and raises argparse.ArgumentTypeError with a message that follows
# the flag ("--batch-size must be at least 1, got 0"). Use them as `type=` in new
# subcommands; `_validate` also runs them on every parsed argument whose dest is in CHECKS
# (or COMMAND_CHECKS), so a subcommand that uses these dest names is covered as it is.
#
#   positive_int     an integer >= 1 (counts and sizes: --batch-size, --limit, --max-new-tokens, ...)
#   nonneg_int       an integer >= 0 (--refine-epochs)
#   seed             an integer in [0, 2**32 - 1] (--seed: numpy and SB3 take no larger one)
#   router_size      an integer in [1, routers.network.LIMITS] (--bottleneck, --windows)
#   positive_float   a finite number > 0 (--temperature, --lr)
#   nonneg_float     a finite number >= 0 (--lambda)
#   ratio            a number in (0, 1] (--top-p, eval's --budget)
#   open_ratio       a number in (0, 1) (--val-share)
#   ratio_list       comma-separated distinct numbers in (0, 1] -> list (--budgets)
#   budget           a share in (0, 1] or a whole block count >= 1 (search, train-ppo, pipeline --budget)
#   key_value_pairs  k=v[,k=v...] with distinct non-empty keys -> dict (--fields)
#   output_dir       a directory that is writable, or can be created; nothing is created (--output)
#   existing_path    a file or directory that exists (--router, --policy, each of --labels)
#   device           cpu, cuda, cuda:N or mps that torch can use (--device)
#   dtype            float32/fp32, bfloat16/bf16, float16/fp16 or auto (--dtype)
#   model_name       the embedded name, a hub id, or a local path that looks like a model (--model)
#   route_arg        a route spec (its syntax) or a route JSON file (its format) (--route)
#   nonempty         a string that is not blank (--prompt, --task)
#   baseline_names   registered static baselines, comma-separated (--baseline, --baselines)


def _bad(value, what: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {what}, got {value!r}")


def _int_at_least(value, low: int, high: int | None = None) -> int:
    try:
        n = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        n = None
    if isinstance(n, bool) or not isinstance(n, int):
        raise _bad(value, "an integer")
    if n < low or (high is not None and n > high):
        raise _bad(value, f"at least {low}" if high is None else f"an integer in [{low}, {high}]")
    return n


def _float_where(value, what: str, ok) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or not ok(x):
        raise _bad(value, what)
    return x


def positive_int(value) -> int:
    return _int_at_least(value, 1)


def nonneg_int(value) -> int:
    return _int_at_least(value, 0)


def seed(value) -> int:
    return _int_at_least(value, 0, 2**32 - 1)


def router_size(name: str):
    def check(value) -> int:
        from layerroute.routers.network import LIMITS

        return _int_at_least(value, 1, LIMITS[name])
    return check


def positive_float(value) -> float:
    return _float_where(value, "a finite number above 0", lambda x: x > 0)


def nonneg_float(value) -> float:
    return _float_where(value, "a finite number of at least 0", lambda x: x >= 0)


def ratio(value) -> float:
    return _float_where(value, "a number in (0, 1]", lambda x: 0 < x <= 1)


def unit_interval(value) -> float:
    return _float_where(value, "a number in [0, 1]", lambda x: 0 <= x <= 1)


def open_ratio(value) -> float:
    return _float_where(value, "a number in (0, 1)", lambda x: 0 < x < 1)


def ratio_list(value) -> list[float]:
    items = list(value) if isinstance(value, (list, tuple)) else [s.strip() for s in str(value).split(",")]
    try:
        if not items or "" in items:
            raise ValueError
        out = [ratio(s) for s in items]
    except (ValueError, argparse.ArgumentTypeError):
        raise _bad(value, "comma-separated numbers in (0, 1], like 1.0,0.9,0.8") from None
    twice = next((x for i, x in enumerate(out) if x in out[:i]), None)
    if twice is not None:
        raise argparse.ArgumentTypeError(f"names {twice:g} twice in {value!r}")
    return out


def budget(value):
    from .budget import Budget

    try:
        Budget.parse(value)
    except LayerRouteError as exc:
        raise argparse.ArgumentTypeError(f"is not valid: {exc}") from None
    return value


def key_value_pairs(value) -> dict:
    if isinstance(value, dict):
        return value
    out = {}
    for item in str(value).split(","):
        key, eq, val = (s.strip() for s in item.partition("="))
        if not (key and eq and val):
            raise _bad(value, "key=value pairs joined by commas, like question=q,answer=a")
        if key in out:
            raise argparse.ArgumentTypeError(f"names {key!r} twice in {value!r}")
        out[key] = val
    return out


def output_dir(value) -> str:
    text = str(value)
    if not text.strip():
        raise _bad(value, "a directory")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {text}: {parent} is not writable")
    return text


def existing_path(value) -> str:
    if not str(value).strip() or not Path(str(value)).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return value


def nonempty(value) -> str:
    if not str(value).strip():
        raise argparse.ArgumentTypeError("is empty")
    return value


def _core_check(fn):
    """A check from layerroute's core, its LayerRouteError turned into an argument error."""
    def check(value):
        try:
            fn(value)
        except LayerRouteError as exc:
            raise argparse.ArgumentTypeError(f"is not valid: {exc}") from None
        return value
    return check


def _device(value):
    from .models import check_device

    check_device(value)


def _dtype(value):
    from .models import _resolve_dtype

    _resolve_dtype(value, "cpu")


def _model(value):
    from .models import check_model_name

    check_model_name(value)


def _route(value):
    from .route import check_route_arg

    check_route_arg(value)


def _baselines(value):
    from layerroute.search.baselines import BASELINES

    names = [s.strip() for s in (value if isinstance(value, list) else str(value).split(","))]
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise LayerRouteError(f"unknown baseline(s) {', '.join(map(repr, unknown or names))}; choose from "
                              f"{', '.join(BASELINES)}")


device = _core_check(_device)
dtype = _core_check(_dtype)
model_name = _core_check(_model)
route_arg = _core_check(_route)
baseline_names = _core_check(_baselines)


def _each(check):
    return lambda values: [check(v) for v in values]


# dest -> check, for every subcommand that has the argument (None values are not checked)
CHECKS = {
    **dict.fromkeys(("batch_size", "limit", "max_new_tokens", "calib_limit", "val_limit", "batch_rows", "timesteps",
                     "n_envs", "n_steps", "workers", "obs_dim", "search_limit", "test_limit", "simulations", "trials",
                     "epochs", "patience", "max_edits"), positive_int),
    "refine_epochs": nonneg_int, "seed": seed, "bottleneck": router_size("bottleneck"),
    "windows": router_size("windows"),
    "temperature": positive_float, "lr": positive_float, "lam": nonneg_float,
    "top_p": ratio, "tau": unit_interval, "epsilon": unit_interval, "tau_limit": positive_int, "val_share": open_ratio, "budgets": ratio_list, "budget": budget,
    "fields": key_value_pairs, "output": output_dir, "device": device, "dtype": dtype, "model": model_name,
    "route": route_arg, "prompt": nonempty, "task": nonempty, "baseline": baseline_names,
    "baselines": baseline_names, "router": existing_path, "policy": existing_path, "labels": _each(existing_path),
    "null_store": existing_path, "null_labels": _each(existing_path),
}
COMMAND_CHECKS = {"eval": {"budget": ratio}}  # eval's --budget is the share a --baseline or routers may run
_FLAGS = {"lam": "--lambda"}


def _validate(args) -> None:
    """Run the checks on every parsed argument; raise InputError naming the first bad one."""
    checks = {**CHECKS, **COMMAND_CHECKS.get(getattr(args, "command", None), {})}
    for dest, value in vars(args).items():
        check = checks.get(dest)
        if check is None or value is None:
            continue
        try:
            check(value)
        except argparse.ArgumentTypeError as exc:
            flag = _FLAGS.get(dest, "--" + dest.replace("_", "-"))
            raise InputError(f"{flag} {exc}") from None


class _Parser(argparse.ArgumentParser):
    """Every (sub)command gets ``--debug``; a usage error is one line, with exit status 2."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of any error")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF id, model directory or .gguf file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (checked against what torch sees)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _load(args, check_supported: bool = True):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, check_supported=check_supported)


def cmd_info(args) -> int:
    """The model's block stack, the exactness self-check and whether it can be routed (exit 1 if not)."""
    from .errors import UnsupportedModelError
    from .executor import RouteExecutor, self_check

    model, _ = _load(args, check_supported=False)
    print(f"model:      {args.model} ({type(model).__name__})")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    try:
        ex = RouteExecutor(model, verify=False)  # the structure check; the self-check is reported below
    except UnsupportedModelError as exc:
        print("supported:  no")
        print(f"reason:     {exc}")
        return 1
    stack, fp = ex.stack, ex.fingerprint
    windows = sorted({w for w in stack.windows if w is not None})
    scales = [f"{what} {value:g}" for what, value in (("embeddings x", stack.embed_multiplier),
              ("logits x", stack.logit_multiplier), ("logits /", stack.logit_divisor)) if value is not None]
    print(f"layers:     {fp.num_layers} decoder blocks of {fp.block_params:,} parameters")
    print(f"hidden:     {fp.hidden_size}")
    print(f"attention:  {stack.attn_implementation}" + (f", sliding windows {windows}" if windows else ""))
    if scales:
        print(f"scaling:    {', '.join(scales)} (outside the blocks; reproduced by the executor)")
    check = self_check(ex)
    print(f"self-check: {check.describe()}")
    print(f"supported:  {'yes' if check.passed else 'no'}")
    return 0 if check.passed else 1


def cmd_run(args) -> int:
    from .executor import RouteExecutor
    from .tasks.prompts import render_prompt

    model, tok = _load(args)
    ex = RouteExecutor(model)
    ids = tok(render_prompt(tok, args.prompt, chat=not args.no_chat), return_tensors="pt",
              add_special_tokens=False).input_ids
    if args.router and args.route:
        raise LayerRouteError("give --route or --router, not both")
    if args.router:  # trained routers pick the route from the prompt, once, at prefill
        from layerroute.routers import load_routers, route_prompts

        route = route_prompts(load_routers(args.router, model), ex, ids, tau=args.tau)[0][0]
    else:
        route = ex.route(args.route)
    out = ex.generate(ids, routes=route, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out.sequences[0, ids.shape[1]:]
    print(f"route: {route.describe()}", file=sys.stderr)
    print(tok.decode(new, skip_special_tokens=True).strip())
    return 0


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (see `layerroute tasks`), jsonl:PATH, csv:PATH, "
                   "parquet:PATH or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--fields", default=None,
                   help="for data-file and hf: tasks, e.g. question=q,answer=a,choices=options or "
                        "choices=answer_a|answer_b|answer_c|answer_d (several columns); the answer may be a letter, "
                        "a 0-based index or the option text")
    p.add_argument("--kind", default=None, choices=["choice", "generate", "loglik"],
                   help="for data-file and hf: tasks (default: choice when --fields maps choices, else generate)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip data-file rows with a missing field, an unmatched answer or too few choices (and say "
                        "how many), instead of stopping at the first")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (and generated suites)")
    p.add_argument("--limit", type=int, default=None, help="score at most N examples of the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help="directory for results.json and per-sample JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")


def _task_options(args) -> dict:
    options = {"seed": args.seed}
    if args.fields:
        options["fields"] = dict(kv.split("=", 1) for kv in args.fields.split(","))
    if args.kind:
        options["kind"] = args.kind
    if getattr(args, "skip_bad_rows", False):
        options["skip_bad_rows"] = True
    return options


def _task(args):
    from .tasks import get_task

    return get_task(args.task, **_task_options(args))


_NOT_SETTINGS = ("func", "overwrite", "output", "batch_size", "batch_rows", "debug", "workers", "ray_address")


def _identity(args) -> dict:
    """The arguments that define a run's results (a store with others is refused, not resumed)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}


def cmd_eval(args) -> int:
    from contextlib import nullcontext

    from .evaluation import eval_header, evaluate, write_summary
    from .executor import RouteExecutor
    from .store import ResultsStore

    policy = args.router or args.policy
    if args.budget is not None and not (args.baseline or policy):
        raise InputError("--budget applies to --baseline and trained routers only; a route runs the blocks it names")
    task = _task(args)
    split = task.split(args.split, args.seed)
    with (ResultsStore(args.output) if args.output else nullcontext()) as store:  # its lock before the model loads
        model, tok = _load(args)
        ex = RouteExecutor(model)
        if args.baseline:
            from layerroute.objective import Objective
            from layerroute.search.baselines import baseline_route

            cal = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, option="--calib-limit")
            route = baseline_route(args.baseline, cal, 0.8 if args.budget is None else args.budget, args.seed)
        elif policy:
            from layerroute.policies import load_policy
            from layerroute.routers import RouterPolicy, load_routers

            # a RoutingPolicy: evaluate() calls its route_batch
            route = RouterPolicy(load_routers(args.router, model)) if args.router else load_policy(args.policy, ex)
            if args.budget is not None and route.type != "router":
                raise InputError(f"--budget applies to --baseline and trained routers only; {policy} is a "
                                 f"{route.type} policy, which runs the blocks it chooses")
            if args.budget is not None:
                route.budget = args.budget
            if args.tau is not None:
                if route.type != "router":
                    raise InputError(f"--tau is the routers' confidence threshold; {policy} is a {route.type} "
                                     f"policy, not routers")
                route.tau = args.tau
        else:
            route = ex.route(args.route)
        what = {"policy": str(policy), "policy_type": route.type} if policy else {"route": route.to_dict()}
        print(f"policy: {policy} ({route.type})" if policy else f"route: {route.describe()}", file=sys.stderr)
        if store is not None:
            store.open(eval_header(ex, task, args.split, args.seed, _identity(args)), overwrite=args.overwrite)
        result = evaluate(ex, tok, split, route, batch_size=args.batch_size, limit=args.limit, store=store)
        print(result.summary())
        if store is not None:
            write_summary(store, result, {**what, "task_source": task.source})
            print(f"wrote {store.path}")
    return 0


def cmd_baselines(args) -> int:
    from .executor import RouteExecutor
    from layerroute.search.baselines import BASELINES, format_table, plot_curves, run_baselines
    from .store import ResultsStore, atomic_write, model_header

    budgets = [float(b) for b in args.budgets.split(",")]
    names = args.baselines.split(",") if args.baselines else list(BASELINES)
    task = _task(args)
    out = args.output or f"runs/baselines-{args.task.replace(':', '-').replace('/', '-')}"
    with ResultsStore(out) as store:  # the single-writer lock, before the model loads
        model, tok = _load(args)
        ex = RouteExecutor(model)
        store.open({"kind": "baselines", "settings": _identity(args), **model_header(ex), "task": task.name,
                    "split": "test", "seed": args.seed}, overwrite=args.overwrite)
        rows = run_baselines(ex, tok, task, budgets, names, limit=args.limit, calib_limit=args.calib_limit,
                             val_limit=args.val_limit, seed=args.seed, batch_size=args.batch_size, store=store)
        table = format_table(rows)
        print(table)
        plot_curves(rows, store.path.parent / "baselines.png", f"{args.model} on {args.task} (test split)")
        atomic_write(store.path.parent / "table.md", table + "\n")
        print(f"wrote {store.path}, table.md and baselines.png")
    return 0


def cmd_search(args) -> int:
    """``layerroute search NAME``: any registered searcher, into a resumable results store (on Ray with
    ``--workers`` or ``--ray-address``)."""
    from dataclasses import asdict

    from layerroute.search import get_searcher, run_search
    from layerroute.search.base import config_from_args
    from layerroute.search.distributed import SearchSpec, check_ray_args, run_search_distributed
    from .budget import Budget
    from .route import Route
    from .store import ResultsStore, model_header

    cls = get_searcher(args.searcher)
    config = config_from_args(cls.Config, args)
    Budget.parse(args.budget)  # refuse a bad budget before loading anything
    task = _task(args)
    if args.null and task.kind != "choice":
        raise InputError(f"--null replaces each label with a random wrong option, but task {task.name} is a "
                         f"{task.kind} task without options")
    on_ray = args.workers is not None or bool(args.ray_address)
    if on_ray:
        check_ray_args(args.workers, args.ray_address)
    # The same spec builds the searcher here and, on Ray, in every actor.
    spec = SearchSpec(searcher=cls.name, task=args.task, config=asdict(config), task_options=_task_options(args),
                      model=args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      split=args.split, limit=args.limit, seed=args.seed,
                      objective=dict(reward=args.reward, lam=args.lam, budget=args.budget, batch_rows=args.batch_rows,
                                     null_seed=args.seed if args.null else None))
    out = args.output or f"runs/search-{cls.name}-{args.task.replace(':', '-').replace('/', '-')}"
    with ResultsStore(out) as store:  # the single-writer lock, before the model loads
        searcher = spec.build(task)
        obj, ex = searcher.objective, searcher.objective.executor
        common = {k: v for k, v in _identity(args).items() if k not in spec.config}  # the searcher's own options:
        header = {"kind": f"search:{cls.name}", "settings": {**common, **searcher.settings()},  # as settings() says
                  **model_header(ex), "task": task.name, "split": args.split, "seed": args.seed,
                  "labels": "null" if args.null else "gold"}
        if args.null:
            print(f"note: --null: every label is a seeded random wrong option; the results are the chance level of "
                  f"{cls.name}'s figures, never results", file=sys.stderr)
        elif cls.oracle:
            print(f"note: {cls.name} reads the labels of the samples it routes; its rewards are an oracle upper bound",
                  file=sys.stderr)
        store.open(header, overwrite=args.overwrite)
        if on_ray:
            summary = run_search_distributed(spec, store, args.workers, args.ray_address, searcher=searcher)
        else:
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


def cmd_train_ppo(args) -> int:
    """``layerroute train-ppo``: PPO on the routing env (search split), resumable; exports DIR/policy."""
    from layerroute.envs.routing_env import LayerRoutingVecEnv
    from layerroute.policies.ppo import train_ppo
    from .executor import RouteExecutor
    from .store import ResultsStore, model_header

    task = _task(args)  # the arguments were checked by _validate (CHECKS) before
    if args.mode == "edit" and args.budget is not None:
        raise InputError("--budget does not apply to --mode edit (its episodes start from the full route); "
                         "penalise compute with --lambda instead")
    out = args.output or f"runs/ppo-{args.task.replace(':', '-').replace('/', '-')}"
    with ResultsStore(out) as store:  # the single-writer lock, before the model loads
        model, tok = _load(args)
        ex = RouteExecutor(model)
        venv = LayerRoutingVecEnv(args.n_envs, ex, tok, task, mode=args.mode, reward=args.reward, lam=args.lam,
                                  budget=args.budget, limit=args.limit, seed=args.seed, obs_dim=args.obs_dim,
                                  max_edits=args.max_edits, batch_rows=args.batch_rows)
        settings = {k: v for k, v in _identity(args).items() if k not in ("timesteps", "device", "no_progress")}
        if args.mode != "edit":  # stores of the other modes predate --max-edits and stay resumable
            settings.pop("max_edits", None)
        store.open({"kind": "train-ppo", "settings": settings, **model_header(ex), "task": task.name,
                    "split": "search", "seed": args.seed}, overwrite=args.overwrite)
        if args.overwrite:
            import shutil

            shutil.rmtree(store.path.parent / "checkpoints", ignore_errors=True)
        _, policy = train_ppo(venv, store, args.timesteps, seed=args.seed, device=args.device, n_steps=args.n_steps,
                              batch_size=args.batch_size, learning_rate=args.lr, progress=not args.no_progress)
        print(f"wrote {store.path}" + ("" if policy is None else f"; policy in {store.path.parent / 'policy'} "
                                       f"(evaluate with: layerroute eval --policy {store.path.parent / 'policy'})"))
    return 0


def cmd_analyze(args) -> int:
    """``layerroute analyze STORE``: oracle figures, action heatmap and reward histogram of an MCTS store."""
    from pathlib import Path

    from layerroute.search.analyze import report

    print(report(args.store, args.output, args.null_store))
    out = args.output or (args.store if Path(args.store).is_dir() else Path(args.store).parent)
    print(f"wrote {Path(out) / 'analyze.md'}, actions.png and rewards.png")
    return 0


def cmd_signal(args) -> int:
    """``layerroute signal``: whether per-input routing can pay on this model and task (see search/signal.py)."""
    from layerroute.objective import Objective
    from layerroute.search.signal import check_request, signal, write_report
    from .executor import RouteExecutor

    task = _task(args)
    check_request(task, args.limit)  # before the model loads
    model, tok = _load(args)
    obj = Objective.from_task(RouteExecutor(model), tok, task, args.split, args.limit, args.seed,
                              batch_rows=args.batch_rows)
    report = signal(obj, args.seed)
    out = args.output or f"runs/signal-{args.task.replace(':', '-').replace('/', '-')}"
    print(write_report(report, out, "layerroute " + " ".join(sys.argv[1:])))
    print(f"wrote {out}/signal.md, signal.json and signal.png")
    return 0


def cmd_tasks(args) -> int:
    from .tasks import list_tasks

    print("\n".join(list_tasks(usage=True)))
    return 0


def cmd_train_router(args) -> int:
    from layerroute.routers.training import train_router_command
    from .store import check_store_weights

    def load(args):  # labels searched on another checkpoint of the same shape are refused
        model, tok = _load(args)
        for path in args.labels:
            check_store_weights(path, model)
        return model, tok

    return train_router_command(args, load)


def cmd_pipeline(args) -> int:
    from layerroute.routers.pipeline import run_pipeline

    return run_pipeline(args, _load)


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


def cmd_lm_eval(args) -> int:
    """``layerroute lm-eval ARGS``: lm-eval's own command line, with ``--model layerroute`` registered."""
    from .harness import run_lm_eval

    rest = args.lm_eval_args
    return run_lm_eval(rest[1:] if rest[:1] == ["--"] else rest)


def build_parser() -> argparse.ArgumentParser:
    from layerroute.search.baselines import CALIB_LIMIT, VAL_LIMIT

    parser = _Parser(prog="layerroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="layers, parameters, and whether the model can be routed")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="generate with a route")
    _add_model_args(p)
    p.add_argument("--route", default=None,
                   help="JSON file or spec: identity, skip:20-24, repeat:10, repeat:10x3, chain:0-9,9,10-29 (join with +)")
    p.add_argument("--router", default=None, help="a trained router directory: routers pick the route per prompt")
    p.add_argument("--tau", type=float, default=None,
                   help="with --router: skip or repeat a block only where the router is surer than tau (default: "
                        "the tau saved with the routers)")
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
    group.add_argument("--policy", default=None, help="a saved routing policy (directory with policy_config.json, "
                       "e.g. from train-ppo) or a route JSON file")
    group.add_argument("--router", default=None,
                       help="a trained router directory (from train-router or pipeline); same as --policy DIR")
    p.add_argument("--budget", type=float, default=None,
                   help="share of blocks a --baseline (default 0.8) or trained routers (default: their own) may run")
    p.add_argument("--calib-limit", type=int, default=CALIB_LIMIT, help="search-split examples a --baseline is "
                   "fitted on")
    p.add_argument("--tau", type=float, default=None,
                   help="with --router: skip or repeat a block only where the router is surer than tau (default: "
                        "the tau saved with the routers)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("baselines", help="every static baseline at several budgets: table and PNG")
    _add_model_args(p)
    _add_task_args(p)
    p.add_argument("--budgets", default="1.0,0.9,0.8,0.7")
    p.add_argument("--baselines", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--calib-limit", type=int, default=CALIB_LIMIT, help="search-split examples each baseline is "
                   "fitted on")
    p.add_argument("--val-limit", type=int, default=VAL_LIMIT, help="validation-split examples that choose the best "
                   "static route per budget (and Optuna's route among its top trials)")
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
        q.add_argument("--workers", type=int, default=None,
                       help="spread the units over N Ray actors on a local Ray (one torch thread, or GPU, each)")
        q.add_argument("--ray-address", default=None, help="join the Ray cluster at HOST:PORT instead")
        q.add_argument("--null", action="store_true",
                       help="search against null labels (a seeded random wrong option per sample, choice tasks): the "
                            "chance level that an oracle's figures are read against")
        add_config_arguments(q, cls.Config)
        q.set_defaults(func=cmd_search)

    p = sub.add_parser("train-ppo", help="train a PPO routing policy on the search split (resumes from --output)")
    _add_model_args(p)
    _add_task_args(p)
    p.set_defaults(batch_size=256, limit=512)
    p.add_argument("--mode", default="per_sample", choices=["per_sample", "cola", "per_token", "edit"],
                   help="per_sample: skip/execute/repeat per layer; cola: next block or stop; per_token: token "
                        "groups per layer (not exportable as a policy); edit: at most --max-edits skips or repeats "
                        "of the full route")
    p.add_argument("--max-edits", type=int, default=4, help="edit mode: edits per episode (K >= 1)")
    p.add_argument("--reward", default="margin", choices=["margin", "correct"])
    p.add_argument("--lambda", dest="lam", type=float, default=0.0, help="compute penalty per share of blocks")
    p.add_argument("--budget", default=None, help="hard budget: a share of blocks (0.8) or a block count (24)")
    p.add_argument("--timesteps", type=int, required=True, help="total environment steps (a rerun extends/resumes)")
    p.add_argument("--n-envs", type=int, default=16, help="episodes advanced together per step")
    p.add_argument("--n-steps", type=int, default=64, help="steps per env per PPO rollout")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--obs-dim", type=int, default=16, help="principal components of the hidden-state summary")
    p.add_argument("--batch-rows", type=int, default=64, help="token rows per executor call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_ppo)

    p = sub.add_parser("signal", help="before training routers: can per-input routing pay on this model and task? "
                       "(null-corrected oracle, static against per-input, predictability)")
    _add_model_args(p)
    _add_task_args(p)
    p.set_defaults(limit=200, batch_size=None)
    p.add_argument("--split", default="search", choices=["search", "validation", "test", "all"])
    p.add_argument("--batch-rows", type=int, default=64, help="token rows per executor call")
    p.set_defaults(func=cmd_signal)

    p = sub.add_parser("tasks", help="list the task specs --task accepts")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("analyze", help="oracle figures of an MCTS store beside their chance level (its --null search)")
    p.add_argument("store", help="an MCTS results store (folder or results.jsonl)")
    p.add_argument("--null", dest="null_store", default=None,
                   help="the same search run with --null (default: the folder STORE-null beside STORE)")
    p.add_argument("--output", default=None, help="folder for analyze.md and the PNGs (default: the store's folder)")
    p.set_defaults(func=cmd_analyze)

    from layerroute.routers.pipeline import add_pipeline_arguments
    from layerroute.routers.training import add_train_arguments

    p = sub.add_parser("train-router", help="train per-layer routers on searched routes (MCTS, Optuna or PPO stores)")
    _add_model_args(p)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train_router)

    p = sub.add_parser("pipeline", help="the main job: MCTS search, train routers, evaluate against the full model "
                       "and the best static route, generate with the routed model")
    _add_model_args(p)
    add_pipeline_arguments(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("demo", help="the earlier demo: routed generation along three routes, then static baselines")
    _add_model_args(p)
    p.add_argument("--budgets", default="1.0,0.9,0.8,0.7")
    p.add_argument("--limit", type=int, default=40, help="test examples per evaluation (kept small for a demo)")
    p.add_argument("--calib-limit", type=int, default=16)
    p.add_argument("--val-limit", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("lm-eval", add_help=False,
                       help="lm-evaluation-harness with --model layerroute registered; every argument goes to lm-eval")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
    return parser


def _missing_dirs(path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first (removed again if a run fails)."""
    missing, p = [], Path(str(path)).expanduser() if path else None
    while p is not None and not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (a bad argument, an unreadable file, an unsupported model) ends
    in one ``error:`` line and exit status 2; ``--debug`` adds the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, flags included
        argv = ["lm-eval", "--", *argv[1:]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    args.debug = getattr(args, "debug", False)
    created = _missing_dirs(getattr(args, "output", None))
    try:
        _validate(args)
        return args.func(args)
    except (LayerRouteError, OSError, KeyboardInterrupt) as exc:
        plain_os = isinstance(exc, OSError) and not isinstance(exc, LayerRouteError)  # (ModelNotFoundError is both)
        if plain_os and not exc.filename:
            raise  # not a file the user named: a bug, shown with its traceback
        if args.debug:
            import traceback

            traceback.print_exc()
        for d in created:  # leave nothing behind: the output directories this run made, if still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        if isinstance(exc, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        if plain_os:
            print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
