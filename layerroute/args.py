"""The command line's argument layer: checks, shared argument groups, and what a command builds from them.

Light on purpose: nothing here imports torch, transformers or a plug-in folder at module level,
so ``layerroute --help`` and an argument error answer at once. Plug-ins' ``commands.py`` use
these helpers; handlers turn the parsed arguments into typed configs and call the library.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import InputError, LayerRouteError

DEFAULT_MODEL = "smollm2-135m"  # the embedded default (layerroute.models.DEFAULT_MODEL; a test keeps them equal)
SPLIT_CHOICES = ("search", "validation", "test", "all")

# ---- argument checks -------------------------------------------------------------------------
# Every argument is checked before any model is loaded or anything is written, in one place.
# Each check takes the raw value (a string, or what argparse's `type=` already made of it),
# returns the parsed value, and raises argparse.ArgumentTypeError with a message that follows
# the flag ("--batch-size must be at least 1, got 0"). Use them as `type=` in new
# subcommands; `validate` also runs them on every parsed argument whose dest is in CHECKS (or
# in a command's own `checks`), so a subcommand that uses these dest names is covered as it is.
#
#   positive_int     an integer >= 1 (counts and sizes: --batch-size, --limit, --max-new-tokens, ...)
#   nonneg_int       an integer >= 0 (--refine-epochs)
#   seed             an integer in [0, 2**32 - 1] (--seed: numpy and SB3 take no larger one)
#   router_size      an integer in [1, routers.network.LIMITS] (--bottleneck, --windows)
#   positive_float   a finite number > 0 (--temperature, --lr)
#   nonneg_float     a finite number >= 0 (--lambda)
#   ratio            a number in (0, 1] (--top-p)
#   open_ratio       a number in (0, 1) (--val-share)
#   ratio_list       comma-separated distinct numbers in (0, 1] -> list (--budgets)
#   budget           a share in (0, 1] or a whole block count >= 1 (every --budget: a layerroute.budget.Budget)
#   key_value_pairs  k=v[,k=v...] with distinct non-empty keys -> dict (--fields)
#   output_dir       a directory that is writable, or can be created; nothing is created (--output)
#   existing_path    a file or directory that exists (--router, --policy, each of --labels)
#   device           cpu, cuda, cuda:N or mps that torch can use (--device)
#   dtype            float32/fp32, bfloat16/bf16, float16/fp16 or auto (--dtype)
#   model_name       the embedded name, a hub id, or a local path that looks like a model (--model)
#   route_arg        a route spec (its syntax) or a route JSON file (its format) (--route)
#   nonempty         a string that is not blank (--prompt, --task)


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
    from .model_files import check_device

    check_device(value)


def _dtype(value):
    from .model_files import check_dtype

    check_dtype(value)


def _model(value):
    from .model_files import check_model_name

    check_model_name(value)


def _route(value):
    from .route import check_route_arg

    check_route_arg(value)


device = _core_check(_device)
dtype = _core_check(_dtype)
model_name = _core_check(_model)
route_arg = _core_check(_route)


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
    "top_p": ratio, "tau": unit_interval, "epsilon": unit_interval, "tau_limit": positive_int, "val_share": open_ratio,
    "budgets": ratio_list, "budget": budget,
    "fields": key_value_pairs, "output": output_dir, "device": device, "dtype": dtype, "model": model_name,
    "route": route_arg, "prompt": nonempty, "task": nonempty, "router": existing_path, "policy": existing_path, "labels": _each(existing_path),
    "null_store": existing_path, "null_labels": _each(existing_path),
}
_FLAGS = {"lam": "--lambda"}
_SLOW = (device, dtype, model_name, route_arg)  # these read files or import torch: run after every quick check


def validate(args, extra: dict | None = None) -> None:
    """Run the checks on every parsed argument, the quick ones first; raise InputError naming the first
    bad one. ``extra`` adds a command's own checks (dest -> check)."""
    checks = {**CHECKS, **(extra or {})}
    pending = [(dest, value, checks[dest]) for dest, value in vars(args).items()
               if value is not None and checks.get(dest) is not None]
    for dest, value, check in sorted(pending, key=lambda item: item[2] in _SLOW):
        try:
            check(value)
        except argparse.ArgumentTypeError as exc:
            flag = _FLAGS.get(dest, "--" + dest.replace("_", "-"))
            raise InputError(f"{flag} {exc}") from None



# ---- parser, shared argument groups ---------------------------------------------------------

class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help names it already or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every (sub)command gets ``--debug``; a usage error is one line, with exit status 2."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", Formatter)
        super().__init__(*a, **kw)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of any error")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF id, model directory or .gguf file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (checked against what torch sees)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def load(args, check_supported: bool = True):
    """(model, tokenizer) as ``--model``, ``--device``, ``--dtype`` and ``--trust-remote-code`` say."""
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, check_supported=check_supported)


