"""Evaluate a task along routes: accuracy with a 95% CI, blocks per sample, tokens per second.

``evaluate`` returns an ``EvalResult``; ``write_run`` saves ``results.json`` (every setting
needed to reproduce it) and ``samples.jsonl`` (one line per sample) into an output dir,
refusing a dir that already holds a run unless told to overwrite.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import LayerRouteError
from .executor import RouteExecutor
from .route import Route
from .scoring import SampleScore, score_batch


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0, 1 and small n)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalResult:
    task: str
    n: int
    accuracy: float | None
    ci95: tuple[float, float] | None
    mean_gold_nll: float
    mean_blocks: float
    blocks_histogram: dict[int, int]
    tokens_per_second: float
    seconds: float
    samples: list[SampleScore] = field(repr=False)

    def summary(self) -> str:
        acc = "n/a (log-likelihood task)" if self.accuracy is None else \
            f"{100 * self.accuracy:.1f}% (95% CI {100 * self.ci95[0]:.1f}-{100 * self.ci95[1]:.1f})"
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.blocks_histogram.items()))
        return (f"task {self.task}: n={self.n}\n  accuracy        {acc}\n"
                f"  gold NLL/token  {self.mean_gold_nll:.4f}\n"
                f"  blocks/sample   mean {self.mean_blocks:.2f}  (distribution {hist})\n"
                f"  throughput      {self.tokens_per_second:.0f} tokens/s ({self.seconds:.1f} s)")

    def metrics(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


def limit_examples(examples, limit: int | None, option: str = "--limit"):
    """The first ``limit`` examples; a limit beyond the data warns and keeps them all."""
    if limit is None:
        return list(examples)
    if limit > len(examples):
        warnings.warn(f"{option} {limit} is larger than the {len(examples)} examples available; using all of them",
                      stacklevel=2)
    return list(examples)[:limit]


def evaluate(executor: RouteExecutor, tokenizer, task, routes=None, *, batch_size: int = 8,
             limit: int | None = None, progress: bool = True, chat: bool = True) -> EvalResult:
    """Score ``task`` along ``routes``: None (identity), one Route for all, or a callable
    ``example -> Route`` (a router). Examples are batched by length; results keep task order.
    """
    examples = limit_examples(task.examples, limit)
    if not examples:
        raise LayerRouteError(f"task {task.name} has no examples to evaluate")
    if routes is None or isinstance(routes, (str, Route)):
        fixed = executor.route(routes)
        route_of = lambda ex: fixed  # noqa: E731
    else:
        route_of = routes
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].question))
    scores: list[SampleScore | None] = [None] * len(examples)
    start = time.perf_counter()
    with tqdm(total=len(examples), desc=f"eval {task.name}", disable=not progress, unit="ex") as bar:
        for j in range(0, len(order), batch_size):
            idx = order[j:j + batch_size]
            batch = [examples[i] for i in idx]
            for i, s in zip(idx, score_batch(executor, tokenizer, task, batch, [route_of(e) for e in batch], chat)):
                scores[i] = s
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    judged = [s for s in scores if s.correct is not None]
    right = sum(s.correct for s in judged)
    return EvalResult(
        task=task.name, n=len(scores),
        accuracy=right / len(judged) if judged else None,
        ci95=wilson_interval(right, len(judged)) if judged else None,
        mean_gold_nll=sum(s.gold_nll for s in scores) / len(scores),
        mean_blocks=sum(s.blocks for s in scores) / len(scores),
        blocks_histogram=dict(sorted(Counter(s.blocks for s in scores).items())),
        tokens_per_second=sum(s.tokens for s in scores) / seconds, seconds=seconds, samples=scores,
    )


def environment() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"layerroute": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def prepare_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create ``path``; refuse one that already holds a run unless ``overwrite``."""
    out = Path(path)
    existing = [n for n in ("results.json", "samples.jsonl") if (out / n).exists()]
    if existing and not overwrite:
        raise LayerRouteError(f"{out} already holds a run ({', '.join(existing)}); choose another --output "
                              f"or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def atomic_write(path: Path, text: str) -> None:
    """Write ``path`` via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run(out: Path, settings: dict, result: EvalResult, extra: dict | None = None) -> None:
    """Write samples.jsonl, then results.json (its presence marks a finished run)."""
    atomic_write(out / "samples.jsonl", "".join(json.dumps(asdict(s)) + "\n" for s in result.samples))
    payload = {"settings": settings, "environment": environment(), "metrics": result.metrics(), **(extra or {})}
    atomic_write(out / "results.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
