"""Routers against the full model, static routes and Optuna at equal compute, and the MCTS oracle.

    OMP_NUM_THREADS=1 python -m layerroute.experiments.router_table [--labels experiments/results/mcts_gen] \
        [--unseen suite,mmlu] [--test-limit 150] [--out experiments/results]

The defaults are the committed tables' settings: that one command, with ``--out experiments/results``,
writes both ``experiments/results/router_table.md`` (the trained task) and ``router_table_unseen.md`` (the
unseen tasks), each with its ``.json``.

1. Trains routers on the label store(s) (MCTS routes of the trained task's search split) twice:
   teacher forcing only, and with on-policy refinement (always kept), to measure what it does.
2. For the trained task's test split and each unseen task's test split, evaluates: the full
   model; both routers (their mean executed blocks measured); every static baseline and an
   Optuna route at ``k = round(mean router blocks)`` (calibrated on that task's search split);
   and an MCTS ORACLE on the first ``--oracle-limit`` test samples (it reads their labels: an
   upper bound, not a result), with the routers' per-layer agreement with its routes.
3. Router overhead: the routers' prefill walk against a plain prefill along the routes they
   chose, timed back to back (medians) on 16 test prompts (evaluation wall times are not
   compared: other jobs change them).

Rows are written to ``OUT/NAME.md`` / ``.json`` (the trained task; ``--out``, ``--name router_table``) and
``NAME_unseen.md`` / ``.json`` (the unseen tasks) as they finish, each headed by the command
and the date, so a killed run keeps what it did. Run with ``OMP_NUM_THREADS=1`` beside other work.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layerroute.evaluation import evaluate, wilson_interval
from layerroute.objective import Objective
from layerroute.route import Route
from layerroute.routers import RouterPolicy, load_routers, route_prompts, save_routers
from layerroute.routers.training import actions_of, load_labels, pass_counts, prompt_batches, train_routers
from layerroute.search import get_searcher
from layerroute.search.baselines import BASELINES
from layerroute.config import option, parse_config
from layerroute.experiments import RESULTS, SeededArgs
from layerroute.store import environment, read_store
from layerroute.tables import acc_ci, table, write_result
from layerroute.tasks import get_task


@dataclass
class Args(SeededArgs):
    labels: tuple = option((str(RESULTS / "mcts_gen"),), "MCTS label store(s) of the trained task", nargs="+",
                           type=str)
    unseen: str = option("suite,mmlu", "comma-separated tasks the routers never saw (their own table)")
    test_limit: int = option(150, "test samples per task")
    calib_limit: int = option(16, "search samples the static routes and Optuna are chosen on")
    optuna_trials: int = option(24, "Optuna trials per task")
    oracle_limit: int = option(60, "test samples of the MCTS oracle (0: skip)")
    oracle_simulations: int = option(16, "MCTS simulations per oracle sample")
    epochs: int = option(30, "router training epochs")
    refine_epochs: int = option(5, "on-policy refinement epochs")
    baselines: str = option(",".join(BASELINES), "comma-separated static baselines")
    name: str = option("router_table", "the trained task's table (OUT/NAME.md, .json); the unseen tasks' goes to "
                       "OUT/NAME_unseen")
    routers_dir: str = option("runs/router_table_500", "where the trained routers are saved")
    reuse_routers: bool = option(False, "load the routers of an earlier run from --routers-dir")
    skip_trained: bool = option(False, "only the unseen tasks")


class Table:
    """Rows written to markdown and JSON after every addition: the trained task's to ``out``, the unseen
    tasks' to ``out_unseen``."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows = out, meta, []

    def add(self, task: str, method: str, acc=None, n=None, blocks=None, agreement=None, seconds=None, note=""):
        ci = wilson_interval(round(acc * n), n) if acc is not None else None
        self.rows.append({"task": task, "method": method, "accuracy": acc, "n": n, "ci95": ci, "mean_blocks": blocks,
                          "agreement": agreement, "seconds": seconds, "note": note})
        print(f"[{time.strftime('%H:%M:%S')}] {task} | {method} | "
              f"{'-' if acc is None else f'{100 * acc:.1f}%'} | {blocks} | {agreement} | {seconds} | {note}", flush=True)
        self.write()

    def write(self) -> None:
        for stem, rows in ((self.out, [r for r in self.rows if not r["task"].endswith("(unseen)")]),
                           (self.out.with_name(self.out.name + "_unseen"),
                            [r for r in self.rows if r["task"].endswith("(unseen)")])):
            if rows or stem == self.out:
                write_result(stem, f"Routers on {self.meta['model']} (test splits)", self._lines(rows),
                             {"meta": self.meta, "rows": rows})

    def _lines(self, rows) -> list[str]:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        return [f"Labels: {self.meta['labels']}. {self.meta.get('training_note', '')}", "",
                *table(["task", "method", "accuracy (95% CI)", "n", "mean blocks", "agreement with oracle",
                        "wall time (s)", "note"],
                       [[r["task"], r["method"], "-" if r["accuracy"] is None else acc_ci(r["accuracy"], r["ci95"]),
                         r["n"] or "-", fmt(r["mean_blocks"], ".2f"), fmt(r["agreement"], ".3f"),
                         fmt(r["seconds"], ".1f"), r["note"]] for r in rows])]


