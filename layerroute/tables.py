"""Result tables: one way to write a share with its 95% CI, a markdown row, and a result file pair.

Every table in ``experiments/results/`` is written by one command (``python -m
layerroute.experiments.NAME``) through ``write_result``: ``NAME.md`` and ``NAME.json`` side by side,
both headed by the command that made them and the date (``stamp``).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

from .evaluation import wilson_interval
from .store import atomic_write, atomic_write_json


def pct(x: float | None, digits: int = 1) -> str:
    """``0.447`` -> ``"44.7%"``; ``"n/a"`` for None."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def ci(ci95, digits: int = 1) -> str:
    """A 95% interval of a share as ``"39.1-50.4"`` (percent); ``""`` for None."""
    return "" if ci95 is None else f"{100 * ci95[0]:.{digits}f}-{100 * ci95[1]:.{digits}f}"


def acc_ci(accuracy: float | None, ci95) -> str:
    """``"44.7% (39.1-50.4)"``: an accuracy and its 95% CI; ``"n/a"`` without an accuracy."""
    return "n/a" if accuracy is None else f"{pct(accuracy)} ({ci(ci95)})"


def share(k: int, n: int, with_n: bool = True) -> str:
    """``k`` of ``n`` with its 95% Wilson interval: ``"44.7% (39.1-50.4), n=300"``."""
    if not n:
        return "n/a (no samples)"
    text = acc_ci(k / n, wilson_interval(k, n))
    return f"{text}, n={n}" if with_n else text


def error_bars(values, cis) -> list[list[float]]:
    """Matplotlib ``yerr`` in percent for shares ``values`` with 95% CIs ``cis``: the distances below and
    above, never negative (a Wilson bound can round a hair inside a share of 0 or 1)."""
    return [[max(0.0, 100 * (v - c[0])) for v, c in zip(values, cis)],
            [max(0.0, 100 * (c[1] - v)) for v, c in zip(values, cis)]]


def row(*cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header, rows) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row (a row is a list of cells)."""
    return [row(*header), "|" + "---|" * len(header), *(row(*r) for r in rows)]


def command_line(argv: list[str] | None = None, module: str | None = None) -> str:
    """The command that is running, as a user would type it (``python -m MODULE ARGS``)."""
    argv = sys.argv if argv is None else argv
    main = sys.modules.get("__main__")
    module = module or getattr(getattr(main, "__spec__", None), "name", None)
    head = ["python", "-m", module] if module else ["python", *argv[:1]]
    return " ".join(shlex.quote(a) for a in head + list(argv[1:]))


def stamp(command: str | None = None) -> dict:
    """What heads every result file: the command that made it and the date (UTC)."""
    return {"command": command or command_line(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def write_result(stem: str | Path, title: str, lines: list[str], data: dict, command: str | None = None) -> dict:
    """Write ``STEM.md`` (``# title``, the command and date, then ``lines``) and ``STEM.json`` (``command``,
    ``date`` and ``data``), each atomically; returns the stamp."""
    stem, head = Path(stem), stamp(command)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", f"Command: `{head['command']}` ({head['date']})", "", *lines]
    atomic_write(stem.with_suffix(".md"), "\n".join(md).rstrip("\n") + "\n")
    atomic_write_json(stem.with_suffix(".json"), {**head, **data}, indent=1, sort_keys=False, default=str)
    return head


def write_report(path: str | Path, text: str, data: dict | None = None, command: str | None = None) -> dict:
    """Write a finished markdown report ``path`` and its JSON twin (``command``, ``date`` and ``data``), each
    atomically. A report that does not already show its command gets the command and the date under its
    title line; returns the stamp."""
    path, head = Path(path), stamp(command)
    if head["command"] not in text:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\nCommand: `{head['command']}` ({head['date']})\n{rest}"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text if text.endswith("\n") else text + "\n")
    atomic_write_json(path.with_suffix(".json"), {**head, **(data or {})}, indent=1, sort_keys=False, default=str)
    return head
