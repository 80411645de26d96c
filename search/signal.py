"""``layerroute signal --task T``: can per-input routing pay on this model and task? Ask before training.

Every single edit of the full route (skip block p, or run block p twice: 2L routes) is scored on
every sample of the search split, in one pass with prefix reuse (the full route's state after
each block is computed once). One forward gives each option's log-likelihood, so the same
scores serve gold labels and null labels (a seeded random wrong option per sample). Three
figures, each with a 95% CI:

1. **Null-corrected oracle.** The share of samples that some edit answers correctly, against the
   share that some edit moves to the null option: the difference is what a per-sample oracle
   finds beyond chance.
2. **Static against per-input.** The best edit chosen on one half of the samples (by accuracy,
   then mean margin), scored on the other half against the full model: what a fixed route gives.
3. **Predictability.** The cross-validated AUC of a logistic-regression probe on the pooled
   hidden state (the mean state over the sample's tokens after the middle and the last block of
   the full route)
   that predicts per sample whether the best static edit raises that sample's gold margin;
   beside it, the AUCs of the same probe on shuffled targets (0.5 means no signal) and the
   permutation p-value.

It ends with a verdict in plain words and writes ``signal.md``, ``signal.json`` and ``signal.png``.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
from pathlib import Path

import numpy as np
import torch

from layerroute.errors import LayerRouteError
from layerroute.evaluation import newcombe_interval, wilson_interval
from layerroute.objective import Objective, PrefixState, null_option
from layerroute.store import atomic_write, atomic_write_json
from layerroute.tables import acc_ci, error_bars

MIN_SAMPLES = 20


class SignalError(LayerRouteError, ValueError):
    """A task or sample count on which the signal report cannot be made."""


def check_request(task, n: int | None) -> None:
    """Refuse a task without options, or fewer than ``MIN_SAMPLES`` samples (``n`` None: not known yet)."""
    if task.kind != "choice":
        raise SignalError(f"signal needs a task with options (gold against null labels); {task.name} is a "
                          f"{task.kind} task")
    if n is not None and n < MIN_SAMPLES:
        raise SignalError(f"signal needs at least {MIN_SAMPLES} samples to say anything; got {n} (raise --limit, "
                          f"or use a task with more search-split samples)")


def single_edits(L: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """(name, blocks of the full route kept before the change, the rest of the route) of each edit."""
    out = [(f"skip {p}", p, tuple(range(p + 1, L))) for p in range(L)]
    return out + [(f"repeat {p}", p + 1, tuple(range(p, L))) for p in range(L)]


def edit_scores(obj: Objective, edits, batch: int = 8, progress: bool = True):
    """Option log-likelihoods [N, 1 + E, K] of the full route (column 0) and each edit, and the pooled
    full-route states [N, 2H] (token mean after the middle and the last block)."""
    from tqdm.auto import tqdm

    L, lps, pooled = obj.num_layers, [], []
    for lo in tqdm(range(0, len(obj), batch), desc="signal: single edits", unit="batch", disable=not progress):
        samples = list(range(lo, min(lo + batch, len(obj))))
        start = obj.begin(samples)
        record = [[] for _ in range(start.state.hidden.shape[0])]
        full = obj.advance(start, [tuple(range(L))] * len(samples), record=record)
        after = [torch.stack([r[k - 1] for r in record]) if k else start.state.hidden for k in range(L + 1)]
        mask = start.state.attention_mask[:, -start.state.hidden.shape[1]:, None].float()
        rows = [(a * mask).sum(1) / mask.sum(1) for a in (after[L // 2], after[L])]
        owner = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(start.sizes))
        pooled.append(torch.stack([torch.cat([r[owner == j].mean(0) for r in rows]) for j in range(len(samples))]))
        cols = [obj.option_logliks(full)]
        group = max(1, obj.batch_rows // start.state.hidden.shape[0])  # edits advanced together
        for g in range(0, len(edits), group):
            part = edits[g:g + group]
            states = [PrefixState(start.samples, dataclasses.replace(start.state, hidden=after[kept]),
                                  [kept] * len(samples), start.sizes) for _, kept, _ in part]
            done = obj.advance(PrefixState.concat(states), [rest for _, _, rest in part for _ in samples])
            cols += obj.option_logliks(done).split(len(samples))
        lps.append(torch.stack(cols, 1))
    K = max(x.shape[-1] for x in lps)
    lps = [torch.nn.functional.pad(x, (0, K - x.shape[-1]), value=-float("inf")) for x in lps]
    return torch.cat(lps), torch.cat(pooled).numpy()


def margins(lp: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin of ``labels`` (one per sample) over the best other option, and whether it wins: [N, R] each."""
    idx = labels[:, None, None].expand(-1, lp.shape[1], 1)
    own = lp.gather(-1, idx).squeeze(-1)
    others = lp.scatter(-1, idx, -float("inf")).max(-1).values
    return own - others, lp.argmax(-1) == labels[:, None]


