"""The task registry: ``get_task("mmlu:astronomy")`` finds factory ``mmlu`` and calls it.

A spec is ``name`` or ``name:argument`` (split at the first colon). The factory is called as
``factory(**options)`` or ``factory(argument, **options)``. The option ``seed`` may be passed to
every task: factories without a ``seed`` parameter (fixed data) simply do not receive it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from ..registry import Registry
from .base import Task, TaskError
from .generated import SUBTASKS as GENERATED_SUBTASKS
from .generated import load_generated
from .loaders import (DATA_FORMATS, load_aime2025, load_csv, load_gpqa, load_gsm8k, load_hf, load_jsonl, load_mmlu,
                      load_parquet)
from .suite import SUBTASKS, load_suite

_FACTORIES: Registry = Registry("task", TaskError)  # name -> Callable[..., Task]
_USAGE: dict[str, str] = {}


def register_task(name: str, factory: Callable[..., Task], usage: str = "") -> None:
    """Register ``factory`` under ``name``; ``usage`` shows its spec forms in error messages."""
    if not name or ":" in name:
        raise TaskError(f"task name {name!r} must be non-empty and contain no ':'")
    _FACTORIES.add(name, factory)
    _USAGE[name] = usage or name


def list_tasks(usage: bool = False) -> list[str]:
    """The registered task names (or, with ``usage``, their spec forms such as ``mmlu[:<subject>]``)."""
    return sorted(_USAGE.values() if usage else _FACTORIES)


def get_task(spec: str, **options) -> Task:
    """The task that ``spec`` names, e.g. ``mmlu``, ``mmlu:astronomy``, ``suite:capitals``,
    ``jsonl:data.jsonl`` (options ``fields``, ``kind``, ...) or ``hf:gsm8k:main:test``."""
    name, colon, arg = spec.strip().partition(":")
    if name not in _FACTORIES:
        data = Path(arg if colon else spec.strip()).expanduser()
        if data.is_file():  # a data file named without a known format (data.xlsx, xlsx:data.xlsx)
            fmt = DATA_FORMATS.get(data.suffix.lower())
            raise TaskError(f"{spec!r} names a data file without its format; read it as jsonl:PATH, csv:PATH or "
                            f"parquet:PATH" + (f" (here {fmt}:{data})" if fmt else
                                               f"; {data.suffix or 'this'} files are not read: export to one of these"))
        raise TaskError(f"unknown task {spec!r}; available: {', '.join(list_tasks(usage=True))}")
    if colon and not arg:
        raise TaskError(f"task spec {spec!r} has nothing after ':'; usage: {_USAGE[name]}")
    factory = _FACTORIES[name]
    signature = inspect.signature(factory)
    params = signature.parameters
    if "seed" in options and "seed" not in params and \
            not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k != "seed"}
    args = (arg,) if colon else ()
    try:
        signature.bind(*args, **options)
    except TypeError as e:
        raise TaskError(f"task {spec!r} with options {sorted(options)}: {e}; usage: {_USAGE[name]}, "
                        f"parameters: {', '.join(params) or 'none'}") from None
    task = factory(*args, **options)
    if not isinstance(task, Task):
        raise TaskError(f"the factory of task {name!r} returned {type(task).__name__}, not a Task")
    return task


register_task("mmlu", load_mmlu, "mmlu[:<subject>]")
register_task("gsm8k", load_gsm8k)
register_task("gpqa", load_gpqa)
register_task("aime2025", load_aime2025)
register_task("jsonl", load_jsonl, "jsonl:<path>")
register_task("csv", load_csv, "csv:<path>")
register_task("parquet", load_parquet, "parquet:<path>")
register_task("hf", load_hf, "hf:<dataset>[:<config>]:<split>")
register_task("suite", load_suite, f"suite[:{'|'.join(SUBTASKS)}]")
register_task("gen", load_generated, f"gen[:{'|'.join(GENERATED_SUBTASKS)}]")
