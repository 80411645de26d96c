"""``layerroute analyze STORE``: what an MCTS store says about routing (ORACLE figures: MCTS read the labels).

From the per-sample records of ``layerroute search mcts``:

* the share of originally correct samples (identity route correct) for which some scored route
  with fewer blocks stays correct (CoLa reports over 75%);
* the share of originally wrong samples that some scored route makes correct (CoLa: over 60%);
* the mean blocks saved by the best route (and by the shortest correct route);
* per-layer action frequencies of the best routes (skip / execute / repeat: 0, 1, 2+ passes)
  as a heatmap PNG, and a histogram of best against identity rewards.

Prints a table and writes ``analyze.md``, ``actions.png`` and ``rewards.png`` to the output folder
(default: the store's folder).
"""

from __future__ import annotations

from pathlib import Path

from layerroute.errors import LayerRouteError
from layerroute.store import atomic_write, read_store

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


def _fmt(x, pct=False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}" if isinstance(x, float) else str(x)


def _share(x, n) -> str:
    """A share with its 95% Wilson interval."""
    from layerroute.evaluation import wilson_interval

    if x is None or not n:
        return "n/a"
    lo, hi = wilson_interval(round(x * n), n)
    return f"{100 * x:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f})"


def report(store, output=None) -> str:
    """Analyze ``store``; write analyze.md and the PNGs to ``output`` (default: the store's folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, records = load_mcts(store)
    L = int((header.get("model") or {}).get("num_layers") or records[0]["num_layers"])
    a = analyze(records, L)
    store = Path(store)
    out = Path(output) if output else (store if store.is_dir() else store.parent)
    out.mkdir(parents=True, exist_ok=True)
    settings = header.get("settings", {})
    n = a["samples"]
    rows = ["# MCTS analysis (ORACLE: the search read each sample's label; upper bounds, not results)", "",
            f"Store: `{store}`; task {header.get('task')}, split {header.get('split')}, seed {header.get('seed')}, "
            f"space {settings.get('space')}, {settings.get('simulations')} simulations, reward "
            f"{settings.get('reward', 'margin')}, lambda {settings.get('lam', settings.get('lambda', 0))}, budget "
            f"{settings.get('budget') or 'none'}; {n} samples, L = {L}."
            + (" Under a budget below L the identity route is not allowed (its reward is n/a) and every scored "
               "route is shorter than it; margins compare them." if settings.get("budget") else ""), "",
            "| figure | value | n |", "|---|---|---|"]
    if a["has_correct"]:
        rows += [f"| ORACLE: originally correct samples with a shorter route that stays correct (CoLa: >75%) | "
                 f"{_share(a['share_correct_stay_correct_shorter'], a['identity_correct'])} | {a['identity_correct']} |",
                 f"| ORACLE: originally wrong samples that some route makes correct (CoLa: >60%) | "
                 f"{_share(a['share_wrong_made_correct'], a['identity_wrong'])} | {a['identity_wrong']} |",
                 f"| identity accuracy / ORACLE accuracy of the best routes | {_fmt(a['identity_accuracy'], True)} / "
                 f"{_fmt(a['oracle_accuracy'], True)} | {n} |",
                 f"| mean blocks saved by the shortest correct route (where shorter) | "
                 f"{_fmt(a['mean_blocks_saved_shortest_correct'])} | {a['shorter_correct']} |"]
    rows += [f"| mean blocks saved by the best route | {_fmt(a['mean_blocks_saved'])} of {L} | {n} |",
             f"| mean reward: best (ORACLE) / identity | {_fmt(a['mean_best_reward'])} / "
             f"{_fmt(a['mean_identity_reward'])} | {n} |",
             f"| share of samples whose best reward beats the identity route's | "
             f"{_fmt(a['share_reward_improved'], True)} | {n} |",
             f"| mean margin: best (ORACLE) / identity | {_fmt(a['mean_best_margin'])} / "
             f"{_fmt(a['mean_identity_margin'])} | {n} |",
             f"| share of samples whose best route's margin beats the identity route's | "
             f"{_share(a['share_margin_improved'], n)} | {n} |", "",
             "Per-layer actions of the best routes: `actions.png`; rewards: `rewards.png`.", ""]
    text = "\n".join(rows)

    freq = [a["action_frequencies"][k] for k in ACTIONS]
    fig, ax = plt.subplots(figsize=(max(6, L * 0.3), 2.4))
    im = ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(3), ACTIONS)
    ax.set_xlabel("layer")
    ax.set_title(f"Best-route action frequency per layer (ORACLE, n={n})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "actions.png", dpi=100)
    plt.close(fig)

    field = "reward" if all(r["identity"]["reward"] is not None for r in records) else "margin"
    best = [r[field] for r in records]
    ident = [r["identity"][field] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([best, ident], bins=30, label=["best route (ORACLE)", "identity route"])
    ax.set_xlabel(field)
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=100)
    plt.close(fig)
    atomic_write(out / "analyze.md", text + "\n")
    return text
