"""Cost of the exactness self-check that every ``RouteExecutor`` runs once per model.

    python -m layerroute.experiments.bench_self_check [--model smollm2-135m] [--repeats 7] [--threads 2]

Prints a markdown table: the self-check against a plain HF forward of the probe's size
(2 x 8 tokens), medians of interleaved runs, and a second executor on the same model (cached).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from layerroute import RouteExecutor, load_model, self_check
from layerroute.config import option, parse_config


@dataclass
class Args:
    model: str = option("smollm2-135m", "model name or path")
    dtype: str = option(None, "model dtype", type=str)
    repeats: int = option(7, "timing repeats")
    threads: int = option(torch.get_num_threads(), "torch threads")


def main() -> None:
    args = parse_config(Args, None, __doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype, check_supported=False)
    ex = RouteExecutor(model, verify=False)
    ids = torch.randint(1, 1000, (2, 8))
    check, forward = [], []
    for _ in range(args.repeats):
        check.append(self_check(ex, refresh=True).seconds)
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        forward.append(time.perf_counter() - start)
    start = time.perf_counter()
    RouteExecutor(model)
    cached = time.perf_counter() - start
    c, f = statistics.median(check), statistics.median(forward)
    print(f"{args.model}, {model.dtype}, {args.threads} threads, median of {args.repeats}\n")
    print("| what | ms |\n|---|---|")
    print(f"| self-check (HF forward 2x8, executor prefill 2x7 and one cached step) | {1000 * c:.1f} |")
    print(f"| plain HF forward, 2x8 tokens | {1000 * f:.1f} |")
    print(f"| self-check / forward | {c / f:.2f} |")
    print(f"| second RouteExecutor on the same model (cached check) | {1000 * cached:.2f} |")
    print(f"\n{self_check(ex).describe()}")


if __name__ == "__main__":
    main()
