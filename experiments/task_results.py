"""Full-model accuracy on every packaged task, and the static-baseline curves on the suite.

    python -m layerroute.experiments.task_results [--model smollm2-135m]

Scores the test split of each task (capped by ``--limit-*`` where a full pass would take long
on a CPU) and writes ``OUT/tasks.md``, ``baselines_suite.md`` and ``baselines_suite.png``
(``--out``; the committed ones: ``--out experiments/results``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layerroute import RouteExecutor, load_model
from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs
from layerroute.evaluation import evaluate
from layerroute.search.baselines import format_table, plot_curves, run_baselines
from layerroute.store import atomic_write_json, environment
from layerroute.tables import ci, pct, stamp, table, write_report
from layerroute.tasks import get_task


@dataclass
class Args(ExperimentArgs):
    seed: int = option(0, "seed of the splits and searches")
    limit_mmlu: int = option(600, "MMLU test items scored")
    limit_gsm8k: int = option(100, "GSM8K test items scored")
    batch_size: int = option(16, "examples per batch")
    budgets: str = option("0.9,0.8,0.7", "comma-separated shares of the blocks")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    ex = RouteExecutor(model)
    cmd = "python -m layerroute.experiments.task_results " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in asdict(args).items())

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
