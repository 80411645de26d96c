"""Issue 18's figures in one command: edit-space MCTS, gold against null, and the routing signal.

    OMP_NUM_THREADS=1 python -m layerroute.experiments.label_signal [--mcts-limit 500] [--simulations 200] \
        [--signal-limit 200] [--signal-tasks gen,suite,mmlu] --out experiments/results

1. ``layerroute search mcts`` (edit space, Dr.LLM's search) on the first ``--mcts-limit`` samples
   of ``gen``'s search split, with gold labels and again with ``--null``, into resumable stores
   (``OUT/mcts_edit_gen`` and ``OUT/mcts_edit_gen-null``; a killed run resumes, and a larger
   ``--mcts-limit`` grows them), then
   ``layerroute analyze`` on the pair: every oracle figure beside its chance level, the label
   statistics and the robust filter's threshold and keep rate.
2. ``layerroute signal`` on each of ``--signal-tasks`` (``--signal-limit`` search-split samples).

Every step is the CLI command it prints, so each file can be regenerated on its own. The reports
(``analyze.md``, ``signal-TASK.md`` and the PNGs) land in ``OUT``, each naming its command. The
searches resume; a signal report already written for the same sample count is kept. The
defaults are issue 18's: 500 MCTS samples at Dr.LLM's 200 simulations (about 8 min per store on
one thread, since the early stops end most searches after a few simulations).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from layerroute.cli import main as cli
from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs, experiment_command


def run(argv: list[str]) -> None:
    print("$ layerroute " + " ".join(argv), flush=True)
    saved, sys.argv = sys.argv, ["layerroute", *argv]  # reports name the command that made them
    try:
        if cli(argv) != 0:
            sys.exit(f"failed: layerroute {' '.join(argv)}")
    finally:
        sys.argv = saved


@dataclass
class Args(ExperimentArgs):
    mcts_limit: int = option(500, "search-split samples of the MCTS runs")
    simulations: int = option(200, "MCTS simulations per sample")
    signal_limit: int = option(200, "samples of each signal report")
    signal_tasks: str = option("gen,suite,mmlu", "comma-separated tasks of the signal reports")
    skip_mcts: bool = option(False, "only the signal reports")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    out = Path(args.out)
    if not args.skip_mcts:
        store = out / "mcts_edit_gen"
        common = ["search", "mcts", "--model", args.model, "--task", "gen", "--limit", str(args.mcts_limit),
                  "--simulations", str(args.simulations)]
        steps = [common + ["--output", str(store)], common + ["--null", "--output", f"{store}-null"],
                 ["analyze", str(store)]]
        for step in steps:
            run(step)
        title, rest = (store / "analyze.md").read_text().split("\n", 1)
        made = "; ".join(f"`layerroute {' '.join(step)}`" for step in steps)
        (out / "analyze_edit_gen.md").write_text(f"{title}\n\nCommand: `{experiment_command('label_signal', argv)}`, "
                                                 f"which runs {made}.\n{rest}")
    for task in [t for t in args.signal_tasks.split(",") if t]:
        done = out / f"signal-{task}" / "signal.json"
        if done.is_file() and json.loads(done.read_text()).get("samples") == args.signal_limit:
            print(f"{done}: up to date")
            continue
        run(["signal", "--model", args.model, "--task", task, "--limit", str(args.signal_limit),
             "--output", str(out / f"signal-{task}")])
        shutil.copy(out / f"signal-{task}" / "signal.md", out / f"signal_{task}.md")


if __name__ == "__main__":
    main()
