"""Per-token routers against static layer skipping and the full model at matched compute: held-out
perplexity and accuracy on ``gen`` and ``suite``, against the realised executed blocks per token.

    OMP_NUM_THREADS=1 python -m layerroute.experiments.token_quality [--lambdas 0.3,1.0,3.0] [--steps 50] \
        [--gen-limit 150] [--suite-limit 88] [--out experiments/results]

1. Per-token routers (``train_token_routers``: base frozen, KL from the full model + lambda x executed
   share, straight-through gates, kv-kept) are trained once per lambda on windows of the tasks'
   search-split texts (``--corpus``), into ``OUT/token_quality_routers/lam-LAMBDA``. Training is resumable:
   a rerun continues an unfinished run and reloads a finished one.
2. Each method is measured on (a) perplexity over ``--ppl-windows`` held-out windows (the corpus'
   validation-split texts, never trained on; 95% CI over windows, back-transformed), and (b) accuracy
   on the test split of ``gen`` and ``suite`` (their first ``--gen-limit`` / ``--suite-limit``; 95% Wilson
   CIs). Methods: the full model; the per-token routers at their saved threshold under kv-kept (their
   realised mean executed blocks per token on that data); ``drop_last`` keeping the first
   ``k = round(those blocks)`` blocks (static skipping at matched executed share, on the same samples).
3. The per-sample routers' point comes from ``experiments/results/headline.json`` where it is readable
   (its own run, test-split n and date, not re-measured here).

Compute is shown two ways: executed blocks per token, and block equivalents (kv-kept's skipped pairs
still run their K/V projections: executed + c x skipped, c = K/V MACs / a block's MACs per token,
attention over keys not counted). Each per-token row is compared with its matched ``drop_last`` on the
same samples: the paired difference of window NLLs (95% normal CI) and of accuracies (Newcombe's
interval, conservative for paired samples). Rows go to ``OUT/token_quality.md`` / ``.json`` as they
finish and a rerun with the same settings reuses them; ``token_quality.png`` is drawn at the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layerroute.config import option, parse_config
from layerroute.experiments import RESULTS, SeededArgs, experiment_command

NAME = "token_quality"
TASKS = ("gen", "suite")


@dataclass
class Args(SeededArgs):
    lambdas: str = option("0.3,1.0,3.0", "comma-separated lambdas (weight of the executed share in the loss)")
    steps: int = option(50, "optimiser steps per lambda")
    batch_size: int = option(4, "windows per training step")
    max_length: int = option(64, "tokens per window (training and perplexity)")
    lr: float = option(3e-3, "AdamW learning rate")
    init_logit: float = option(2.0, "initial router bias (2: every token starts by executing every block, probability 0.88)")
    threshold: float = option(0.5, "inference threshold of the routers")
    corpus: str = option("gen,suite,gsm8k,mmlu", "tasks whose texts form the corpus (search split: training; "
                                                 "validation split: held out)")
    val_windows: int = option(8, "held-out windows for the training KL (start and end)")
    ppl_windows: int = option(48, "held-out windows for the perplexity")
    gen_limit: int = option(150, "first test-split samples of gen")
    suite_limit: int = option(88, "first test-split samples of suite")
    batch: int = option(16, "evaluation batch size")
    headline: str = option(str(RESULTS / "headline.json"), "the per-sample routers' results (skipped if unreadable)")


READING = [
    "Reading it:",
    "- drop_last is the static skipping the issue names, and a weak one for perplexity: without its last blocks "
    "the final state is far from what the final norm and the LM head expect. A searched static route would be a "
    "stronger baseline (static_routes.json has gen-fitted ones at 27, 24 and 21 blocks only).",
    "- The routers minimise the KL averaged over every token of plain question/answer text; accuracy is read from "
    "a few tokens (the options' log-likelihoods after a chat-formatted prompt), a format and a handful of "
    "positions the training never weighted. A small average KL can hide large errors exactly there.",
    "- 50 optimiser steps of 4 x 64 tokens per lambda (what fitted in the CPU budget): short training.",
    "- Block equivalents: kv-kept's skipped pairs still run their K/V projections, so the compute saved is a "
    "little smaller than the executed blocks suggest.",
]


# ---- measurements ---------------------------------------------------------------------------------
@torch.no_grad()
def window_nlls(executor, windows: torch.Tensor, route=None, batch: int = 8) -> list[float]:
    """Mean next-token NLL of each window along ``route`` (the executor decides per token if it is a
    ``TokenRoutingExecutor``)."""
    out = []
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch].to(executor.device)
        logits = executor(ids, routes=route).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view(len(ids), -1)
        out += nll.mean(1).tolist()
    return out


def kv_cost(model) -> float:
    """c: the K/V projections' MACs per token over a whole block's (projections and MLP), for this model."""
    from layerroute.experiments.bench_token_sparse import Shape

    s = Shape.of(model)
    return s.kv_proj / s.token_block


def drop_last_route(executor, k: int):
    """The route that keeps the first ``k`` blocks (identity when ``k`` is all of them)."""
    L = executor.num_layers
    return executor.route(None if k >= L else f"skip:{k}-{L - 1}")


class Table:
    """Rows keyed by (data, method), written after every addition; reused by a rerun with the same settings."""

    def __init__(self, args: Args, command: str, settings: dict):
        self.args, self.command, self.settings = args, command, settings
        self.rows: dict[str, dict] = {}
        self.extra: dict = {}
        path = args.path(f"{NAME}.json")
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("settings") == settings:
                self.rows = {r["key"]: r for r in old.get("rows", [])}
                self.extra["train_seconds"] = dict((old.get("extra") or {}).get("train_seconds") or {})
                print(f"reusing {len(self.rows)} finished rows of {path}", flush=True)

    def get(self, key):
        return self.rows.get(key)

    def add(self, row: dict) -> dict:
        self.rows[row["key"]] = row
        print(f"[{time.strftime('%H:%M:%S')}] {row['key']}: {row.get('value')} at {row['blocks']:.2f} blocks "
              f"({row.get('seconds', 0):.0f} s)", flush=True)
        self.write()
        return row

    def write(self) -> None:
        from layerroute.tables import write_result

        rows = list(self.rows.values())
        write_result(self.args.path(NAME), "Per-token routers against static skipping at matched compute "
                     f"(`{self.args.model}`)", lines(rows, self.extra, self.args),
                     {"settings": self.settings, "rows": rows, "extra": self.extra}, self.command)


def lines(rows: list[dict], extra: dict, args: Args) -> list[str]:
    from layerroute.tables import table

    out = [extra.get("setup", ""), ""]
    for data in ("ppl", *TASKS):
        pick = sorted((r for r in rows if r["data"] == data), key=lambda r: (-r["blocks"], r["method"]))
        if not pick:
            continue
        if data == "ppl":
            out += [f"## Perplexity on held-out text ({pick[0]['n']} windows of {args.max_length} tokens)", ""]
            head = ["method", "kind", "executed blocks / token", "block equivalents", "perplexity (95% CI)",
                    "vs matched drop_last: NLL difference (95% CI)"]
            body = [[r["method"], r["kind"], f"{r['blocks']:.2f}", f"{r['compute']:.2f}",
                     f"{r['value']:.2f} ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})", r.get("versus", "")] for r in pick]
        else:
            out += [f"## {data}: test split, first {pick[0]['n']} samples", ""]
            head = ["method", "kind", "n", "executed blocks / token", "block equivalents", "accuracy (95% CI)",
                    "vs matched drop_last (95% CI)", "note"]
            body = [[r["method"], r["kind"], r["n"], f"{r['blocks']:.2f}", f"{r['compute']:.2f}",
                     f"{100 * r['value']:.1f}% ({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f})",
                     r.get("versus", ""), r.get("note", "")] for r in pick]
        out += table(head, body) + [""]
    if extra.get("verdict"):
        out += ["## Where per-token routing beats static skipping, and where not", "",
                "Each per-token row against drop_last at the same executed blocks per token, on the same samples "
                "(paired; a difference counts only where its 95% interval excludes 0):", "", *extra["verdict"], "",
                *READING, ""]
    if extra.get("training"):
        out += ["## Training", "", *extra["training"], ""]
    return out


# ---- the run --------------------------------------------------------------------------------------
def train(args: Args, ex, tok, lam: float, train_w, val_w):
    from layerroute.routers.token_router import TrainTokenRouterConfig, train_token_routers

    config = TrainTokenRouterConfig(output=str(args.path(f"{NAME}_routers/lam-{lam:g}")), base_model=args.model,
                                    tasks=args.corpus, steps=args.steps, batch_size=args.batch_size,
                                    max_length=args.max_length, lr=args.lr, lam=lam, init_logit=args.init_logit,
                                    threshold=args.threshold, val_windows=args.val_windows, eval_every=args.steps,
                                    seed=args.seed, progress=False)
    state = Path(config.output) / "train_state.json"
    done = state.is_file() and json.loads(state.read_text()).get("step", 0) >= args.steps
    start = time.perf_counter()
    net, summary = train_token_routers(ex, train_w, val_w, config)
    return net, summary, None if done else time.perf_counter() - start


def main(argv=None) -> None:
    from layerroute.evaluation import evaluate, mean_interval, newcombe_interval
    from layerroute.routers.token_policy import TokenRouterPolicy
    from layerroute.routers.token_router import corpus_texts, token_windows
    from layerroute.tasks import get_task

    args = parse_config(Args, argv, __doc__.splitlines()[0])
    args.require_positive("steps", "batch_size", "max_length", "ppl_windows", "gen_limit", "suite_limit", "batch")
    lambdas = [float(x) for x in args.lambdas.split(",") if x]
    command = experiment_command(NAME, argv, args.threads)
    settings = {k: v for k, v in asdict(args).items() if k not in ("out", "headline", "threads")}
    table = Table(args, command, settings)
    ex, tok = args.executor(args.threads)
    L, c = ex.num_layers, kv_cost(ex.model)

    def compute(blocks: float, kv_kept: bool) -> float:
        return blocks + c * (L - blocks) if kv_kept else blocks

    train_w = token_windows(tok, corpus_texts(args.corpus, "search", args.seed), args.max_length)
    held = token_windows(tok, corpus_texts(args.corpus, "validation", args.seed), args.max_length,
                         limit=args.ppl_windows + args.val_windows)
    ppl_w, val_w = held[:args.ppl_windows], held[args.ppl_windows:]
    splits = {t: get_task(t).split("test", args.seed) for t in TASKS}
    limits = {"gen": args.gen_limit, "suite": args.suite_limit}
    table.extra["setup"] = (
        f"Per-token routers trained on {len(train_w)} windows of {args.max_length} tokens of the search-split texts "
        f"of {args.corpus} ({args.steps} steps of {args.batch_size} windows per lambda, lr {args.lr}, initial bias "
        f"{args.init_logit:g}, threshold {args.threshold}, kv-kept); perplexity on {len(ppl_w)} held-out windows "
        f"(validation-split texts); accuracy on the first {args.gen_limit} gen and {args.suite_limit} suite test "
        f"samples (cloze, packed). Block equivalents count kv-kept's skipped pairs at c = {c:.3f} of a block "
        f"(their K/V projections). drop_last (k) keeps the first k of {L} blocks, k = the per-token routers' "
        f"executed blocks per token on the same data, rounded. {args.threads} torch thread(s), CPU.")
    nlls: dict[str, list[float]] = {}
    correct: dict[str, list[bool]] = {}

    def ppl_row(key, method, kind, executor, route=None, note=""):
        row = table.get(key)
        if row is None:
            start = time.perf_counter()
            values = window_nlls(executor, ppl_w, route, args.batch)
            blocks = executor.executed_blocks() if hasattr(executor, "executed_blocks") else \
                float(ex.route(route).cost if route is not None else L)
            m, lo, hi = mean_interval(values)
            row = table.add({"key": key, "data": "ppl", "method": method, "kind": kind, "n": len(values),
                             "blocks": blocks, "compute": compute(blocks, kind == "per-token"),
                             "value": math.exp(m), "ci95": [math.exp(lo), math.exp(hi)], "nlls": values,
                             "seconds": time.perf_counter() - start, "note": note})
        row["method"] = method  # (a reused row takes this run's name)
        nlls[key] = row["nlls"]
        return row

    def acc_row(key, task, method, kind, policy, note=""):
        row = table.get(key)
        if row is None:
            start = time.perf_counter()
            result = evaluate(ex, tok, splits[task], policy, batch_size=args.batch, limit=limits[task],
                              progress=False)
            right = [bool(s.correct) for s in result.samples]
            row = table.add({"key": key, "data": task, "method": method, "kind": kind, "n": result.n,
                             "blocks": result.mean_blocks, "compute": compute(result.mean_blocks, kind == "per-token"),
                             "value": result.accuracy, "ci95": list(result.ci95), "correct": right,
                             "seconds": time.perf_counter() - start, "note": note})
        row["method"] = method  # (a reused row takes this run's name)
        correct[key] = row["correct"]
        return row

    # the full model
    ppl_row("ppl:full", "full model", "full", ex)
    for t in TASKS:
        acc_row(f"{t}:full", t, "full model", "full", None)

    # per-token routers, each beside drop_last at its executed share
    training, verdict = [], []
    for lam in lambdas:
        net, summary, seconds = train(args, ex, tok, lam, train_w, val_w)
        times = table.extra.setdefault("train_seconds", {})
        if seconds is not None:  # trained (or finished) by this run
            times[f"{lam:g}"] = times.get(f"{lam:g}", 0.0) + seconds
        took = f"{times[f'{lam:g}']:.0f} s" if f"{lam:g}" in times else "trained by an earlier run, reloaded"
        training.append(f"- lambda {lam:g}: held-out KL {summary['heldout_kl_start']:.3f} -> "
                        f"{summary['heldout_kl_end']:.3f} nats, executed share {summary['executed_share_start']:.2f} -> "
                        f"{summary['executed_share_end']:.2f} ({took}; "
                        f"`{table.args.path(f'{NAME}_routers/lam-{lam:g}')}`)")
        table.extra["training"] = training
        policy = TokenRouterPolicy(net)
        name = f"per-token routers, lambda {lam:g}"
        for data in ("ppl", *TASKS):
            key = f"{data}:token:{lam:g}"
            if data == "ppl":
                mine = ppl_row(key, name, "per-token", policy.token_executor(ex))
            else:
                mine = acc_row(key, data, name, "per-token", policy)
            k = max(1, min(L, round(mine["blocks"])))
            static_key, static_name = f"{data}:drop_last:{k}", f"drop_last ({k})" + (" = the full model" if k >= L else "")
            if data == "ppl":
                other = ppl_row(static_key, static_name, "static", ex, drop_last_route(ex, k))
                d = [a - b for a, b in zip(nlls[key], nlls[static_key])]
                m, lo, hi = mean_interval(d)
                mine["versus"] = f"{m:+.3f} ({lo:+.3f} to {hi:+.3f}) nats vs drop_last ({k})"
                better = "lower" if hi < 0 else ("higher" if lo > 0 else "no clear difference in")
                verdict.append(f"- Held-out text, lambda {lam:g} ({mine['blocks']:.2f} blocks/token): {better} "
                               f"perplexity than drop_last ({k}): {mine['value']:.2f} vs {other['value']:.2f}.")
            else:
                other = acc_row(static_key, data, static_name, "static", drop_last_route(ex, k))
                a, b = correct[key], correct[static_key]
                lo, hi = newcombe_interval(sum(a), len(a), sum(b), len(b))
                diff = sum(a) / len(a) - sum(b) / len(b)
                mine["versus"] = f"{100 * diff:+.1f} pts ({100 * lo:+.1f} to {100 * hi:+.1f}) vs drop_last ({k})"
                better = "beats" if lo > 0 else ("loses to" if hi < 0 else "does not clearly differ from")
                verdict.append(f"- {data}, lambda {lam:g} ({mine['blocks']:.2f} blocks/token): {better} drop_last "
                               f"({k}): {100 * mine['value']:.1f}% vs {100 * other['value']:.1f}%.")
            table.add(mine)
    table.extra["verdict"] = verdict

    # the per-sample routers' point, from the headline run (not re-measured)
    try:
        head = json.loads(Path(args.headline).read_text())
        for r in head["rows"]:
            if r.get("kind") == "router" and r["task"] in TASKS and r["mean_blocks"] < L:
                table.add({"key": f"{r['task']}:per-sample:{r.get('tau')}", "data": r["task"],
                           "method": f"per-sample {r['method']}", "kind": "per-sample", "n": r["n"],
                           "blocks": r["mean_blocks"], "compute": r["mean_blocks"], "value": r["accuracy"],
                           "ci95": list(r["ci95"]), "correct": None,
                           "note": f"from {Path(args.headline).name} ({head.get('date', '?')}; its first {r['n']} "
                                   f"test samples, not re-measured)"})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        table.extra["setup"] += f" The per-sample routers' point is missing: {args.headline} is unreadable ({exc})."
    table.write()
    plot(list(table.rows.values()), args.path(f"{NAME}.png"))
    print(args.path(f"{NAME}.md").read_text())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerroute.tables import error_bars

    style = {"full": ("k", "*"), "static": ("tab:blue", "s"), "per-token": ("tab:red", "o"),
             "per-sample": ("tab:green", "^")}
    fig, axes = plt.subplots(1, 1 + len(TASKS), figsize=(15, 4), squeeze=False)
    for ax, data in zip(axes[0], ("ppl", *TASKS)):
        for kind, (color, marker) in style.items():
            pts = sorted((r for r in rows if r["data"] == data and r["kind"] == kind), key=lambda r: r["blocks"])
            if not pts:
                continue
            x = [r["blocks"] for r in pts]
            if data == "ppl":
                y = [r["value"] for r in pts]
                err = [[r["value"] - r["ci95"][0] for r in pts], [r["ci95"][1] - r["value"] for r in pts]]
            else:
                y = [100 * r["value"] for r in pts]
                err = error_bars([r["value"] for r in pts], [r["ci95"] for r in pts])
            ax.errorbar(x, y, yerr=err, color=color, marker=marker, ls="-" if kind in ("static", "per-token") else "none",
                        capsize=2, ms=9 if kind == "full" else 6, label=kind)
            if kind == "per-token":  # the same routers' compute with kv-kept's K/V projections counted
                ax.plot([r["compute"] for r in pts], y, color=color, marker=marker, mfc="none", ls=":",
                        label="per-token, block equivalents")
        ax.set_title("held-out text" if data == "ppl" else f"{data} (test)")
        ax.set_xlabel("executed blocks per token")
        ax.set_ylabel("perplexity" if data == "ppl" else "accuracy (%)")
        if data == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)  # (the accuracy panels hold every kind)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