def routing_overhead(net, ex, tok, task, examples) -> tuple[float, float]:
    """Median seconds of the routers' prefill walk and of a plain prefill along the routes it chose
    (last-position logits), on one batch of ``examples``, timed back to back."""
    from layerroute.experiments.bench_executor import _median_times

    _, ids, mask = next(prompt_batches(ex, tok, task, examples, len(examples)))
    routes, _ = route_prompts(net, ex, ids, mask)
    t = _median_times({"walk": lambda: route_prompts(net, ex, ids, mask),
                       "plain": lambda: ex(ids, mask, routes, logits_to_keep=1)}, 5, warmup=1)
    return t["walk"], t["plain"]


def router_actions(net, ex, tok, task, examples) -> torch.Tensor:
    """[N, L] actions the routers choose on ``examples`` (in order)."""
    counts = torch.zeros(len(examples), ex.num_layers, dtype=torch.long)
    for idx, ids, mask in prompt_batches(ex, tok, task, examples, 16):
        _, walk = route_prompts(net, ex, ids, mask)
        counts[idx] = walk.counts
    return actions_of(counts)


def oracle(ex, tok, task, args, label_settings, seed, null: bool = False) -> tuple[list[dict], list]:
    """MCTS with the label search's settings on the first test samples: per-sample records (``null``: its
    chance level, the same search toward a seeded random wrong option)."""
    obj = Objective.from_task(ex, tok, task, "test", args.oracle_limit, seed, budget=label_settings.get("budget"),
                              lam=float(label_settings.get("lam") or 0.0), reward=label_settings.get("reward", "margin"),
                              null_seed=seed if null else None)
    cls = get_searcher("mcts")
    space = label_settings.get("space", "edit")
    config = cls.Config(simulations=args.oracle_simulations, space="sequential" if space == "drllm" else space)
    searcher = cls(obj, config, seed=seed)
    return list(searcher.search(searcher.units())), obj.examples


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    ex, tok = args.executor(args.threads)
    labels = load_labels(args.labels, ex.fingerprint)
    label_settings = read_store(args.labels[0])[0].get("settings", {})
    meta = {"model": args.model, "labels": ", ".join(args.labels), "settings": asdict(args), "env": environment(),
            "label_settings": label_settings}
    table = Table(args.path(args.name), meta)

    nets = {}
    for name, refine in (("routers (teacher forcing)", 0), ("routers (+ on-policy refinement)", args.refine_epochs)):
        t, where = time.perf_counter(), Path(args.routers_dir) / ("teacher" if not refine else "refined")
        if args.reuse_routers:
            net = load_routers(where, ex.model)
            report = net.config.training
        else:
            net, report = train_routers(ex, tok, labels, epochs=args.epochs, refine_epochs=refine, seed=args.seed,
                                        base_model=args.model, keep_refined=True, budget=label_settings.get("budget"))
            save_routers(where, net)
        nets[name] = net
        meta.setdefault("training", {})[name] = {**report, "seconds": time.perf_counter() - t}
    rep = meta["training"]["routers (+ on-policy refinement)"]
    meta["training_note"] = (
        f"Routers: {rep['parameters']:,} parameters ({100 * rep['share_of_base']:.2f}% of the base), trained on "
        f"{rep['train_samples']} searched samples, {rep['val_samples']} held out; label counts skip/execute/repeat "
        f"{rep['label_counts']}. On-policy validation agreement {rep['on_policy_val']['agreement']:.3f} before "
        f"refinement, {rep['refinement']['on_policy_val_after']['agreement']:.3f} after.")
    table.write()

    tasks = [] if args.skip_trained else [labels.task_spec]
    tasks += [t for t in args.unseen.split(",") if t]
    for spec in tasks:
        name = spec + (" (trained)" if spec == labels.task_spec else " (unseen)")
        task = get_task(spec, seed=args.seed)
        test = task.split("test", args.seed)
        ev = dict(limit=args.test_limit, batch_size=16, progress=False)
        full = evaluate(ex, tok, test, None, **ev)
        table.add(name, "full model", full.accuracy, full.n, full.mean_blocks, seconds=full.seconds)
        blocks = {}
        for method, net in nets.items():
            r = evaluate(ex, tok, test, RouterPolicy(net), **ev)
            blocks[method] = r.mean_blocks
            table.add(name, method, r.accuracy, r.n, r.mean_blocks, seconds=r.seconds,
                      note="time includes the routing walk")
        k = max(1, round(blocks["routers (+ on-policy refinement)"]))
        cal = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, option="--calib-limit")
        for b in args.baselines.split(","):
            r = evaluate(ex, tok, test, BASELINES[b](cal, k, args.seed), **ev)
            table.add(name, f"static {b} at {k} blocks", r.accuracy, r.n, r.mean_blocks, seconds=r.seconds,
                      note=f"calibrated on {len(cal)} search-split samples")
        for method, net in nets.items():
            walk, plain = routing_overhead(net, ex, tok, task, test.examples[:16])
            table.add(name, f"{method}: overhead", seconds=walk - plain,
                      note=f"routing walk {walk:.3f} s against a prefill along the same routes {plain:.3f} s "
                           f"({100 * (walk / plain - 1):+.0f}%), 16 test prompts, medians of 5, back to back")
        obj = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, budget=k)
        cls = get_searcher("optuna")
        searcher = cls(obj, cls.Config(trials=args.optuna_trials), seed=args.seed)
        summary = searcher.summarize(list(searcher.search(searcher.units())))
        r = evaluate(ex, tok, test, Route.from_dict(summary["route"], ex.fingerprint), **ev)
        table.add(name, f"Optuna route at <= {k} blocks", r.accuracy, r.n, r.mean_blocks, seconds=r.seconds,
                  note=f"{args.optuna_trials} TPE trials on {len(obj)} search-split samples")
        if not args.oracle_limit:
            continue
        records, examples = oracle(ex, tok, task, args, label_settings, args.seed)
        chains = [tuple(rec["layers"]) for rec in records]
        in_order = [i for i, c in enumerate(chains) if all(a <= b for a, b in zip(c, c[1:]))]
        want = actions_of(pass_counts([chains[i] for i in in_order], ex.num_layers))
        acc = sum(bool(rec["correct"]) for rec in records) / len(records)
        table.add(name, "MCTS ORACLE (reads labels; upper bound)", acc, len(records),
                  sum(len(c) for c in chains) / len(chains), note=f"{args.oracle_simulations} simulations, first "
                  f"{len(records)} test samples")
        if task.kind == "choice":  # its chance level: the same search toward a random wrong option
            nulls, _ = oracle(ex, tok, task, args, label_settings, args.seed, null=True)
            table.add(name, "MCTS null labels (its chance level)", sum(bool(r["correct"]) for r in nulls) / len(nulls),
                      len(nulls), sum(r["blocks"] for r in nulls) / len(nulls),
                      note="the same search, each label a seeded random wrong option")
        for method, net in nets.items():
            got = router_actions(net, ex, tok, task, [examples[i] for i in in_order])
            table.add(name, f"{method}: agreement with oracle", agreement=float((got == want).float().mean()),
                      n=len(in_order), note="per-layer actions on the oracle's samples")


if __name__ == "__main__":
    main()