def probe_auc(x: np.ndarray, y: np.ndarray, seed: int, shuffles: int = 50) -> dict:
    """Cross-validated AUC of a logistic-regression probe predicting ``y`` from ``x``, the AUCs of
    the same probe on shuffled targets, and the permutation p-value."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pos = int(y.sum())
    if min(pos, len(y) - pos) < 5:
        return {"auc": None, "reason": f"only {min(pos, len(y) - pos)} samples in the rarer class", "positives": pos}
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))

    def auc(target):
        return float(roc_auc_score(target, cross_val_predict(probe, x, target, cv=folds, method="predict_proba")[:, 1]))

    rng = np.random.default_rng(seed)
    real, null = auc(y), [auc(rng.permutation(y)) for _ in range(shuffles)]
    return {"auc": real, "shuffled_auc_mean": float(np.mean(null)), "shuffled_auc_95": float(np.quantile(null, 0.95)),
            "p_value": (1 + sum(a >= real for a in null)) / (1 + shuffles), "positives": pos}


def _share(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "share": k / n if n else None, "ci95": [lo, hi]}


def _diff(a: dict, b: dict) -> dict:
    return {"difference": a["share"] - b["share"], "ci95": list(newcombe_interval(a["k"], a["n"], b["k"], b["n"]))}


def signal(obj: Objective, seed: int = 0, progress: bool = True) -> dict:
    """The three figures and the verdict (see the module docstring) for ``obj``'s samples."""
    check_request(obj.task, len(obj))
    L, edits = obj.num_layers, single_edits(obj.num_layers)
    lp, pooled = edit_scores(obj, edits, progress=progress)
    n = len(obj)
    gold = obj.gold_index
    null = torch.tensor([null_option(ex, seed) for ex in obj.examples])
    m_gold, c_gold = margins(lp, gold)
    m_null, c_null = margins(lp, null)
    oracle = {"gold": _share(int(c_gold.any(1).sum()), n), "null": _share(int(c_null.any(1).sum()), n),
              "full": _share(int(c_gold[:, 0].sum()), n),
              "gain_1nat_gold": _share(int(((m_gold[:, 1:] - m_gold[:, :1]) > 1).any(1).sum()), n),
              "gain_1nat_null": _share(int(((m_null[:, 1:] - m_null[:, :1]) > 1).any(1).sum()), n)}
    oracle["difference"] = _diff(oracle["gold"], oracle["null"])

    order = list(range(n))
    random.Random(f"signal:{seed}").shuffle(order)
    a, b = torch.tensor(sorted(order[: n // 2])), torch.tensor(sorted(order[n // 2:]))
    key = c_gold[a, 1:].float().mean(0) * 1e3 + m_gold[a, 1:].mean(0)  # accuracy first, then mean margin
    best = int(key.argmax())
    static = {"edit": edits[best][0], "chosen_on": len(a), "scored_on": len(b),
              "edit_accuracy": _share(int(c_gold[b, 1 + best].sum()), len(b)),
              "full_accuracy": _share(int(c_gold[b, 0].sum()), len(b)),
              "oracle_gold": _share(int(c_gold[b].any(1).sum()), len(b)),
              "oracle_null": _share(int(c_null[b].any(1).sum()), len(b))}
    static["difference"] = _diff(static["edit_accuracy"], static["full_accuracy"])
    y = ((m_gold[:, 1 + best] - m_gold[:, 0]) > 0).numpy().astype(int)
    probe = {"target": f"the best static edit ({edits[best][0]}) raises the sample's gold margin",
             **probe_auc(pooled, y, seed)}
    report = {"task": obj.task.name, "samples": n, "num_layers": L, "edits": len(edits), "seed": seed,
              "oracle": oracle, "static": static, "probe": probe}
    report["verdict"] = verdict(report)
    return report


def verdict(r: dict) -> str:
    """The report's conclusion in plain words."""
    o, s, p = r["oracle"], r["static"], r["probe"]
    beyond = o["difference"]["ci95"][0] > 0
    predictable = p.get("auc") is not None and p["p_value"] < 0.05
    static_helps = s["difference"]["ci95"][0] > 0
    words = [f"A per-sample oracle over single edits answers {100 * o['gold']['share']:.0f}% of the samples, and "
             f"reaches a random wrong option on {100 * o['null']['share']:.0f}%: "
             + ("it finds more than chance." if beyond else "what it finds is indistinguishable from chance.")]
    if p.get("auc") is None:
        words.append(f"The probe could not be fitted ({p['reason']}).")
    else:
        words.append(f"Whether the best static edit helps a sample is {'' if predictable else 'not '}predictable from "
                     f"its hidden state (AUC {p['auc']:.2f}, shuffled {p['shuffled_auc_mean']:.2f}, "
                     f"p = {p['p_value']:.2f}).")
    words.append(f"The best static edit ({s['edit']}), chosen on one half, scores "
                 f"{100 * s['edit_accuracy']['share']:.0f}% on the other half against {100 * s['full_accuracy']['share']:.0f}% "
                 f"for the full model" + (": a fixed route already helps." if static_helps else "."))
    if beyond and predictable:
        words.append("Verdict: per-input routing has a learnable signal here; training routers can pay.")
    else:
        words.append("Verdict: no predictable per-input signal on this model and task; routers would learn chance. "
                     "Use the full model or a static route.")
    return " ".join(words)


def _pct(s: dict) -> str:
    return f"{acc_ci(s['share'], s['ci95'])}, n={s['n']}"


def render(r: dict, command: str) -> str:
    o, s, p = r["oracle"], r["static"], r["probe"]
    d, sd = o["difference"], s["difference"]
    lines = [f"# Routing signal: {r['task']} ({r['samples']} search-split samples, {r['edits']} single edits of the "
             f"{r['num_layers']}-block route)", "", f"Command: `{command}` ({datetime.date.today()})", "",
             "| figure | value (95% CI) |", "|---|---|",
             f"| full model accuracy | {_pct(o['full'])} |",
             f"| ORACLE: some edit answers correctly (gold labels) | {_pct(o['gold'])} |",
             f"| chance: some edit picks the null option (a random wrong one) | {_pct(o['null'])} |",
             f"| gold - null | {100 * d['difference']:+.1f} pts ({100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}) |",
             f"| ORACLE: some edit raises the gold margin > 1 nat / the null margin > 1 nat | "
             f"{_pct(o['gain_1nat_gold'])} / {_pct(o['gain_1nat_null'])} |",
             f"| best static edit, chosen on {s['chosen_on']} samples: `{s['edit']}`, on the other {s['scored_on']} | "
             f"{_pct(s['edit_accuracy'])} |",
             f"| full model on the same {s['scored_on']} | {_pct(s['full_accuracy'])} |",
             f"| static edit - full model | {100 * sd['difference']:+.1f} pts ({100 * sd['ci95'][0]:+.1f} to "
             f"{100 * sd['ci95'][1]:+.1f}) |",
             f"| per-sample oracle on the same {s['scored_on']}: gold / null | {_pct(s['oracle_gold'])} / "
             f"{_pct(s['oracle_null'])} |"]
    return "\n".join(lines + [_probe_row(p, r["samples"]), "", r["verdict"], ""])


def _probe_row(p: dict, samples: int) -> str:
    if p.get("auc") is None:
        return f"| probe AUC | n/a: {p['reason']} |"
    return (f"| probe AUC (5-fold CV; target: {p['target']}, {p['positives']} of {samples} positive) | "
            f"{p['auc']:.3f}; shuffled targets {p['shuffled_auc_mean']:.3f} (95th percentile "
            f"{p['shuffled_auc_95']:.3f}), permutation p = {p['p_value']:.3f} |")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o, s = r["oracle"], r["static"]
    bars = [("full model", o["full"]), ("ORACLE gold", o["gold"]), ("null (chance)", o["null"]),
            (f"static: {s['edit']}\n(other half)", s["edit_accuracy"]), ("full\n(other half)", s["full_accuracy"])]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (name, v) in enumerate(bars):
        ax.bar(i, 100 * v["share"], color="C1" if "null" in name else "C0")
        ax.errorbar(i, 100 * v["share"], yerr=error_bars([v["share"]], [v["ci95"]]), color="k", capsize=4)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("% of samples (95% CI)")
    auc = r["probe"].get("auc")
    ax.set_title(f"{r['task']}: routing signal" + (f" (probe AUC {auc:.2f})" if auc is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(r: dict, out, command: str) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = render(r, command)
    plot(r, out / "signal.png")
    atomic_write_json(out / "signal.json", {"command": command, "date": str(datetime.date.today()), **r})
    atomic_write(out / "signal.md", text)
    return text
