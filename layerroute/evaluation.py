"""Evaluate a task along routes: accuracy with a 95% CI, blocks per sample, tokens per second.

A policy with ``token_executor`` (per-token routers, ``routers/token_policy.py``) decides inside every
block instead: its executor runs the scoring, and ``mean_blocks`` is then the realised mean of
executed blocks per real token (``per_token``), not blocks per sample.

``evaluate`` returns an ``EvalResult``. Given a ``ResultsStore`` it appends one record per
sample as batches finish, skips samples the store already holds (a rerun resumes), and
``write_summary`` closes the run with its metrics.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

from tqdm.auto import tqdm

from .errors import LayerRouteError
from .executor import RouteExecutor
from .route import Route
from .scoring import SampleScore, encode_texts, left_pad, packing_is_exact, score_batch, task_prompts
from .store import ResultsStore


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0, 1 and small n)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95% interval of the difference of two proportions k1/n1 - k2/n2 (Newcombe's hybrid score
    interval from the two Wilson intervals; for paired samples it is conservative)."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_interval(k1, n1), wilson_interval(k2, n2)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def mean_interval(values, z: float = 1.959964) -> tuple[float, float, float]:
    """The mean of ``values`` and its 95% normal interval: (mean, low, high)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)


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
    per_token: bool = False  # mean_blocks: executed blocks per token (per-token decisions), not per sample

    def summary(self) -> str:
        acc = "n/a (log-likelihood task)" if self.accuracy is None else \
            f"{100 * self.accuracy:.1f}% (95% CI {100 * self.ci95[0]:.1f}-{100 * self.ci95[1]:.1f})"
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.blocks_histogram.items()))
        blocks = (f"  blocks/token    mean {self.mean_blocks:.2f} executed (per-token decisions, realised)\n"
                  if self.per_token else f"  blocks/sample   mean {self.mean_blocks:.2f}  (distribution {hist})\n")
        return (f"task {self.task}: n={self.n}\n  accuracy        {acc}\n"
                f"  gold NLL/token  {self.mean_gold_nll:.4f}\n{blocks}"
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
             limit: int | None = None, progress: bool = True, chat: bool = True,
             store: ResultsStore | None = None) -> EvalResult:
    """Score ``task`` along ``routes``: None (identity), one Route for all, a routing policy
    (anything with ``route_batch(executor, ids, mask)``), or a callable ``example -> Route``. Examples are batched by length; results keep task order.
    With ``store``, finished samples are appended as they come and samples already there are
    reused, not scored again (throughput then counts the new samples only).
    """
    examples = limit_examples(task.examples, limit)
    if not examples:
        raise LayerRouteError(f"task {task.name} has no examples to evaluate")
    token_executor = getattr(routes, "token_executor", None)
    if token_executor is not None:  # per-token routers decide inside the blocks of every walk
        if task.kind == "choice" and task.choice_scoring == "cloze":  # packing: checked on the plain model
            packing_is_exact(executor, tokenizer, task, examples, task_prompts(tokenizer, task, examples[:4], chat))
        executor = token_executor(executor)
    if routes is None or isinstance(routes, (str, Route)):
        fixed = executor.route(routes)
        routes_of = lambda batch: [fixed] * len(batch)  # noqa: E731
    elif hasattr(routes, "route_batch"):  # a RoutingPolicy: one batched call on the padded prompts
        def routes_of(batch):
            ids, mask = left_pad(encode_texts(tokenizer, task_prompts(tokenizer, task, batch, chat)), tokenizer,
                                 executor.device)
            return routes.route_batch(executor, ids, mask)
    else:
        routes_of = lambda batch: [routes(ex) for ex in batch]  # noqa: E731
    prior = sample_records(store) if store is not None else {}
    scores: list[SampleScore | None] = [prior.get(ex.uid) for ex in examples]
    order = sorted((i for i in range(len(examples)) if scores[i] is None), key=lambda i: len(examples[i].question))
    start, new_tokens = time.perf_counter(), 0
    with tqdm(total=len(order), desc=f"eval {task.name}", disable=not progress, unit="ex") as bar:
        for j in range(0, len(order), batch_size):
            idx = order[j:j + batch_size]
            batch = [examples[i] for i in idx]
            for i, s in zip(idx, score_batch(executor, tokenizer, task, batch, routes_of(batch), chat)):
                scores[i] = s
                new_tokens += s.tokens
                if store is not None:
                    store.append({"type": "sample", "key": s.uid, **asdict(s)})
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    judged = [s for s in scores if s.correct is not None]
    right = sum(s.correct for s in judged)
    return EvalResult(
        task=task.name, n=len(scores),
        accuracy=right / len(judged) if judged else None,
        ci95=wilson_interval(right, len(judged)) if judged else None,
        mean_gold_nll=sum(s.gold_nll for s in scores) / len(scores),
        mean_blocks=executor.executed_blocks() if token_executor else sum(s.blocks for s in scores) / len(scores),
        blocks_histogram={} if token_executor else dict(sorted(Counter(s.blocks for s in scores).items())),
        tokens_per_second=new_tokens / seconds if order else 0.0, seconds=seconds, samples=scores,
        per_token=token_executor is not None,
    )


def eval_header(executor: RouteExecutor, task, split: str, seed: int, settings: dict) -> dict:
    """The store header of an evaluation run: what defines its results."""
    from .runs import run_header

    return run_header("eval", executor, task, split, seed, settings)


def degenerate_warning(blocks: list[int], num_layers: int, share: float = 0.5) -> str | None:
    """A warning when a policy's routes are degenerate: more than ``share`` of the samples run at
    most a tenth of the blocks (at least 1), where any accuracy is that of a truncated model."""
    floor = max(1, num_layers // 10)
    few = sum(b <= floor for b in blocks)
    if not blocks or few <= share * len(blocks):
        return None
    return (f"degenerate policy: {few} of {len(blocks)} samples ({100 * few / len(blocks):.0f}%) run at most "
            f"{floor} of {num_layers} blocks (mean {sum(blocks) / len(blocks):.2f}); its routes barely use the model")


def policy_blocks(executor: RouteExecutor, tokenizer, task, policy, limit: int = 32, batch_size: int = 8,
                  chat: bool = True) -> list[int]:
    """The blocks a routing policy (``route_batch``) runs on each of the first ``limit`` examples of ``task``."""
    examples = list(task.examples)[:limit]
    blocks = []
    for j in range(0, len(examples), batch_size):
        batch = examples[j:j + batch_size]
        ids, mask = left_pad(encode_texts(tokenizer, task_prompts(tokenizer, task, batch, chat)), tokenizer,
                             executor.device)
        blocks += [r.cost for r in policy.route_batch(executor, ids, mask)]
    return blocks


def sample_records(store: ResultsStore) -> dict[str, SampleScore]:
    """The samples a store already holds, by uid (what a resumed evaluation skips)."""
    keys = {f.name for f in fields(SampleScore)}
    return {r["uid"]: SampleScore(**{k: v for k, v in r.items() if k in keys})
            for r in store.records if r.get("type") == "sample"}


def write_summary(store: ResultsStore, result: EvalResult, extra: dict | None = None) -> None:
    """Append the run's summary (its presence marks a finished run)."""
    store.append({"type": "summary", "metrics": result.metrics(), **(extra or {})})
