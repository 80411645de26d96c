"""Ray scaling benchmark: samples per minute of a per-sample search with 1 and 2 workers.

    python -m layerroute.experiments.bench_ray [--samples 48] [--simulations 16] [--configs 1x1,2x1,1x2]

Each config ``WxT`` starts a fresh local Ray (``num_cpus = W * T``) and runs the same search
(MCTS on the search split of ``--task`` by default; ``--searcher random_search --trials N`` for
a per-task searcher) through ``RaySearch``, the driver of ``layerroute search --workers``, on
``W`` actors of ``T`` torch threads each. Start-up (``ray.init``, actor processes, the model
load in each actor) is timed inside the job; the job must be long enough that it is under 10%.
Reported: samples per minute over the whole job, start-up included, and after the first
finished chunk (steady state); the speedup against ``1x1`` (target: 2x1 at least 1.8x); the
machine's load average around each run; and whether every config found the same records
(searchers are deterministic per sample). Writes ``OUT/bench_ray.md`` (``--out``; the committed one:
``--out experiments/results``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs
from layerroute.search.distributed import RaySearch, SearchSpec
from layerroute.tables import write_report

TIMING = ("seconds", "peak_cache_bytes")  # fields that depend on the machine, not on the search


def run_config(spec: SearchSpec, searcher, keys: list[str], workers: int, threads: int, chunk: int) -> dict:
    import ray

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    ray.init(num_cpus=workers * threads, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t_init = time.perf_counter() - t0
    stamps, records = [], []
    try:
        for record in RaySearch(spec, searcher, workers, threads=threads, chunk_size=chunk).search(keys):
            stamps.append(time.perf_counter() - t0)
            records.append(record)
    finally:
        ray.shutdown()
    total = time.perf_counter() - t0
    chunks = stamps[::chunk]  # when each chunk came back (its records arrive together)
    first = chunks[0]
    # one actor's time per chunk, from the steady rate of chunk completions (W actors in parallel)
    chunk_s = workers * (chunks[-1] - first) / max(1, len(chunks) - 1)
    startup = max(t_init, first - chunk_s)
    n = len(records)
    return {"config": f"{workers}x{threads}", "workers": workers, "threads": threads, "init": t_init,
            "first": first, "total": total, "startup": startup, "per_min": 60 * n / total,
            "steady_per_min": 60 * (n - chunk) / max(1e-9, total - first), "chunk_times": chunks,
            "load": (load0, os.getloadavg()[0]),
            "records": sorted(({k: v for k, v in r.items() if k not in TIMING} for r in records),
                              key=lambda r: r["key"])}


def table(rows: list[dict], samples: int) -> str:
    base = rows[0]["per_min"]
    lines = ["| workers x threads | ray.init (s) | first chunk (s) | start-up est. (s) | job (s) | start-up share "
             "| units/min (job) | units/min (steady) | speedup vs first row | load avg 1 min (before -> after) "
             "| same records as first row |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} x {r['threads']} | {r['init']:.1f} | {r['first']:.1f} | {r['startup']:.1f} | "
                     f"{r['total']:.1f} | {100 * r['startup'] / r['total']:.1f}% | {r['per_min']:.2f} | "
                     f"{r['steady_per_min']:.2f} | {r['per_min'] / base:.2f}x | {r['load'][0]:.1f} -> "
                     f"{r['load'][1]:.1f} | {'yes' if r['records'] == rows[0]['records'] else 'NO'} |")
    return "\n".join(lines) + f"\n\n{samples} units per run (mcts: samples; random_search: trials); machine: {os.cpu_count()} CPUs."


@dataclass
class Args(ExperimentArgs):
    task: str = option("gen", "task spec")
    searcher: str = option("mcts", "searcher", choices=["mcts", "random_search"])
    samples: int = option(48, "search-split samples (mcts: the units)")
    simulations: int = option(16, "mcts simulations per sample")
    trials: int = option(24, "random_search trials (its units)")
    chunk_size: int = option(4, "units per actor call (mcts: samples in lockstep)")
    configs: str = option("1x1,2x1,1x2", "comma-separated WORKERSxTHREADS")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])

    if args.searcher == "mcts":
        config = {"simulations": args.simulations, "lockstep": args.chunk_size}
    else:
        config = {"trials": args.trials}
    spec = SearchSpec(searcher=args.searcher, task=args.task, config=config, model=args.model, limit=args.samples,
                      task_options={"seed": 0}, objective={"lam": 1.0})
    searcher = spec.build()  # the driver's copy, for units(); not timed
    keys = searcher.units()
    rows = []
    for c in args.configs.split(","):
        workers, threads = map(int, c.split("x"))
        rows.append(run_config(spec, searcher, keys, workers, threads, args.chunk_size))
        print(table(rows, len(keys)), flush=True)
    unit = f"{args.simulations} simulations each" if args.searcher == "mcts" else f"{args.trials} trials as units"
    text = (f"# Ray scaling: {args.searcher} on {args.model}, task {args.task} (search split), {unit}\n\n"
            f"```\npython -m layerroute.experiments.bench_ray --model {args.model} --task {args.task} "
            f"--searcher {args.searcher} --samples {args.samples} --simulations {args.simulations} "
            f"--trials {args.trials} --chunk-size {args.chunk_size} --configs {args.configs} --out {args.out}\n```\n\n"
            + table(rows, len(keys)) + "\n\nChunk completion times (s after the run started):\n\n"
            + "".join(f"- {r['config']}: {', '.join(f'{t:.0f}' for t in r['chunk_times'])}\n" for r in rows))
    out = args.path("bench_ray.md")
    write_report(out, text, {"args": asdict(args)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