def add_task_args(p: argparse.ArgumentParser, output: str = "a directory for results.jsonl (the results store)",
                  split: str | None = None, task_default: str | None = None) -> None:
    """--task and how to read it, --seed, --limit, --batch-size, --output, --overwrite (and --split if given).
    With ``task_default`` (what stands in for it, in words), --task is optional."""
    from .tasks.extract import EXTRACTORS

    p.add_argument("--task", required=task_default is None, help="task name (see `layerroute tasks`), jsonl:PATH, "
                   "csv:PATH, parquet:PATH or hf:NAME[:CONFIG]:SPLIT" + (f" (default: {task_default})"
                                                                         if task_default else ""))
    p.add_argument("--fields", default=None,
                   help="for data-file and hf: tasks, e.g. question=q,answer=a,choices=options or "
                        "choices=answer_a|answer_b|answer_c|answer_d (several columns); the answer may be a letter, "
                        "a 0-based index or the option text")
    p.add_argument("--kind", default=None, choices=["choice", "generate", "loglik"],
                   help="for data-file and hf: tasks (default: choice when --fields maps choices, else generate)")
    p.add_argument("--scoring", default=None, choices=["letter", "cloze"],
                   help="for data-file and hf: choice tasks: score the answer letters A, B, ... (letter, the "
                        "default) or each option's text as a continuation (cloze)")
    p.add_argument("--extract", default=None, choices=sorted(EXTRACTORS),
                   help="for data-file and hf: generate tasks: how an answer is read from the text, the gold's and "
                        "the model's (default: last_number)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip data-file rows with a missing field, an unmatched answer or too few choices (and say "
                        "how many), instead of stopping at the first")
    if split is not None:
        p.add_argument("--split", default=split, choices=SPLIT_CHOICES,
                       help="the split to use: search 50%%, validation 20%%, test 30%% of the examples, or all")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (and generated suites)")
    p.add_argument("--limit", type=int, default=None, help="use at most N examples of the split (all when unset)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help=output)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")


def task_options(args) -> dict:
    """The options ``get_task`` takes from the task arguments: parsed arguments, or a mapping of the
    same names (a results store's header ``settings``; a name it lacks was not given)."""
    if isinstance(args, Mapping):
        args = argparse.Namespace(**{"fields": None, **args})
    options = {"seed": args.seed}
    if args.fields:
        options["fields"] = dict(kv.split("=", 1) for kv in args.fields.split(","))
    for dest, option in (("kind", "kind"), ("scoring", "choice_scoring"), ("extract", "extract")):
        if getattr(args, dest, None):
            options[option] = getattr(args, dest)
    if getattr(args, "skip_bad_rows", False):
        options["skip_bad_rows"] = True
    return options


DATA_TASKS = ("jsonl", "csv", "parquet", "hf")  # the task sources that read users' files: they take --fields ...


def task_record(args) -> dict:
    """What a trained policy records of its task (spec, reading options, split seed), so that
    ``eval --policy`` reads the same task and tests on the split it did not train on."""
    return {"task": args.task, "task_options": task_options(args)}


def restore_task(args, record: dict) -> None:
    """Set ``args``' task arguments from a ``task_record`` (``--seed`` only where the user gave none)."""
    options = dict(record.get("task_options") or {})
    args.task = record["task"]
    fields = options.get("fields")
    args.fields = ",".join(f"{k}={v}" for k, v in fields.items()) if fields else None
    args.kind, args.scoring, args.extract = options.get("kind"), options.get("choice_scoring"), options.get("extract")
    args.skip_bad_rows = bool(options.get("skip_bad_rows"))
    if "seed" not in getattr(args, "given", set()) and "seed" in options:
        args.seed = int(options["seed"])


def task_of(args):
    """The task ``--task`` names, read as the task arguments say (options only data files take are
    refused for the other tasks, which would ignore them)."""
    from .tasks import get_task

    given = [f"--{d.replace('_', '-')}" for d in ("fields", "kind", "scoring", "extract", "skip_bad_rows")
             if getattr(args, d, None)]
    if given and args.task.strip().partition(":")[0] not in DATA_TASKS:
        raise InputError(f"{', '.join(given)}: for data-file and hf: tasks ({', '.join(DATA_TASKS)}); "
                         f"{args.task} has its own fields and scoring")
    return get_task(args.task, **task_options(args))


_NOT_SETTINGS = ("func", "given", "overwrite", "output", "batch_size", "batch_rows", "debug", "workers", "ray_address")
_NEW_OPTIONS = ("scoring", "extract")  # recorded only when given, so stores written before them still resume


def identity(args) -> dict:
    """The arguments that define a run's results (a store with others is refused, not resumed)."""
    return {k: v for k, v in vars(args).items()
            if k not in _NOT_SETTINGS and not (k in _NEW_OPTIONS and v is None)}


def default_output(args, what: str) -> str:
    """``--output``, or ``runs/WHAT-TASK`` (the task spec made a folder name)."""
    return args.output or f"runs/{what}-{args.task.replace(':', '-').replace('/', '-')}"


# ---- small runs (the README check) ----------------------------------------------------------
# LAYERROUTE_README_SMALL=1 caps sizes so that every command of README.md runs in seconds; it
# never changes what a command does, only how much of it. A command may raise a cap (`small`).
SMALL = {"limit": 4, "calib_limit": 4, "val_limit": 4, "search_limit": 4, "test_limit": 4, "tau_limit": 4,
         "simulations": 2, "trials": 2, "timesteps": 32, "n_envs": 4, "n_steps": 8, "epochs": 1, "refine_epochs": 1,
         "max_new_tokens": 8}


def shrink(args, caps: dict | None = None) -> list[str]:
    """Cap the size options of ``args`` in place (unset ones too); the flags changed, for a note."""
    changed = []
    for dest, cap in {**SMALL, **(caps or {})}.items():
        if hasattr(args, dest) and (getattr(args, dest) is None or getattr(args, dest) > cap):
            setattr(args, dest, cap)
            changed.append(f"{_FLAGS.get(dest, '--' + dest.replace('_', '-'))} {cap}")
    return changed
