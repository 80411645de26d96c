"""``layerroute analyze STORE``: what an MCTS store says about routing, read against chance.

MCTS reads each sample's label, so its figures are ORACLE upper bounds. Every figure is printed
beside its chance level: the same search run against null labels (``--null``: a seeded random
wrong option per sample), whose store is given with ``--null`` (default: the folder ``STORE-null``
beside ``STORE``), and the difference of the two with a 95% CI. From the per-sample records:

* the share of samples whose best route is correct, against the full model's accuracy;
* the share of originally wrong samples that some route makes correct (CoLa reports over 60%);
* the share of originally correct samples for which a shorter route stays correct (CoLa: over 75%);
* the share whose best route moves the margin more than 1 nat toward the label, and the mean gain;
* label statistics: executed share, the share that skip block 0, and the robust filter's
  threshold and the share of samples it keeps (``layerroute.search.labels``);
* per-layer action frequencies of the best routes (skip / execute / repeat: 0, 1, 2+ passes)
  as a heatmap PNG, and histograms of margin gains, gold against null.

Prints a table and writes ``analyze.md``, ``actions.png`` and ``rewards.png`` to the output folder
(default: the store's folder).
"""

from __future__ import annotations

from pathlib import Path

from layerroute.errors import LayerRouteError
from layerroute.evaluation import mean_interval, newcombe_interval
from layerroute.tables import pct, row, share
from layerroute.store import atomic_write, read_store

from .labels import check_pair, margin_gain, null_store_for, null_threshold, null_twin, robust_layers

ACTIONS = ("skip", "execute", "repeat")


class AnalyzeError(LayerRouteError, ValueError):
    """A store that analyze cannot read: not an MCTS store, or no finished samples."""


def load_mcts(path) -> tuple[dict, list[dict]]:
    """The header and the finished per-sample records of an MCTS store."""
    header, records = read_store(path)
    if header.get("kind") != "search:mcts":
        raise AnalyzeError(f"{path} is a {header.get('kind')!r} store, not an MCTS one; make one with "
                           f"`layerroute search mcts --task T --output DIR`")
    recs = [r for r in records if isinstance(r, dict) and "identity" in r and "layers" in r]
    if not recs:
        raise AnalyzeError(f"{path} has no finished MCTS samples yet")
    return header, recs


def load_pair(store, null=None) -> tuple[dict, list[dict], list[dict]]:
    """The gold store's header and the records of the gold and null searches on their common samples."""
    header, gold = load_mcts(store)
    null = null or null_store_for(store)
    if null is None:
        raise AnalyzeError(f"an oracle figure needs its chance level: run the same search with --null --output "
                           f"{null_twin(store)}, or give its store with --null")
    null_header, nulls = load_mcts(null)
    check_pair(header, null_header, store, null)
    by_key = {r["key"]: r for r in nulls}
    common = [r for r in gold if r["key"] in by_key]
    if not common:
        raise AnalyzeError(f"{store} and {null} have no finished sample in common")
    return header, common, [by_key[r["key"]] for r in common]


def _shares(records: list[dict], L: int) -> dict[str, tuple[int, int]]:
    """(count, n) of each label-relative event (the same definitions for gold and null labels)."""
    right = [r for r in records if r["identity"]["correct"]]
    wrong = [r for r in records if not r["identity"]["correct"]]
    gains = [margin_gain(r) for r in records]
    return {
        "best route correct": (sum(bool(r["correct"]) for r in records), len(records)),
        "full route correct": (len(right), len(records)),
        "wrong made correct": (sum(r["shortest_correct_blocks"] is not None for r in wrong), len(wrong)),
        "correct stays correct shorter": (sum((r["shortest_correct_blocks"] or L) < L for r in right), len(right)),
        "gain above 1 nat": (sum(g > 1.0 for g in gains), len(gains)),
    }


