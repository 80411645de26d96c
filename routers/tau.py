"""The routers' confidence threshold tau, chosen on the validation split.

A block is skipped or repeated only where the router's probability for that action exceeds
tau; otherwise it executes (``routers/network.py``), so tau = 1 is the full model. ``sweep_tau``
scores the routers at each tau of a grid on validation examples (never trained on, never the
test split); ``choose_tau`` takes the tau that saves the most compute (the fewest mean executed
blocks; ties: the larger tau) while validation accuracy stays within ``epsilon`` of the full
model's on the same examples. tau = 1 always qualifies, so a choice always exists.

By default "within epsilon" must hold with 95% confidence (rule ``bound``: the upper end of the
paired CI of the accuracy loss), not just as measured (rule ``point``). Measured on gen (150
validation samples): the point rule took tau 0.5 for a 0.7-point validation loss, which cost 5.4
points on the test split (``experiments/results/headline.md``); a router that falls back to the full
model when unsure must not be tuned on noise.
"""

from __future__ import annotations

RULES = ("bound", "point")
TAU_GRID = (1.0, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


def edit_probability(net, executor, tokenizer, task, *, batch_size: int = 16, chat: bool = True) -> dict[str, float]:
    """Per example uid: the largest skip or repeat probability of the routers along the full route.

    A walk at tau follows the full route until the first block where a skip or repeat beats tau,
    so its route is the full route exactly when this probability is at most tau."""
    from layerroute.scoring import encode_texts, left_pad, task_prompts

    from .network import walk

    out = {}
    for i in range(0, len(task.examples), batch_size):
        batch = task.examples[i:i + batch_size]
        ids, mask = left_pad(encode_texts(tokenizer, task_prompts(tokenizer, task, batch, chat)), tokenizer,
                             executor.device)
        probs = walk(executor, ids, mask, net, budget=None, tau=1.0).logits.float().softmax(-1)
        top = probs[..., [0, 2]].amax(dim=(1, 2))
        out.update({ex.uid: float(p) for ex, p in zip(batch, top)})
    return out


def sweep_tau(net, executor, tokenizer, task, grid=TAU_GRID, *, limit: int | None = None, batch_size: int = 16,
              progress: bool = False) -> list[dict]:
    """Accuracy (95% CI), mean blocks and n of the routers at each tau on ``task``'s (first ``limit``)
    examples.

    The same figures as evaluating ``RouterPolicy(net, tau=tau)`` at each tau, for less: the full
    route is scored once, and at each tau only the examples whose routers would leave the full
    route (``edit_probability`` above tau) are walked and scored again."""
    import dataclasses

    from layerroute.evaluation import evaluate, limit_examples, mean_interval, wilson_interval

    from .routed_model import RouterPolicy

    task = dataclasses.replace(task, examples=limit_examples(task.examples, limit))
    ev = dict(batch_size=batch_size, progress=progress)
    full = {s.uid: s for s in evaluate(executor, tokenizer, task, None, **ev).samples}
    budgeted = net.config.budget is not None  # a budget can force edits: every example is walked
    top = {} if budgeted else edit_probability(net, executor, tokenizer, task, batch_size=batch_size)
    rows = []
    for tau in sorted(set(grid), reverse=True):
        moved = tuple(ex for ex in task.examples if budgeted or top[ex.uid] > tau)
        scores = dict(full)
        if moved:
            sub = dataclasses.replace(task, examples=moved)
            scores.update({s.uid: s for s in evaluate(executor, tokenizer, sub, RouterPolicy(net, tau=tau),
                                                      **ev).samples})
        judged = [u for u, s in scores.items() if s.correct is not None]
        right = sum(scores[u].correct for u in judged)
        loss = [float(full[u].correct) - float(scores[u].correct) for u in judged]  # paired, per sample
        rows.append({"tau": tau, "accuracy": right / len(judged) if judged else None,
                     "ci95": list(wilson_interval(right, len(judged))) if judged else None,
                     "loss_bound": (mean_interval(loss)[2] if any(loss) else 0.0) if judged else None,
                     "mean_blocks": sum(s.blocks for s in scores.values()) / len(scores), "n": len(scores),
                     "rerouted": len(moved)})
    return rows


def choose_tau(rows: list[dict], epsilon: float = 0.01, rule: str = "bound") -> dict:
    """The row of ``rows`` (one with tau = 1) with the fewest mean blocks (ties: the larger tau) whose
    accuracy loss against the tau = 1 row (the full model) is at most ``epsilon``: with ``rule``
    "bound", the upper end of the loss's paired 95% CI (``loss_bound``: with too few samples to
    tell, the full model is kept); with "point", the loss as measured."""
    if rule not in RULES:
        raise ValueError(f"unknown tau rule {rule!r}; use one of {', '.join(RULES)}")
    full = next(r for r in rows if r["tau"] == 1.0)
    if rule == "bound":
        ok = [r for r in rows if r["tau"] == 1.0 or r["loss_bound"] <= epsilon + 1e-12]
    else:
        ok = [r for r in rows if r["accuracy"] >= full["accuracy"] - epsilon - 1e-12]
    return min(ok, key=lambda r: (r["mean_blocks"], -r["tau"]))


def calibrate_tau(net, executor, tokenizer, task, seed: int = 0, *, limit: int | None = 100,
                  epsilon: float = 0.01, grid=TAU_GRID, batch_size: int = 16, rule: str = "bound") -> dict:
    """Sweep tau on ``task``'s validation split, set the chosen tau in ``net.config`` and record the
    sweep in its ``training``; return ``{"tau", "epsilon", "chosen", "sweep"}``."""
    val = task.split("validation", seed)
    rows = sweep_tau(net, executor, tokenizer, val, grid, limit=limit, batch_size=batch_size)
    chosen = choose_tau(rows, epsilon, rule)
    net.config.tau = chosen["tau"]
    out = {"tau": chosen["tau"], "epsilon": epsilon, "rule": rule, "split": "validation", "chosen": chosen,
           "sweep": rows}
    net.config.training = {**net.config.training, "tau": out}
    return out


def describe(cal: dict) -> str:
    """One line on a ``calibrate_tau`` result, for the commands that choose tau."""
    full, chosen = next(r for r in cal["sweep"] if r["tau"] == 1.0), cal["chosen"]
    rule = ("the upper end of the paired 95% CI of the accuracy loss" if cal.get("rule", "bound") == "bound"
            else "the accuracy loss as measured")
    return (f"tau {cal['tau']:g}: chosen on {chosen['n']} validation samples as the most compute saved while {rule} "
            f"stays within {100 * cal['epsilon']:g} point(s) of the full model ({100 * chosen['accuracy']:.1f}% at "
            f"{chosen['mean_blocks']:.2f} blocks; full model {100 * full['accuracy']:.1f}% at "
            f"{full['mean_blocks']:.0f})")
