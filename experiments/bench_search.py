"""Search scoring before and after the shared objective: the greedy baseline and one Optuna trial.

*Before* is the old one-route-per-call scoring (``Calibration.loss`` before commit 7b46de2): for
every route, ``layerroute.scoring.gold_nll_per_token`` over batches of ``--batch-size`` examples,
re-tokenizing the prompts and golds on every call, one full pass per route. *After* is the
batched ``Objective`` (tokenized once, ``--batch-rows`` rows per call): greedy reuses the state
after the kept blocks below each candidate (``greedy_order``), and the Optuna trial is
``OptunaSearch._score`` (chunked, unpruned). Both see the same examples and the same routes;
to score the same rows as before, *after* uses the task's log-likelihood view (one row per
example: prompt + the gold continuation, reward = minus the gold NLL per token, the quantity the
old greedy minimised), so both greedies drop the same block. The margin objective's trial (every
option of a cloze question: 4 rows per example) is timed beside it. Prints a markdown table and
writes ``OUT/bench_search.md`` (``--out``); the committed one::

    OMP_NUM_THREADS=1 python -m layerroute.experiments.bench_search --task suite --limit 8 --rounds 1 \
        --out experiments/results
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs, experiment_command
from layerroute.tables import write_report


def old_loss(ex, tok, task, examples, route, batch_size: int) -> float:
    """The old ``Calibration.loss``: mean gold NLL per token, re-tokenized on every call."""
    from layerroute.scoring import gold_nll_per_token, task_prompts

    nll = []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        nll += gold_nll_per_token(ex, tok, task, part, task_prompts(tok, task, part), [route] * len(part))[0]
    return sum(nll) / len(nll)


def old_greedy(ex, tok, task, examples, rounds: int, batch_size: int) -> list[int]:
    """The old greedy: every candidate removal scored by a full pass of ``old_loss``."""
    from layerroute.route import Route

    L, order = ex.num_layers, []
    for _ in range(rounds):
        kept = [i for i in range(L) if i not in order]
        losses = {i: old_loss(ex, tok, task, examples, Route(tuple(j for j in kept if j != i), ex.fingerprint),
                              batch_size) for i in kept}
        order.append(min(losses, key=losses.get))
    return order


def loglik_view(task, examples):
    """The same examples as a loglik task: one row each, the gold continuation the old loss scored."""
    import dataclasses

    from layerroute.scoring import gold_continuation

    return dataclasses.replace(task, kind="loglik", examples=tuple(
        dataclasses.replace(ex, answer=gold_continuation(task, ex), choices=()) for ex in examples))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@dataclass
class Args(ExperimentArgs):
    task: str = option("suite", "task spec")
    limit: int = option(8, "search-split examples")
    rounds: int = option(1, "greedy removal rounds (blocks dropped)")
    batch_size: int = option(8, "examples per call, before")
    batch_rows: int = option(64, "rows per call, after")
    threads: int = option(1, "torch threads")


def main(argv=None) -> None:
    from layerroute.objective import Objective
    from layerroute.search.baselines import greedy_order
    from layerroute.search.optuna_search import OptunaConfig, OptunaSearch
    from layerroute.tasks import get_task

    args = parse_config(Args, argv, __doc__.splitlines()[0])
    ex, tok = args.executor(args.threads)
    task = get_task(args.task)
    L = ex.num_layers
    examples = task.split("search", 0).examples[:args.limit]
    ll, t_prep = timed(lambda: Objective(ex, tok, loglik_view(task, examples), batch_rows=args.batch_rows))
    margin = Objective(ex, tok, task, examples, batch_rows=args.batch_rows)
    route = ex.route(f"skip:{L // 2 - 3}-{L // 2 + 2}" if L >= 8 else "identity")  # a trial's route: 24 of 30 blocks

    rows = []
    order_old, t_old = timed(lambda: old_greedy(ex, tok, task, examples, args.rounds, args.batch_size))
    order_new, t_new = timed(lambda: greedy_order(ll, L - args.rounds))
    rows.append((f"greedy, {args.rounds} round(s) of removal ({L} candidates first)", t_old, t_new,
                 f"dropped block(s) {order_old} before, {order_new} after"))
    loss, t_old = timed(lambda: old_loss(ex, tok, task, examples, route, args.batch_size))
    rec, t_new = timed(lambda: OptunaSearch(ll, OptunaConfig(pruner="none"))._score(route.layers))
    rows.append((f"one Optuna trial ({route.cost} blocks), same rows", t_old, t_new,
                 f"gold NLL/token {loss:.4f} before, {-rec['reward']:.4f} after"))
    rec, t_margin = timed(lambda: OptunaSearch(margin, OptunaConfig(pruner="none"))._score(route.layers))
    rows.append((f"one Optuna trial, margin reward ({int(margin.num_rows.float().mean())} rows per example)", t_old,
                 t_margin, f"{rec['chunks']} chunk(s) of at most {args.batch_rows} rows"))
    lines = [f"# Search scoring before and after the shared objective ({args.model}, CPU, "
             f"{args.threads} thread(s))", "",
             f"Task {task.name}, the first {len(examples)} search-split examples; before: "
             f"`gold_nll_per_token` per route, {args.batch_size} examples per call, re-tokenized per call; after: "
             f"the `Objective`, tokenized once ({t_prep:.2f} s), {args.batch_rows} rows per call. Wall times on a "
             f"shared 2-core machine (other jobs running), so ratios are rough.", "",
             f"Command: `{experiment_command('bench_search', argv)}`", "",
             "| work | before (s) | after (s) | speedup | note |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {n} |" for w, a, b, n in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.path("bench_search.md"), text, {"args": asdict(args), "rows": rows})


if __name__ == "__main__":
    main()