def compare(gold: list[dict], null: list[dict], L: int) -> dict:
    """Gold and null figures on the same samples, and the robust filter's threshold and keep rate."""
    threshold = null_threshold(null)
    robust = [robust_layers(r, threshold, L) for r in gold]

    def label_stats(routes):
        n = len(routes)
        return {"executed_share": sum(len(x) for x in routes) / (n * L),
                "skip_block_0": sum(0 not in x for x in routes) / n,
                "with_repeat": sum(len(set(x)) < len(x) for x in routes) / n}

    return {"samples": len(gold), "num_layers": L, "gold": _shares(gold, L), "null": _shares(null, L),
            "gain": {"gold": mean_interval([margin_gain(r) for r in gold]),
                     "null": mean_interval([margin_gain(r) for r in null])},
            "threshold": threshold, "kept": sum(x != tuple(range(L)) for x in robust),
            "best_routes": label_stats([tuple(r["layers"]) for r in gold]), "robust_labels": label_stats(robust)}


def analyze(records: list[dict], num_layers: int) -> dict:
    """The oracle figures (see the module docstring); shares are None where they have no samples."""
    L, n = num_layers, len(records)
    has_correct = records[0].get("correct") is not None
    out = {"samples": n, "num_layers": L, "has_correct": has_correct,
           "mean_best_blocks": sum(r["blocks"] for r in records) / n,
           "mean_blocks_saved": sum(L - r["blocks"] for r in records) / n,
           "mean_best_reward": sum(r["reward"] for r in records) / n}
    out["mean_best_margin"] = sum(r["margin"] for r in records) / n
    out["mean_identity_margin"] = sum(r["identity"]["margin"] for r in records) / n
    out["share_margin_improved"] = sum(r["margin"] > r["identity"]["margin"] for r in records) / n
    ids = [r["identity"]["reward"] for r in records if r["identity"]["reward"] is not None]
    out["mean_identity_reward"] = sum(ids) / len(ids) if ids else None
    out["share_reward_improved"] = (sum(r["reward"] > r["identity"]["reward"] for r in records
                                        if r["identity"]["reward"] is not None) / len(ids)) if ids else None
    if has_correct:
        right = [r for r in records if r["identity"]["correct"]]
        wrong = [r for r in records if not r["identity"]["correct"]]
        shorter = [r for r in right if r["shortest_correct_blocks"] is not None and r["shortest_correct_blocks"] < L]
        fixed = [r for r in wrong if r["shortest_correct_blocks"] is not None]
        out.update(identity_correct=len(right), identity_wrong=len(wrong), shorter_correct=len(shorter),
                   share_correct_stay_correct_shorter=len(shorter) / len(right) if right else None,
                   share_wrong_made_correct=len(fixed) / len(wrong) if wrong else None,
                   identity_accuracy=len(right) / n, oracle_accuracy=sum(bool(r["correct"]) for r in records) / n,
                   mean_blocks_saved_shortest_correct=(sum(L - r["shortest_correct_blocks"] for r in shorter) /
                                                       len(shorter)) if shorter else None)
    freq = [[0.0] * L for _ in ACTIONS]
    for r in records:
        counts = [0] * L
        for b in r["layers"]:
            counts[b] += 1
        for layer, c in enumerate(counts):
            freq[min(c, 2)][layer] += 1 / n
    out["action_frequencies"] = {a: f for a, f in zip(ACTIONS, freq)}
    return out


def _diff(g: tuple[int, int], z: tuple[int, int]) -> str:
    if not g[1] or not z[1]:
        return "n/a"
    lo, hi = newcombe_interval(g[0], g[1], z[0], z[1])
    return f"{100 * (g[0] / g[1] - z[0] / z[1]):+.1f} pts ({100 * lo:+.1f} to {100 * hi:+.1f})"


FIGURES = [("best route correct", "ORACLE accuracy: the best route picks the label"),
           ("full route correct", "the full model picks the label (no search)"),
           ("wrong made correct", "ORACLE: wrong under the full route, some route makes it correct (CoLa: >60%)"),
           ("correct stays correct shorter", "ORACLE: correct under the full route, a shorter route stays correct "
                                             "(CoLa: >75%)"),
           ("gain above 1 nat", "ORACLE: the best route moves the margin > 1 nat toward the label")]


