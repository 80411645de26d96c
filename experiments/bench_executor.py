"""Executor benchmark: overhead of the identity route, and realized vs ideal prefill speedup.

    python -m layerroute.experiments.bench_executor [--model smollm2-135m] [--repeats 15] [--out experiments/results]

Prints markdown tables and writes them to ``OUT/bench_executor.md`` (``--out``; the committed one:
``--out experiments/results``).
Timings interleave the compared calls and report medians, so drift hits both alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from layerroute import RouteExecutor, load_model
from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs
from layerroute.tables import write_report


def _median_times(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead_table(model, ex: RouteExecutor, repeats: int, tokens: int = 128) -> list[str]:
    rows = ["| batch | logits | HF forward (s) | identity route (s) | overhead |", "|---|---|---|---|---|"]
    for batch in (1, 8):
        ids = torch.randint(100, 40000, (batch, tokens), generator=torch.Generator().manual_seed(batch))
        for keep, label in ((1, "last position"), (0, "all positions")):
            with torch.no_grad():
                t = _median_times({
                    "hf": lambda: model(input_ids=ids, logits_to_keep=keep, use_cache=False),
                    "ours": lambda: ex(ids, logits_to_keep=keep),
                }, repeats)
            rows.append(f"| {batch} | {label} | {t['hf']:.4f} | {t['ours']:.4f} | {100 * (t['ours'] / t['hf'] - 1):+.1f}% |")
    return rows


def speedup_table(ex: RouteExecutor, repeats: int, batch: int = 8, tokens: int = 128) -> list[str]:
    L = ex.num_layers
    ids = torch.randint(100, 40000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    rows = ["| blocks run (k of L) | logits | time (s) | realized speedup | ideal L/k | realized / ideal |",
            "|---|---|---|---|---|---|"]
    for keep, label in ((1, "last position"), (0, "all positions")):
        routes = {k: ex.route(f"skip:{k}-{L - 1}") if k < L else ex.route() for k in (L, 25, 20, 15, 10)}
        t = _median_times({k: (lambda r=r: ex(ids, routes=r, logits_to_keep=keep)) for k, r in routes.items()},
                          repeats)
        for k in routes:
            realized, ideal = t[L] / t[k], L / k
            rows.append(f"| {k} of {L} | {label} | {t[k]:.4f} | {realized:.2f}x | {ideal:.2f}x | {realized / ideal:.2f} |")
    # Per-sample routes: every sample skips its own window of L/3 blocks, so steps run on row subsets.
    k = L - L // 3
    mixed = [ex.route(f"skip:{s}-{s + L // 3 - 1}") for s in (i * (L - L // 3) // (batch - 1) for i in range(batch))]
    t = _median_times({"full": lambda: ex(ids, logits_to_keep=1),
                       "mixed": lambda: ex(ids, routes=mixed, logits_to_keep=1)}, repeats)
    realized = t["full"] / t["mixed"]
    rows.append(f"| {k} of {L}, a different window per sample | last position | {t['mixed']:.4f} | {realized:.2f}x "
                f"| {L / k:.2f}x | {realized / (L / k):.2f} |")
    return rows


@dataclass
class Args(ExperimentArgs):
    repeats: int = option(15, "timing repeats")
    threads: int = option(2, "torch threads")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    ex = RouteExecutor(model)
    header = (f"# Executor benchmark\n\n`python -m layerroute.experiments.bench_executor --model {args.model} "
              f"--repeats {args.repeats} --threads {args.threads} --out {args.out}`; {torch.get_num_threads()} torch "
              f"threads, {next(model.parameters()).dtype}, 128-token prompts, median of {args.repeats}.\n")
    parts = [header, "## Identity route against the plain HF forward\n", *overhead_table(model, ex, args.repeats),
             "", "## Prefill speedup of a route that runs k of L blocks (batch 8; skipped blocks are the last L-k)\n",
             *speedup_table(ex, args.repeats)]
    text = "\n".join(parts) + "\n"
    print(text)
    write_report(args.path("bench_executor.md"), text, {"args": asdict(args)})


if __name__ == "__main__":
    main()
