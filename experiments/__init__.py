"""Reproducible runs, benchmarks, results tables and plots. Run a module with ``python -m layerroute.experiments.NAME``.

Every script's ``Args`` extends ``ExperimentArgs``: ``--model``, and ``--out``, the folder its result files go
to: ``runs/experiments`` below the current folder unless named, so a run never overwrites the committed tables
by accident. The committed tables are regenerated with ``--out experiments/results`` (from the repository root).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from layerroute.config import option

# The committed tables: inputs of some scripts (label stores, static routes), never a default --out.
RESULTS = Path(__file__).resolve().parent / "results"
OUT = "runs/experiments"


@dataclass
class ExperimentArgs:
    """What every experiment script takes; a script's own ``Args`` adds its fields."""

    model: str = option("smollm2-135m", "model name or path")
    out: str = option(OUT, "folder the result files are written to (the committed tables: experiments/results)")

    def path(self, name: str) -> Path:
        """``OUT/name``: where a result file of this run goes (its folder is made if missing)."""
        path = Path(self.out) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def executor(self, threads: int | None = None):
        """``(RouteExecutor, tokenizer)`` of ``--model``, torch set to ``threads`` threads first when given."""
        import torch

        from layerroute import RouteExecutor, load_model

        if threads:
            torch.set_num_threads(threads)
        model, tok = load_model(self.model)
        return RouteExecutor(model), tok

    def require_positive(self, *names: str, error=ValueError) -> None:
        """Raise ``error("--flag must be at least 1")`` for the first of ``names`` below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise error(f"--{name.replace('_', '-')} must be at least 1")


@dataclass
class SeededArgs(ExperimentArgs):
    """``ExperimentArgs`` with the seed of the splits and searches and the torch threads."""

    seed: int = option(0, "random seed (the splits, searches and training)")
    threads: int = option(1, "torch threads")


def experiment_command(name: str, argv: list[str] | None = None, threads: int | None = 1) -> str:
    """The command line of experiment ``name`` as a user would type it:
    ``OMP_NUM_THREADS=T python -m layerroute.experiments.NAME ARGS`` (no prefix when ``threads`` is None)."""
    words = sys.argv[1:] if argv is None else argv
    head = "" if threads is None else f"OMP_NUM_THREADS={threads} "
    return " ".join([f"{head}python -m layerroute.experiments.{name}", *map(shlex.quote, words)])