def report(store, output=None, null=None) -> str:
    """Analyze ``store`` against its null search; write analyze.md and the PNGs to ``output``
    (default: the store's folder)."""
    header, gold, nulls = load_pair(store, null)
    L = int((header.get("model") or {}).get("num_layers") or gold[0]["num_layers"])
    if gold[0].get("correct") is None:
        raise AnalyzeError(f"{store} is from a task without options; gold against null needs a choice task")
    c = compare(gold, nulls, L)
    store = Path(store)
    out = Path(output) if output else (store if store.is_dir() else store.parent)
    out.mkdir(parents=True, exist_ok=True)
    text = _report_text(header, c, L, f"Store: `{store}` against `{null or null_store_for(store)}`")
    _plots(gold, nulls, c, L, out)
    atomic_write(out / "analyze.md", text + "\n")
    return text


def _report_text(header: dict, c: dict, L: int, stores: str) -> str:
    """analyze.md: the figures gold against null, then the robust labels."""
    st, n = header.get("settings", {}), c["samples"]
    rows = ["# MCTS analysis: gold labels against null labels (ORACLE upper bounds beside their chance level)", "",
            f"{stores}; task {header.get('task')}, split "
            f"{header.get('split')}, seed {header.get('seed')}, space {st.get('space')}, {st.get('simulations')} "
            f"simulations, reward {st.get('reward', 'margin')}, lambda {st.get('lam', 0)}, budget "
            f"{st.get('budget') or 'none'}; {n} samples in both, L = {L}. Null: the same search with each label "
            f"replaced by a seeded random wrong option, so its figure is what chance alone reaches. 95% CIs: "
            f"Wilson, and Newcombe for the difference.", "",
            "| figure | gold (ORACLE) | null (chance) | gold - null |", "|---|---|---|---|"]
    for key, text in FIGURES:
        rows.append(row(text, share(*c['gold'][key]), share(*c['null'][key]), _diff(c['gold'][key], c['null'][key])))
    (gm, glo, ghi), (zm, zlo, zhi) = c["gain"]["gold"], c["gain"]["null"]
    rows += [f"| ORACLE: mean margin gain of the best route (nats) | {gm:.3f} ({glo:.3f} to {ghi:.3f}) | "
             f"{zm:.3f} ({zlo:.3f} to {zhi:.3f}) | {gm - zm:+.3f} |", "",
             f"**Robust labels.** Threshold: a margin gain of {c['threshold']:.3f} nats, which at most 5% of the null "
             f"samples exceed. Samples whose best route gains more keep it as their label: {share(c['kept'], n)}; "
             f"the others are labelled with the full route.", "",
             "| labels | executed share of blocks | skip block 0 | contain a repeat |", "|---|---|---|---|"]
    for name, key in (("best routes (raw ORACLE labels)", "best_routes"), ("robust labels", "robust_labels")):
        ls = c[key]
        rows.append(row(name, pct(ls['executed_share']), pct(ls['skip_block_0']), pct(ls['with_repeat'])))
    rows += ["", "Per-layer actions of the best routes: `actions.png`; margin gains, gold and null: `rewards.png`.", ""]
    return "\n".join(rows)


def _plots(gold, nulls, c: dict, L: int, out: Path) -> None:
    """actions.png (per-layer actions of the best routes) and rewards.png (margin gains, gold and null)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freq = [analyze(gold, L)["action_frequencies"][k] for k in ACTIONS]
    fig, ax = plt.subplots(figsize=(max(6, L * 0.3), 2.4))
    im = ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(3), ACTIONS)
    ax.set_xlabel("layer")
    ax.set_title(f"Best-route action frequency per layer (ORACLE, n={c['samples']})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "actions.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([[margin_gain(r) for r in gold], [margin_gain(r) for r in nulls]], bins=30,
            label=["gold labels (ORACLE)", "null labels (chance)"])
    ax.axvline(c["threshold"], color="k", ls="--", label="robust threshold")
    ax.set_xlabel("margin gain of the best route over the full route (nats)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=100)
    plt.close(fig)
