"""lm-eval cross-check: ``--model layerroute`` against ``--model hf`` and against ``layerroute eval``.

    python -m layerroute.experiments.lm_eval_crosscheck [--n 60] [--route skip:20-24] [--router runs/routers-gen]

Builds two local lm-eval tasks from the same items that ``layerroute eval`` scores: the first
``n`` examples of the suite's test split (cloze: each option as a continuation) and of MMLU's
(letter: `` A``..`` D`` after "The answer is"), each prompt rendered as layerroute renders it
(chat template and answer prefix), choices with a leading space, ``target_delimiter: ""``. Then

1. ``lm_eval --model hf`` on the dequantized checkpoint (float32) against ``layerroute lm-eval
   --model layerroute`` on the full model: the same prediction on every item, and the largest
   difference of any option's log-likelihood;
2. ``layerroute lm-eval --model layerroute`` along a route and along routers against
   ``layerroute eval`` with the same route or routers: the same prediction on every item, and
   the largest difference of the gold option's NLL per token.

Writes ``OUT/lm_eval_crosscheck.md`` (``--out``; the committed one: ``--out experiments/results``) and the
runs' outputs under ``--work``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from datetime import date
from dataclasses import asdict, dataclass
from pathlib import Path

from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs
from layerroute.tables import write_report


TASKS = {"suite": "lr_suite", "mmlu": "lr_mmlu"}
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


def write_tasks(tok, n: int, seed: int, folder: Path) -> dict:
    """The lm-eval task folder; per task the items (uid, prompt, choices, gold, gold tokens)."""
    from layerroute.scoring import join_continuations
    from layerroute.tasks import LETTERS, get_task
    from layerroute.tasks.prompts import render_prompt

    folder.mkdir(parents=True, exist_ok=True)
    items = {}
    for spec, name in TASKS.items():
        task = get_task(spec, seed=seed)
        docs = []
        for ex in task.split("test", seed).examples[:n]:
            prompt = render_prompt(tok, ex.question, chat=True, answer_prefix=task.prefix_for(ex))
            choices = [" " + c for c in (ex.choices if task.choice_scoring == "cloze" else LETTERS[:len(ex.choices)])]
            gold = LETTERS.index(ex.answer)
            docs.append({"uid": ex.uid, "prompt": prompt, "choices": choices, "gold": gold,
                         "gold_tokens": join_continuations(tok, [prompt], [choices[gold]])[1][0]})
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(YAML.format(name=name, data=folder / f"{name}.jsonl"))
        items[spec] = docs
    return items


def run(cmd: list[str], shown: str, log: Path) -> float:
    """Run ``cmd`` (``shown`` is how a user types it), its output in ``log``; the seconds it took."""
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {shown}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {shown}; see {log}")
    return time.perf_counter() - start


def lm_eval_samples(out: Path, task: str) -> dict:
    """uid -> (per-option log-likelihoods) from an lm-eval --log_samples run."""
    [path] = sorted(out.rglob(f"samples_{task}_*.jsonl"))[-1:]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["doc"]["uid"]: [float(ll) for ll, _ in r["filtered_resps"]] for r in rows}


def eval_samples(out: Path) -> dict:
    """uid -> (prediction letter, gold NLL per token) from a ``layerroute eval --output`` run."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return {r["uid"]: (r["prediction"], r["gold_nll"]) for r in rows if r.get("type") == "sample"}


def argmax(values) -> int:  # lm-eval's and layerroute's rule: the first of equal maxima
    return max(range(len(values)), key=lambda i: (values[i], -i))


def compare_lm_eval(a: dict, b: dict, docs) -> tuple[int, float, float, float]:
    """Same predictions, largest |difference| of any option's log-likelihood, accuracy of each."""
    same = sum(argmax(a[d["uid"]]) == argmax(b[d["uid"]]) for d in docs)
    diff = max(abs(x - y) for d in docs for x, y in zip(a[d["uid"]], b[d["uid"]]))
    acc = [sum(argmax(s[d["uid"]]) == d["gold"] for d in docs) / len(docs) for s in (a, b)]
    return same, diff, *acc


def compare_eval(a: dict, b: dict, docs) -> tuple[int, float, float, float]:
    """lm-eval (``a``) against ``layerroute eval`` (``b``): same predictions, largest |difference| of
    the gold option's NLL per token, accuracy of each."""
    from layerroute.tasks import LETTERS

    same = sum(LETTERS[argmax(a[d["uid"]])] == b[d["uid"]][0] for d in docs)
    diff = max(abs(-a[d["uid"]][d["gold"]] / d["gold_tokens"] - b[d["uid"]][1]) for d in docs)
    acc = [sum(argmax(a[d["uid"]]) == d["gold"] for d in docs) / len(docs),
           sum(b[d["uid"]][0] == LETTERS[d["gold"]] for d in docs) / len(docs)]
    return same, diff, *acc


