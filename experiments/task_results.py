"""Full-model accuracy on every packaged task, and the static-baseline curves on the suite.

    python -m layerroute.experiments.task_results [--model smollm2-135m]

Scores the test split of each task (capped by ``--limit-*`` where a full pass would take long
on a CPU) and writes ``experiments/results/tasks.md``, ``baselines_suite.md`` and
``baselines_suite.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from layerroute import RouteExecutor, load_model
from layerroute.evaluation import evaluate
from layerroute.search.baselines import format_table, plot_curves, run_baselines
from layerroute.store import atomic_write_json, environment
from layerroute.tables import ci, pct, stamp, table, write_report
from layerroute.tasks import get_task

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-mmlu", type=int, default=600)
    ap.add_argument("--limit-gsm8k", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--budgets", default="0.9,0.8,0.7")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    ex = RouteExecutor(model)
    cmd = "python -m layerroute.experiments.task_results " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")

    limits = {"mmlu": args.limit_mmlu, "gsm8k": args.limit_gsm8k}
    header, rows = ["task", "kind", "test n", "accuracy", "95% CI", "chance", "blocks", "tokens/s"], []
    records = {}
    for name in ("suite", "suite:capitals", "suite:opposites", "suite:arithmetic", "suite:comparison",
                 "mmlu", "gpqa", "gsm8k", "aime2025"):
        task = get_task(name, seed=args.seed)
        test = task.split("test", args.seed)
        res = evaluate(ex, tok, test, batch_size=args.batch_size, limit=limits.get(name))
        chance = "-" if task.kind != "choice" else f"{100 / len(test.examples[0].choices):.0f}%"
        kind = task.kind + ("/" + task.choice_scoring if task.kind == "choice" else "")
        rows.append([name, kind, res.n, pct(res.accuracy), ci(res.ci95), chance, f"{res.mean_blocks:.0f}",
                     f"{res.tokens_per_second:.0f}"])
        records[name] = res.metrics()
        print(rows[-1], flush=True)
    date = stamp(cmd)["date"]
    write_report(out / "tasks.md", f"# Full-model accuracy of {args.model} (test splits, seed {args.seed})\n\n"
                 f"`{cmd}` ({date})\n\n" + "\n".join(table(header, rows)) + "\n", {"tasks": records}, cmd)

    suite = get_task("suite", seed=args.seed)
    budgets = [float(b) for b in args.budgets.split(",")]
    curve = run_baselines(ex, tok, suite, budgets, seed=args.seed, batch_size=args.batch_size)
    baselines = format_table(curve)
    print(baselines)
    write_report(out / "baselines_suite.md", f"# Static baselines on the generated suite ({args.model}, test split, "
                 f"calibrated on the search split)\n\n`{cmd}` ({date})\n\n{baselines}\n", {"rows": curve}, cmd)
    plot_curves(curve, out / "baselines_suite.png", f"{args.model}: static baselines on the suite (test split)")
    atomic_write_json(out / "task_results.json", {"command": cmd, "date": date, "environment": environment(),
                                                  "tasks": records, "baselines_suite": curve})


if __name__ == "__main__":
    main()
