"""MCTS cost benchmark: prefix reuse + lockstep against the naive reference, and against Dr.LLM's way.

    OMP_NUM_THREADS=1 python -m layerroute.experiments.bench_mcts [--samples 16] [--simulations 64]

Both of our modes search the same samples (search split of ``--task``) with the same seed, so
they make the same tree decisions; the naive one re-runs every simulation's route from the
embeddings with ``objective.score``. They run twice: with the edit space's early stops (the
default search) and without them (every simulation runs, so the cost of the edits themselves
shows). Dr.LLM's own evaluation of a path, measured on the same samples: the HF model's layer
list swapped to the path, then ``generate`` for 10 new tokens at batch 1 (skip-only paths, for
which HF's cache stays valid, so the comparison is fair). Prints a markdown table and writes
``OUT/bench_mcts.md`` (``--out``; the committed one: ``--out experiments/results``). Targets (issue 18): at most 1/3 of naive's block
executions, the same best route on at least 95% of samples, and a simulation at least 10x
cheaper than Dr.LLM's evaluation of a path. MCTS reads labels: its routes are an ORACLE.
"""

from __future__ import annotations

import datetime
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from layerroute import RouteExecutor, load_model
from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs, experiment_command
from layerroute.objective import Objective
from layerroute.search.mcts import MCTS, MCTSConfig
from layerroute.tables import write_report
from layerroute.tasks import get_task


def run(obj: Objective, config: MCTSConfig, seed: int):
    keys = [ex.uid for ex in obj.examples]
    t, c = time.perf_counter(), time.process_time()
    records = list(MCTS(obj, config, seed).search(keys))
    return records, time.perf_counter() - t, time.process_time() - c


def drllm_seconds(model, tok, obj: Objective, paths_per_sample: int, seed: int) -> list[float]:
    """Seconds per path of Dr.LLM's evaluation: swap ``model.model.layers`` to the path, generate 10
    tokens at batch 1 (random skip-1 or skip-2 edits of the full route, which keep HF's cache valid);
    (wall, CPU) seconds per path."""
    layers, L, rng, out = model.model.layers, obj.num_layers, random.Random(seed), []
    try:
        for prompt in obj.prompts:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
            for _ in range(paths_per_sample):
                p, k = rng.randrange(L - 1), rng.choice((1, 2))
                path = [b for b in range(L) if not p <= b < p + k]
                model.model.layers = torch.nn.ModuleList([layers[b] for b in path])
                t, c = time.perf_counter(), time.process_time()
                model.generate(**ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                               pad_token_id=tok.eos_token_id)
                out.append((time.perf_counter() - t, time.process_time() - c))
    finally:
        model.model.layers = layers
    return out


def row(name, records, wall, cpu, n) -> tuple[str, int, int]:
    sims = sum(r["simulations"] for r in records)
    execs = sum(r["block_executions"] for r in records)
    peak = max(r["peak_cache_bytes"] for r in records) / 2 ** 20
    return (f"| {name} | {sims / n:.1f} | {execs / sims:,.0f} | {wall / n:.2f} | {1000 * wall / sims:.0f} | "
            f"{cpu / n:.2f} | {peak:.1f} |"), sims, execs


@dataclass
class Args(ExperimentArgs):
    task: str = option("gen", "task spec")
    samples: int = option(16, "search-split samples")
    simulations: int = option(64, "MCTS simulations per sample")
    space: str = option("edit", "MCTS search space")
    leaves_per_sample: int = option(1, "MCTS leaves expanded per sample per wave")
    drllm_paths: int = option(2, "Dr.LLM-way paths timed per sample (0: none)")
    stops_only: bool = option(False, "skip the run with early stops off")
    seed: int = option(0, "seed of the splits and searches")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    model, tok = load_model(args.model)
    obj = Objective.from_task(RouteExecutor(model), tok, get_task(args.task), "search", args.samples, args.seed)
    n, threads = len(obj), torch.get_num_threads()
    command = experiment_command("bench_mcts", argv, threads)
    rows = [f"# MCTS search cost ({args.model}, {args.task} search split, {args.space} space)", "",
            f"Command: `{command}` ({datetime.date.today()}; {n} samples, at most "
            f"{args.simulations} simulations each, torch threads {threads}, shared 2-core CPU). "
            f"MCTS reads labels: an ORACLE.", "",
            "| mode | simulations / sample | block executions / simulation (blocks x tokens) | wall s / sample | "
            "wall ms / simulation | CPU s / sample | peak cache MiB |", "|---|---|---|---|---|---|---|"]
    notes, per_sim = [], None
    runs = [("early stops on (default)", {}), ("early stops off", dict(beat_margin=-1.0, stop_shorter=0))]
    for label, stops in runs[:1] if args.stops_only else runs:
        common = dict(simulations=args.simulations, space=args.space, leaves_per_sample=args.leaves_per_sample, **stops)
        fast, t_fast, c_fast = run(obj, MCTSConfig(lockstep=args.samples, **common), args.seed)
        naive, t_naive, c_naive = run(obj, MCTSConfig(naive=True, **common), args.seed)
        line, sims, ex_fast = row(f"{label}: prefix reuse, {n} in lockstep", fast, t_fast, c_fast, n)
        rows.append(line)
        line, _, ex_naive = row(f"{label}: naive (every route from the embeddings, one at a time)", naive, t_naive,
                                c_naive, n)
        rows.append(line)
        per_sim = per_sim or (t_fast / sims, c_fast / sims)
        same = sum(a["layers"] == b["layers"] for a, b in zip(fast, naive))
        dr = max(abs(a["reward"] - b["reward"]) for a, b in zip(fast, naive))
        notes += [f"- {label}: block executions {ex_fast / ex_naive:.3f} of naive (target <= 0.333); wall time "
                  f"{t_fast / t_naive:.3f} of naive; same best route {same}/{n} = {same / n:.0%} (target >= 95%), "
                  f"largest best-reward difference {dr:.2e}; stopped early: "
                  f"{sum(bool(r['stopped']) for r in fast)}/{n}"]
    if args.drllm_paths:
        secs = drllm_seconds(model, tok, obj, args.drllm_paths, args.seed)
        wall, cpu = (statistics.median(x) for x in zip(*secs))
        notes.append(f"- Dr.LLM's way (layer list swapped, HF `generate` of 10 tokens at batch 1), {len(secs)} "
                     f"skip-only paths on the same samples: median {wall:.3f} s wall, {cpu:.3f} s CPU per path; "
                     f"ours, with early stops: {per_sim[0]:.3f} s wall, {per_sim[1]:.3f} s CPU per simulation: "
                     f"{wall / per_sim[0]:.1f}x cheaper in wall time, {cpu / per_sim[1]:.1f}x in CPU time "
                     f"(target >= 10x; CPU time is the fairer figure on a shared machine)")
    text = "\n".join(rows + [""] + notes) + "\n"
    print(text)
    write_report(args.path("bench_mcts.md"), text, {"args": asdict(args), "table": rows[4:], "notes": notes}, command)


if __name__ == "__main__":
    main()
