"""The ``layerroute`` command line.

Core commands live here (info, run, eval, tasks, runs, lm-eval). Every other command comes from
a plug-in package's ``commands.py``, found through the ``layerroute.commands`` entry points
(pyproject.toml), so this module imports no plug-in. A command's arguments are built only when
that command runs, and its handler imports the heavy libraries, so ``--help`` and argument errors
answer before torch is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .args import Parser, _core_check, add_model_args, add_task_args, identity, load, shrink, task_of, validate
from .errors import InputError, LayerRouteError

ENTRY_POINTS = "layerroute.commands"


@dataclass
class Command:
    """A subcommand: ``build(parser)`` adds its arguments (only when it runs, or for its help);
    ``run(args)`` returns the exit status (a name: the function of that name in this module, looked
    up when the command runs). ``checks`` add argument checks by dest; ``small`` raises
    caps of ``LAYERROUTE_README_SMALL`` (see ``layerroute.args.shrink``)."""

    name: str
    help: str
    build: Callable[[argparse.ArgumentParser], None]
    run: Callable | str
    checks: dict = field(default_factory=dict)
    small: dict = field(default_factory=dict)
    add_help: bool = True


# ---- info, run ------------------------------------------------------------------------------

def cmd_info(args) -> int:
    """The model's block stack, the exactness self-check and whether it can be routed (exit 1 if not)."""
    from .info import run_info

    return run_info(args)


def build_info(p) -> None:
    add_model_args(p)
    p.add_argument("--recheck", action="store_true",
                   help="load the model and run the self-check again, even if this checkpoint's report is remembered")


