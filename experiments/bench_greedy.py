"""Greedy removal with and without prefix reuse: the same order, block executions and wall time.

*Without* (before): every candidate route of a round runs from the embeddings
(``greedy_order(..., reuse_prefix=False)``). *With* (after, the default): the candidates of a
round share the blocks kept before them, so each runs only the rest. Both score the same
samples with the same ``Objective`` and must drop the same blocks. Writes ``OUT/bench_greedy.md``
(``--out``); the committed one::

    OMP_NUM_THREADS=1 python -m layerroute.experiments.bench_greedy --task gen --limit 16 --rounds 1 \
        --out experiments/results
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from dataclasses import asdict, dataclass

from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs, experiment_command
from layerroute.tables import write_report


@dataclass
class Args(ExperimentArgs):
    task: str = option("gen", "task spec")
    limit: int = option(16, "search-split samples")
    rounds: int = option(1, "removal rounds (blocks dropped)")
    batch_rows: int = option(64, "token rows per executor call")
    threads: int = option(1, "torch threads")


def main(argv=None) -> None:

    from layerroute.objective import Objective
    from layerroute.search.baselines import greedy_cost, greedy_order
    from layerroute.tasks import get_task

    args = parse_config(Args, argv, __doc__.splitlines()[0])
    ex, tok = args.executor(args.threads)
    task = get_task(args.task)
    rows = {}
    for name, reuse in (("from the embeddings (before)", False), ("prefix reuse (after)", True)):
        obj = Objective.from_task(ex, tok, task, "search", args.limit, 0, batch_rows=args.batch_rows)
        start = time.perf_counter()
        order = greedy_order(obj, ex.num_layers - args.rounds, reuse_prefix=reuse)
        rows[name] = (order, greedy_cost(obj), time.perf_counter() - start)
    (before, cb, tb), (after, ca, ta) = rows.values()
    command = experiment_command("bench_greedy", argv)
    lines = ["# Greedy removal with and without prefix reuse (SmolLM2-135M-Instruct, CPU)", "",
             f"Command: `{command}`", "",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.threads} torch thread(s) on a 2-core "
             f"machine shared with other jobs, so wall times are rough. Task {task.name}, the first {args.limit} "
             f"search-split samples, {args.rounds} round(s).", "",
             "| candidate scoring | blocks dropped | per-sample block executions | per-sample finishes | wall (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {order} | {c['sample_blocks']:,} | {c['sample_finishes']:,} | {t:.1f} |"
              for name, (order, c, t) in rows.items()]
    lines += ["", f"Same order: {'yes' if before == after else 'NO'}. Prefix reuse runs "
                  f"{cb['sample_blocks'] / ca['sample_blocks']:.2f}x fewer block executions and takes "
                  f"{tb / ta:.2f}x less wall time; the finishes (LM head and scoring, one per candidate and sample) "
                  f"are the same either way."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.path("bench_greedy.md"), text, {"args": asdict(args), "rows": [
        {"scoring": name, "order": order, "cost": c, "seconds": t} for name, (order, c, t) in rows.items()]}, command)


if __name__ == "__main__":
    main()