def float64_distance(weights: str, lm: dict, items: dict, k: int) -> dict:
    """Per task, for the ``k`` options where ``--model layerroute`` and ``--model hf`` differ most:
    the largest distance of each run's log-likelihood to a float64 evaluation of the same tokens
    (lm-eval's split of context and continuation), i.e. how far fp32 rounding alone goes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(weights)
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float64).eval()
    out = {}
    for spec, docs in items.items():
        ours, hf = lm["full"][spec], lm["hf"][spec]
        worst = sorted(((abs(x - y), d, j) for d in docs for j, (x, y) in enumerate(zip(ours[d["uid"]], hf[d["uid"]]))),
                       key=lambda t: -t[0])[:k]
        far = [0.0, 0.0]
        for _, d, j in worst:
            ctx, whole = tok(d["prompt"]).input_ids, tok(d["prompt"] + d["choices"][j]).input_ids
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, len(ctx) - 1:-1], dim=-1)
            ref = float(logp[range(len(cont)), cont].sum())
            far = [max(far[0], abs(ours[d["uid"]][j] - ref)), max(far[1], abs(hf[d["uid"]][j] - ref))]
        out[spec] = far
    return out


@dataclass
class Args(ExperimentArgs):
    n: int = option(60, "test-split items per task")
    seed: int = option(0, "seed of the splits and searches")
    route: str = option("skip:20-24", "a static route to cross-check")
    router: str = option("runs/routers-gen", "a router directory (skipped if it does not exist)")
    batch_size: int = option(8, "examples per batch")
    worst: int = option(5, "options checked against a float64 evaluation, per task")
    work: str = option("runs/lm-eval-crosscheck", "folder for the tasks and the runs' outputs")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    from transformers import AutoTokenizer

    from layerroute.models import resolve_model_path

    work, py = Path(args.work), sys.executable
    weights = resolve_model_path(args.model)  # the dequantized safetensors checkpoint, for lm-eval's hf model
    items = write_tasks(AutoTokenizer.from_pretrained(weights), args.n, args.seed, work / "tasks")
    lm_args = ["--tasks", ",".join(TASKS.values()), "--include_path", str(work / "tasks"), "--log_samples",
               "--device", "cpu", "--batch_size", str(args.batch_size)]
    runs = {"hf": ("hf", f"pretrained={weights},dtype=float32"), "full": ("layerroute", f"model={args.model}")}
    routings = {"route": ("--route", args.route)}
    if Path(args.router).is_dir():
        routings["router"] = ("--router", args.router)
    for name, (flag, value) in routings.items():
        runs[name] = ("layerroute", f"model={args.model},{flag[2:]}={value}")
    commands, seconds, lm = [], {}, {}
    for name, (model, margs) in runs.items():
        out = work / name
        cmd = ["--model", model, "--model_args", margs, *lm_args, "--output_path", str(out)]
        shown = ("lm_eval " if model == "hf" else "layerroute lm-eval ") + shlex.join(cmd)
        full = [py, "-m", "lm_eval", *cmd] if model == "hf" else [py, "-m", "layerroute.cli", "lm-eval", *cmd]
        seconds[name] = run(full, shown, work / f"{name}.log")
        commands.append(shown)
        lm[name] = {spec: lm_eval_samples(out, task) for spec, task in TASKS.items()}
    evals = {}
    for name, (flag, value) in routings.items():
        for spec in TASKS:
            out = work / f"eval-{name}-{spec}"
            cmd = ["eval", "--model", args.model, "--task", spec, "--limit", str(args.n), "--seed", str(args.seed),
                   "--batch-size", str(args.batch_size), flag, value, "--output", str(out), "--overwrite"]
            shown = "layerroute " + shlex.join(cmd)
            seconds[out.name] = run([py, "-m", "layerroute.cli", *cmd], shown, work / f"{out.name}.log")
            commands.append(shown)
            evals[name, spec] = eval_samples(out)
    rows, exact = [], float64_distance(weights, lm, items, args.worst)
    for spec in TASKS:
        docs = items[spec]
        same, diff, acc_a, acc_b = compare_lm_eval(lm["full"][spec], lm["hf"][spec], docs)
        rows.append(f"| {spec} | full model | `--model layerroute` vs `--model hf` | {len(docs)} | {same}/{len(docs)} "
                    f"| {diff:.2e} (any option's log-likelihood) | {100 * acc_a:.1f}% / {100 * acc_b:.1f}% |")
        rows.append(f"| {spec} | full model | each vs float64, the {args.worst} options above that differ most | "
                    f"{args.worst} | | layerroute {exact[spec][0]:.2e}, hf {exact[spec][1]:.2e} | |")
        for name, (flag, value) in routings.items():
            same, diff, acc_a, acc_b = compare_eval(lm[name][spec], evals[name, spec], docs)
            rows.append(f"| {spec} | {flag[2:]} {value} | `--model layerroute` vs `layerroute eval` | {len(docs)} "
                        f"| {same}/{len(docs)} | {diff:.2e} (gold NLL per token) | {100 * acc_a:.1f}% / "
                        f"{100 * acc_b:.1f}% |")
    lines = [f"# lm-eval cross-check ({date.today().isoformat()})", "",
             f"`{' '.join(['python -m layerroute.experiments.lm_eval_crosscheck', *(argv or sys.argv[1:])])}`",
             "", f"Model {args.model}; the first {args.n} test-split items of each task (seed {args.seed}): `suite` "
             "(cloze, four one-word options) and `mmlu` (letters A-D after \"The answer is\"), as local lm-eval tasks "
             "(`dataset_path: json`, `target_delimiter: \"\"`, choices with a leading space; prompts rendered as "
             "`layerroute eval` renders them). lm-eval 0.4.13, float32 on CPU. Accuracy: the first run / the second. "
             "The float64 rows score the options where the two fp32 runs differ most once more in float64: "
             "how far fp32 rounding alone takes each run from the exact value.",
             "", "| task | routing | compared | n | same prediction | max abs difference | accuracy |",
             "|---|---|---|---|---|---|---|", *rows, "",
             "Commands (in this order; seconds each, model load included):", "",
             *[f"- `{c}` ({s:.0f} s)" for c, s in zip(commands, seconds.values())], ""]
    write_report(args.path("lm_eval_crosscheck.md"), "\n".join(lines), {"args": asdict(args), "report": lines})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