def policy_type(path) -> str:
    """What a --policy / --router path holds, read without loading anything: "static" (a route file),
    "router", or the type its policy_config.json names ("?" if unreadable: loading then says why)."""
    import json

    path = Path(path)
    if path.is_file():
        return "static" if path.suffix == ".json" and path.name != "policy_config.json" else "?"
    if (path / "router_config.json").is_file():
        return "router"
    if (path / "token_router_config.json").is_file():
        return "token_router"
    try:
        return str(json.loads((path / "policy_config.json").read_text()).get("type", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def recorded_task(path) -> dict | None:
    """The task record (``layerroute.args.task_record``) a saved policy or router folder keeps, read
    without loading anything; None where it keeps none."""
    import json

    path = Path(path)
    for name in ("router_config.json", "policy_config.json"):
        try:
            training = json.loads((path / name).read_text()).get("training") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(training, dict) and isinstance(training.get("task"), str):
            return {"task": training["task"], "task_options": training.get("task_options") or {}}
    return None


def _task_from_policy(args) -> None:
    """Without --task, eval reads the task a --policy / --router was trained on (and its split seed)."""
    from .args import restore_task

    policy = args.router or args.policy
    if not policy:
        raise InputError("--task is required (only a --policy or --router folder can supply it)")
    record = recorded_task(policy)
    if record is None:
        raise InputError(f"{policy} does not record the task it was trained on; give --task")
    restore_task(args, record)
    print(f"task: {args.task} (the task {policy} was trained on; split seed {args.seed})", file=sys.stderr)


def refuse_ignored(args, rules) -> None:
    """Refuse flags that would be ignored: ``rules`` is (dest, applies, reason); a flag given on the
    command line (its value differs from the parser's default) where ``applies`` is false is an error."""
    given = getattr(args, "given", set())
    for dest, applies, reason in rules:
        if dest in given and not applies:
            raise InputError(f"--{dest.replace('_', '-')} {reason}")


def cmd_run(args) -> int:
    from .executor import RouteExecutor
    from .tasks.prompts import render_prompt

    kind = policy_type(args.router) if args.router else None
    refuse_ignored(args, [
        ("tau", kind == "router", "is the routers' confidence threshold: it needs --router (per-sample routers, "
                                  "from train-router)"),
        ("temperature", args.sample, "applies to sampling only: add --sample"),
        ("top_p", args.sample, "applies to sampling only: add --sample"),
        ("seed", args.sample, "seeds sampling only (greedy decoding has no randomness): add --sample")])
    if args.router and kind not in ("router", "token_router"):
        _refuse_router(args.router)
    model, tok = load(args)
    ex = RouteExecutor(model)
    ids = tok(render_prompt(tok, args.prompt, chat=not args.no_chat), return_tensors="pt",
              add_special_tokens=False).input_ids
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "token_router":  # per-token decisions at prefill and at every new token
        from layerroute.routers import TokenRoutedModel, load_token_routers

        routed = TokenRoutedModel(model, load_token_routers(args.router, model), tok)
        out = routed.generate(ids, **sampling)
        seen = routed.last_decisions  # batch 1: every pair is a real token's
        print(f"per-token routers {args.router}: {seen.executed / max(1, seen.total):.1%} of the (token, block) "
              f"pairs run at prefill and decoding executed ({routed.rule})", file=sys.stderr)
    else:
        if args.router:  # trained routers pick the route from the prompt, once, at prefill
            from layerroute.routers import load_routers, route_prompts

            route = route_prompts(load_routers(args.router, model), ex, ids, tau=args.tau)[0][0]
        else:
            route = ex.route(args.route)
        out = ex.generate(ids, routes=route, **sampling)
        print(f"route: {route.describe()}", file=sys.stderr)
    print(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def _refuse_router(path) -> None:
    """A --router path that is not a router directory, refused before the model loads (as loading would)."""
    from .store import describe_file

    path = Path(path)
    if path.is_file():
        what = describe_file(path)
        raise InputError(f"{path} is {what}, not a router directory (train-router writes one, with "
                         f"router_config.json and routers.safetensors)" +
                         ("; run a route with --route" if what == "a route file" else ""))
    if (path / "policy_config.json").is_file():
        raise InputError(f"{path} is a saved {policy_type(path)} policy, not routers: evaluate it with "
                         f"eval --policy {path}")
    if path.is_dir():
        raise InputError(f"{path} holds no saved routers: router_config.json is missing")


def build_run(p) -> None:
    add_model_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--route", default=None, help="JSON file or spec: identity, skip:20-24, repeat:10, "
                       "repeat:10x3, chain:0-9,9,10-29 (join with +) (default: identity)")
    which.add_argument("--router", default=None, help="a trained router directory: routers pick the route per prompt "
                       "(train-router), or decide per token and block (train-token-router)")
    p.add_argument("--tau", type=float, default=None,
                   help="with --router: skip or repeat a block only where the router is surer than tau (default: "
                        "the tau saved with the routers)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus sampling")
    p.add_argument("--seed", type=int, default=0, help="with --sample")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")


# ---- eval -----------------------------------------------------------------------------------

def eval_policy(args, ex, tok, task):
    """What ``eval`` routes with: a route, a fitted --baseline, or a saved policy / routers (a RoutingPolicy)."""
    from .budget import Budget

    budget = Budget.parse(args.budget)
    if args.baseline:
        from layerroute.objective import Objective
        from layerroute.search.baselines import BASELINES

        cal = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, option="--calib-limit")
        return BASELINES[args.baseline](cal, (budget or Budget(ratio=0.8)).max_blocks(ex.num_layers), args.seed)
    if args.router and policy_type(args.router) == "token_router":  # decides per token inside every block
        from layerroute.routers.token_policy import TokenRouterPolicy

        return TokenRouterPolicy.load(args.router, ex)
    if args.router or args.policy:
        from layerroute.policies import load_policy
        from layerroute.routers import RouterPolicy, load_routers

        # a RoutingPolicy: evaluate() calls its route_batch
        policy = RouterPolicy(load_routers(args.router, ex.model)) if args.router else load_policy(args.policy, ex)
        if budget is not None:
            policy.budget = budget
        if args.tau is not None:
            policy.tau = args.tau
        return policy
    return ex.route(args.route)


def _check_eval_args(args, task) -> None:
    """Refuse what eval would ignore, and --baseline names, before the model loads."""
    policy = args.router or args.policy
    kind = policy_type(policy) if policy else None
    if args.budget is not None and not args.baseline and kind != "router":
        raise InputError("--budget applies to --baseline and trained routers only; " +
                         (f"{policy} is a {kind} policy, which runs the blocks it chooses" if policy
                          else "a route runs the blocks it names"))
    if args.tau is not None and kind != "router":
        raise InputError("--tau is the routers' confidence threshold; " +
                         (f"{policy} is a {kind} policy, not routers" if policy else "give --router DIR"))
    if args.router and kind not in ("router", "token_router"):
        _refuse_router(args.router)
    refuse_ignored(args, [("calib_limit", args.baseline, "sets the samples a --baseline is fitted on: it needs "
                                                         "--baseline")])
    check_task_flags(args, task)


def _baseline(value) -> None:
    from layerroute.search.commands import check_baselines  # (the search plug-in owns the baselines)

    check_baselines(value, allow_optuna=False)


baseline_check = _core_check(_baseline)


def check_task_flags(args, task) -> None:
    """--scoring is for choice tasks, --extract for generate tasks: elsewhere they would be ignored."""
    if getattr(args, "scoring", None) and task.kind != "choice":
        raise InputError(f"--scoring applies to choice tasks; {task.name} is a {task.kind} task")
    if getattr(args, "extract", None) and task.kind != "generate":
        raise InputError(f"--extract applies to generate tasks; {task.name} is a {task.kind} task")


def cmd_eval(args) -> int:
    from contextlib import nullcontext

    from .evaluation import degenerate_warning, eval_header, evaluate, write_summary
    from .executor import RouteExecutor
    from .store import ResultsStore

    if args.task is None:
        _task_from_policy(args)
    task = task_of(args)
    _check_eval_args(args, task)
    split = task.split(args.split, args.seed)
    policy = args.router or args.policy
    with (ResultsStore(args.output) if args.output else nullcontext()) as store:  # its lock before the model loads
        model, tok = load(args)
        ex = RouteExecutor(model)
        route = eval_policy(args, ex, tok, task)
        what = {"policy": str(policy), "policy_type": route.type} if policy else {"route": route.to_dict()}
        print(f"policy: {policy} ({route.type})" if policy else f"route: {route.describe()}", file=sys.stderr)
        if store is not None:
            store.open(eval_header(ex, task, args.split, args.seed, identity(args)), overwrite=args.overwrite)
        result = evaluate(ex, tok, split, route, batch_size=args.batch_size, limit=args.limit, store=store)
        print(f"split: {args.split} (seed {args.seed}): {result.n} scored of {len(split)} in the split, "
              f"{len(task)} in the task")
        print(result.summary())
        warning = degenerate_warning([s.blocks for s in result.samples], ex.num_layers) if policy else None
        if policy and result.per_token and result.mean_blocks <= max(1, ex.num_layers // 10):
            warning = (f"degenerate policy: its tokens execute {result.mean_blocks:.2f} of {ex.num_layers} blocks on "
                       f"average; its decisions barely use the model")
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if store is not None:
            write_summary(store, result, {**what, "task_source": task.source})
            print(f"wrote {store.path}")
    return 0


def build_eval(p) -> None:
    add_model_args(p)
    add_task_args(p, split="test", task_default="with --policy or --router, the task it was trained on, read as "
                                                 "it was then, with its split seed")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--route", default=None, help="route JSON file or spec (default: identity)")
    group.add_argument("--baseline", default=None,
                       help="static baseline fitted on the search split: unified, drop_last, similarity, greedy, random")
    group.add_argument("--policy", default=None, help="a saved routing policy (directory with policy_config.json, "
                       "e.g. from train-ppo) or a route JSON file")
    group.add_argument("--router", default=None,
                       help="a trained router directory (from train-router or pipeline; same as --policy DIR), or a "
                            "token-router directory (from train-token-router: decides per token and block)")
    p.add_argument("--budget", default=None,
                   help="a share of the blocks (0.8) or a block count (24) that a --baseline (default 0.8) or "
                        "trained routers (default: their own) may run")
    p.add_argument("--calib-limit", type=int, default=256, help="search-split examples a --baseline is fitted on")
    p.add_argument("--tau", type=float, default=None,
                   help="with --router: skip or repeat a block only where the router is surer than tau (default: "
                        "the tau saved with the routers)")


# ---- tasks, runs, lm-eval ---------------------------------------------------------------------

def cmd_tasks(args) -> int:
    from .tasks import list_tasks

    print("\n".join(list_tasks(usage=True)))
    return 0


def cmd_runs(args) -> int:
    from .runs import format_runs, list_runs

    if not Path(args.folder).is_dir():
        raise InputError(f"{args.folder} is not a directory")
    print(format_runs(list_runs(args.folder)))
    return 0


def build_runs(p) -> None:
    p.add_argument("folder", nargs="?", default="runs", help="the folder to look in")


def cmd_lm_eval(args) -> int:
    """``layerroute lm-eval ARGS``: lm-eval's own command line, with ``--model layerroute`` registered."""
    from .harness import run_lm_eval

    rest = args.lm_eval_args
    return run_lm_eval(rest[1:] if rest[:1] == ["--"] else rest)


def build_lm_eval(p) -> None:
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)


CORE = [
    Command("info", "layers, parameters, and whether the model can be routed", build_info, "cmd_info"),
    Command("run", "generate with a route or trained routers", build_run, "cmd_run"),
    Command("eval", "accuracy, blocks per sample and throughput of a route, baseline or policy on a task",
            build_eval, "cmd_eval", checks={"baseline": baseline_check}),
    Command("tasks", "list the task specs --task accepts", lambda p: None, "cmd_tasks"),
    Command("runs", "list the runs, routers and policies under a folder (model, task, headline figure)",
            build_runs, "cmd_runs"),
    Command("lm-eval", "lm-evaluation-harness with --model layerroute registered; every argument goes to lm-eval",
            build_lm_eval, "cmd_lm_eval", add_help=False),
]


# ---- assembling the parser --------------------------------------------------------------------

def commands() -> list[Command]:
    """The core commands, then every plug-in's (entry points of group ``layerroute.commands``)."""
    from importlib.metadata import entry_points

    found = list(CORE)
    for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
        found += ep.load()()
    names = [c.name for c in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LayerRouteError(f"command(s) {', '.join(twice)} registered twice (entry points {ENTRY_POINTS})")
    return found


def build_parser(argv: list[str] | None = None, found: list[Command] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the command it names gets its arguments (the others stay light)."""
    found = commands() if found is None else found
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    parser = Parser(prog="layerroute", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in found:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, add_help=cmd.add_help)
        if chosen is None or chosen == cmd.name:
            cmd.build(p)
        p.set_defaults(func=globals()[cmd.run] if isinstance(cmd.run, str) else cmd.run)
    return parser


def _given(parser: argparse.ArgumentParser, args) -> set:
    """The dests whose value differs from their parser default (what the user set)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    actions = [a for a in sub._actions if a.dest != "help"]
    for a in sub._actions:  # a searcher's own options sit one level down
        if isinstance(a, argparse._SubParsersAction) and getattr(args, a.dest, None) in a.choices:
            actions += a.choices[getattr(args, a.dest)]._actions
    return {a.dest for a in actions if hasattr(args, a.dest) and getattr(args, a.dest) != a.default}


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
    found = commands()
    parser = build_parser(argv, found)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    cmd = next(c for c in found if c.name == args.command)
    args.debug = getattr(args, "debug", False)
    args.given = _given(parser, args)
    if os.environ.get("LAYERROUTE_README_SMALL"):
        changed = shrink(args, cmd.small)
        if changed:
            print(f"LAYERROUTE_README_SMALL: {', '.join(changed)}", file=sys.stderr)
    created = _missing_dirs(getattr(args, "output", None))
    try:
        validate(args, cmd.checks)
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
