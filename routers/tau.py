"""The routers' confidence threshold tau, chosen on the validation split.

A block is skipped or repeated only where the router's probability for that action exceeds
tau; otherwise it executes (``routers/network.py``), so tau = 1 is the full model. ``sweep_tau``
scores the routers at each tau of a grid on validation examples (never trained on, never the
test split); ``choose_tau`` takes the tau that saves the most compute (the fewest mean executed
blocks; ties: the larger tau) while validation accuracy stays within ``epsilon`` of the full
model's on the same examples. tau = 1 always qualifies, so a choice always exists.
"""

from __future__ import annotations

TAU_GRID = (1.0, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


def sweep_tau(net, executor, tokenizer, task, grid=TAU_GRID, *, limit: int | None = None, batch_size: int = 16,
              progress: bool = False) -> list[dict]:
    """Accuracy (95% CI), mean blocks and n of the routers at each tau on ``task``'s (first ``limit``)
    examples."""
    from layerroute.evaluation import evaluate

    from .routed_model import RouterPolicy

    rows = []
    for tau in sorted(set(grid), reverse=True):
        r = evaluate(executor, tokenizer, task, RouterPolicy(net, tau=tau), batch_size=batch_size, limit=limit,
                     progress=progress)
        rows.append({"tau": tau, "accuracy": r.accuracy, "ci95": list(r.ci95) if r.ci95 else None,
                     "mean_blocks": r.mean_blocks, "n": r.n})
    return rows


def choose_tau(rows: list[dict], epsilon: float = 0.01) -> dict:
    """The row of ``rows`` (one with tau = 1) with the fewest mean blocks whose accuracy is at most
    ``epsilon`` below the tau = 1 row's (the full model's)."""
    full = next(r for r in rows if r["tau"] == 1.0)
    ok = [r for r in rows if r["accuracy"] >= full["accuracy"] - epsilon - 1e-12]
    return min(ok, key=lambda r: (r["mean_blocks"], -r["tau"]))


def calibrate_tau(net, executor, tokenizer, task, seed: int = 0, *, limit: int | None = 100,
                  epsilon: float = 0.01, grid=TAU_GRID, batch_size: int = 16) -> dict:
    """Sweep tau on ``task``'s validation split, set the chosen tau in ``net.config`` and record the
    sweep in its ``training``; return ``{"tau", "epsilon", "chosen", "sweep"}``."""
    val = task.split("validation", seed)
    rows = sweep_tau(net, executor, tokenizer, val, grid, limit=limit, batch_size=batch_size)
    chosen = choose_tau(rows, epsilon)
    net.config.tau = chosen["tau"]
    out = {"tau": chosen["tau"], "epsilon": epsilon, "split": "validation", "chosen": chosen, "sweep": rows}
    net.config.training = {**net.config.training, "tau": out}
    return out
