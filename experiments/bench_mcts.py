"""MCTS cost benchmark: prefix reuse + lockstep against the naive reference (one route at a time).

    OMP_NUM_THREADS=1 python -m layerroute.experiments.bench_mcts [--samples 16] [--simulations 50]

Both modes search the same samples (search split of ``--task``) with the same seed, so they make
the same tree decisions; the naive one re-runs every simulation's route from the embeddings with
``objective.score``. Prints a markdown table and writes ``experiments/results/bench_mcts.md``.
Targets (issue 12): at most 1/2 of naive's block executions and 1/3 of its wall time, the same
best route on at least 95% of samples. MCTS reads labels: its routes are an ORACLE.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from layerroute import RouteExecutor, load_model
from layerroute.objective import Objective
from layerroute.search.mcts import MCTS, MCTSConfig
from layerroute.tasks import get_task


def run(obj: Objective, config: MCTSConfig, seed: int) -> tuple[list[dict], float]:
    keys = [ex.uid for ex in obj.examples]
    t, c = time.perf_counter(), time.process_time()
    records = list(MCTS(obj, config, seed).search(keys))
    return records, time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="gen")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--simulations", type=int, default=50)
    p.add_argument("--space", default="edit")
    p.add_argument("--leaves-per-sample", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_mcts.md"))
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    obj = Objective.from_task(RouteExecutor(model), tok, get_task(args.task), "search", args.samples, args.seed)
    common = dict(simulations=args.simulations, space=args.space, leaves_per_sample=args.leaves_per_sample)
    fast, t_fast, c_fast = run(obj, MCTSConfig(lockstep=args.samples, **common), args.seed)
    naive, t_naive, c_naive = run(obj, MCTSConfig(naive=True, **common), args.seed)
    n, sims = len(fast), sum(r["simulations"] for r in fast)
    ex_fast, ex_naive = sum(r["block_executions"] for r in fast), sum(r["block_executions"] for r in naive)
    same = sum(a["layers"] == b["layers"] for a, b in zip(fast, naive))
    dr = max(abs(a["reward"] - b["reward"]) for a, b in zip(fast, naive))
    unique = sum(r["routes_scored"] for r in fast) / sims
    rows = [
        f"# MCTS search cost: prefix reuse + lockstep against naive ({args.model}, {args.task} search split)",
        "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python -m layerroute.experiments.bench_mcts "
        f"--samples {args.samples} --simulations {args.simulations} --space {args.space} "
        f"--leaves-per-sample {args.leaves_per_sample}` ({n} samples, {args.simulations} simulations each, "
        f"torch threads {torch.get_num_threads()}, shared 2-core CPU). MCTS reads labels: an ORACLE.",
        "",
        "| mode | block executions / simulation (blocks x tokens) | wall s / sample | CPU s / sample | peak cache MiB |",
        "|---|---|---|---|---|",
        f"| prefix reuse, {n} in lockstep | {ex_fast / sims:,.0f} | {t_fast / n:.2f} | {c_fast / n:.2f} | "
        f"{max(r['peak_cache_bytes'] for r in fast) / 2 ** 20:.1f} |",
        f"| naive (every route, one at a time) | {ex_naive / sims:,.0f} | {t_naive / n:.2f} | {c_naive / n:.2f} | 0 |",
        "",
        f"- block executions: {ex_fast / ex_naive:.3f} of naive (target <= 0.5)",
        f"- wall time: {t_fast / t_naive:.3f} of naive (target <= 0.333); CPU time {c_fast / c_naive:.3f} of naive",
        f"- same best route: {same}/{n} = {same / n:.0%} (target >= 95%); largest best-reward difference {dr:.2e}",
        f"- distinct routes scored per simulation: {unique:.2f} (the rest were scored before: free in prefix mode)",
    ]
    text = "\n".join(rows) + "\n"
    print(text)
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
