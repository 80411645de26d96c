"""Full-model accuracy on each generated sub-task (``gen:<subtask>``), test split.

    python -m layerroute.experiments.generated_tasks [--model smollm2-135m] [--limit 400]

Writes ``OUT/generated_tasks.md`` and ``generated_tasks.json`` (``--out``; the committed ones:
``--out experiments/results``), rewritten after each sub-task so that a killed run keeps what it finished.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from layerroute import RouteExecutor, load_model
from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs
from layerroute.evaluation import evaluate, wilson_interval
from layerroute.store import environment
from layerroute.tables import ci, pct, row, stamp, write_report
from layerroute.tasks import get_task
from layerroute.tasks.generated import DEFAULT_SIZE, GENERATORS, SUBTASKS



def _row(name, available, test_n, n, right, chance) -> str:
    return row(name, available, test_n, n, pct(right / n), ci(wilson_interval(right, n)), chance)


@dataclass
class Args(ExperimentArgs):
    seed: int = option(0, "seed of the splits and searches")
    size: int = option(DEFAULT_SIZE, "examples generated per sub-task")
    limit: int = option(400, "test examples scored per sub-task")
    batch_size: int = option(16, "examples per batch")
    subtasks: str = option(",".join(SUBTASKS), "comma-separated generated sub-tasks")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    cmd = "python -m layerroute.experiments.generated_tasks " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in asdict(args).items())
    model, tok = load_model(args.model)
    ex = RouteExecutor(model)
    head = [f"# Full-model accuracy of {args.model} on the generated sub-tasks (test split, seed {args.seed})",
            "", f"`{cmd}` ({stamp(cmd)['date']})", "",
            "Each sub-task generates `size` examples (in brackets: the most it can make, exact for add2 and mul, "
            "a cap for the others); the test split holds about 30% of them and the first `limit` are scored. "
            "Four options each, so chance is 25%.", "",
            "| sub-task | examples (max) | test split | test n scored | accuracy | 95% CI | chance |",
            "|---|---|---|---|---|---|---|"]
    rows, records, total_n, total_right = [], {}, 0, 0
    for sub in args.subtasks.split(","):
        task = get_task(f"gen:{sub}", seed=args.seed, size=args.size)
        test = task.split("test", args.seed)
        res = evaluate(ex, tok, test, batch_size=args.batch_size, limit=args.limit)
        right = sum(s.correct for s in res.samples)
        total_n, total_right = total_n + res.n, total_right + right
        chance = f"{100 / len(test.examples[0].choices):.0f}%"
        rows.append(_row(task.name, f"{len(task)} ({GENERATORS[sub][1]:,})", len(test), res.n, right, chance))
        records[task.name] = {**res.metrics(), "examples": len(task), "max_examples": GENERATORS[sub][1],
                              "test_split": len(test)}
        print(rows[-1], flush=True)
        pooled = [_row("all (pooled)", "", "", total_n, total_right, "25%")] if len(rows) > 1 else []
        write_report(args.path("generated_tasks.md"), "\n".join(head + rows + pooled) + "\n",
                     {"environment": environment(), "settings": {k: v for k, v in asdict(args).items() if k != "out"},
                      "subtasks": records}, cmd)


if __name__ == "__main__":
    main()
