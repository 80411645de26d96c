"""PPO in the edit space: a learning curve of validation reward against the best static edit.

    OMP_NUM_THREADS=1 nohup python -m layerroute.experiments.ppo_edit --out experiments/results \
        > runs/ppo_edit.log 2>&1 &

The ``edit`` env (``layerroute.envs.mdp``): an episode makes at most K edits (skip or repeat one
block) of the full route, then stops; its reward is the margin gain over the full route minus
``lam x (blocks - L) / L``. PPO trains on ``--search-limit`` search-split samples. Before training,
every ``--eval-every`` steps and at the end, a ``ValidationCallback`` runs the greedy policy on the
first ``--val-limit`` validation-split samples (same reward). The reference line is the **best
static edit**: each of the 2L single edits applied to every sample, scored on the first
``--static-limit`` search samples; the best there is scored on validation. Doing nothing (the full
route) scores 0. Resumable (the store and SB3 checkpoints are under ``--run-dir``); writes
``OUT/<name>.md``, ``.json`` and ``.png`` (``--out``; the committed ones: ``--out experiments/results``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from layerroute.config import parse_config
from layerroute.experiments import SeededArgs, experiment_command
from layerroute.search.base import SearchError, option


@dataclass
class Args(SeededArgs):
    task: str = option("gen", "the task (see `layerroute tasks`)")
    lam: float = option(1.0, "compute penalty: reward = margin gain - lam x (blocks - L) / L")
    max_edits: int = option(4, "K: edits per episode")
    search_limit: int = option(256, "search-split samples PPO trains on")
    static_limit: int = option(32, "the first search-split samples every single static edit is scored on")
    val_limit: int = option(64, "validation-split samples of the learning curve")
    timesteps: int = option(4096, "PPO environment steps")
    eval_every: int = option(512, "environment steps between validation evaluations")
    n_envs: int = option(16, "episodes advanced together")
    n_steps: int = option(16, "steps per env per PPO rollout")
    batch_size: int = option(128, "PPO minibatch")
    lr: float = option(1e-3, "PPO learning rate")
    obs_dim: int = option(16, "principal components per observed state")
    batch_rows: int = option(64, "token rows per executor call")
    run_dir: str = option("runs/ppo_edit", "folder of the resumable store and checkpoints")
    name: str = option("ppo_edit", "writes OUT/<name>.md, .json and .png")

    def validate(self) -> None:
        self.require_positive("max_edits", "search_limit", "static_limit", "val_limit", "timesteps", "eval_every",
                              "n_envs", "n_steps", "batch_size", "obs_dim", "batch_rows", "threads", error=SearchError)
        if self.static_limit > self.search_limit:
            raise SearchError("--static-limit must be at most --search-limit (static edits are scored on search "
                              "samples)")
        if not (math.isfinite(self.lam) and self.lam >= 0 and self.lr > 0):
            raise SearchError("--lam must be a finite number >= 0 and --lr above 0")


def edit_name(action: int, L: int) -> str:
    return f"skip block {action}" if action < L else f"repeat block {action - L}"


def single_edit(action: int, L: int):
    """A greedy ``act`` for ``RoutingCore.rollout``: make edit ``action``, then stop."""
    return lambda obs: np.where(obs[:, -2] > 0, 2 * L, action)  # obs[:, -2]: edits made so far / L


def paired(a, b) -> tuple[float, float, float]:
    """Mean of a - b over the same samples, with a normal 95% interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(curve: list[dict], ref: dict) -> list[str]:
    """Plain-words reading: does validation reward rise, and does PPO beat the static edit?"""
    first, last = curve[0], curve[-1]
    rise = paired(last["rewards"], first["rewards"])
    gap = paired(last["rewards"], ref["rewards"])
    zero = paired(last["rewards"], [0.0] * len(last["rewards"]))
    best = max(curve, key=lambda c: c["mean_reward"])
    worst = min(curve, key=lambda c: c["mean_reward"])
    word = ("**rises**" if rise[1] > 0 else "**falls**" if rise[2] < 0 else
            "**does not rise measurably** (the change is within its 95% interval of 0)")
    lines = [f"- Validation reward {word} from the untrained policy's: {first['mean_reward']:+.4f} before training, "
             f"{last['mean_reward']:+.4f} after {last['timesteps']} steps (change {rise[0]:+.4f}, paired 95% CI "
             f"{rise[1]:+.4f} to {rise[2]:+.4f}); best point {best['mean_reward']:+.4f} at {best['timesteps']} steps, "
             f"worst {worst['mean_reward']:+.4f} at {worst['timesteps']}. The final policy makes "
             f"{last['mean_edits']:.2f} edits per sample (the untrained one {first['mean_edits']:.2f}) and runs "
             f"{last['mean_blocks']:.2f} blocks."]
    side = "above" if gap[1] > 0 else "below" if gap[2] < 0 else "not distinguishable from"
    lines.append(f"- Against the best static edit ({ref['edit']}, {ref['mean_reward']:+.4f} on validation): the final "
                 f"policy is **{side}** it (difference {gap[0]:+.4f}, paired 95% CI {gap[1]:+.4f} to {gap[2]:+.4f}).")
    side = "above" if zero[1] > 0 else "below" if zero[2] < 0 else "not distinguishable from"
    lines.append(f"- Against doing nothing (the full route, reward 0): the final policy is **{side}** it "
                 f"(95% CI {zero[1]:+.4f} to {zero[2]:+.4f}).")
    return lines


def render(args: Args, command: str, L: int, statics: list[dict], ref: dict, full_acc: float, curve: list[dict],
           train: list[dict], wall: float, date: str) -> tuple[str, dict]:
    top = sorted(statics, key=lambda r: -r["mean_reward"])[:5]
    lines = [f"# PPO in the edit space on `{args.task}` ({args.model})", "", f"Command: `{command}`", "",
             f"Date: {date} UTC (CPU, {args.threads} torch thread(s), a 2-core machine shared with other jobs; "
             f"{wall / 60:.1f} min in this run).", "",
             f"Mode `edit`: at most K = {args.max_edits} edits (skip or repeat one block of {L}) of the full route, "
             f"then stop. Reward at the end: margin gain over the full route minus {args.lam:g} x (blocks - {L}) / "
             f"{L}. PPO (stable-baselines3, {args.n_envs} envs x {args.n_steps} steps per rollout, minibatch "
             f"{args.batch_size}, lr {args.lr:g}, gamma 1) trains on {args.search_limit} search-split samples for "
             f"{curve[-1]['timesteps'] if curve else '?'} environment steps. Validation: greedy episodes on the "
             f"first {args.val_limit} validation-split samples, every {args.eval_every} steps. Best static edit: "
             f"each of the {2 * L} single edits applied to every sample, scored on the first {args.static_limit} "
             f"search-split samples; the best there is scored on validation. Mean reward with a normal 95% CI.", "",
             "## Validation learning curve", "",
             "| steps | mean reward (95% CI) | mean margin gain | mean blocks | mean edits | accuracy |",
             "|---|---|---|---|---|---|"]
    for c in curve:
        _, lo, hi = paired(c["rewards"], [0.0] * len(c["rewards"]))
        lines.append(f"| {c['timesteps']} | {c['mean_reward']:+.4f} ({lo:+.4f} to {hi:+.4f}) | {c['mean_gain']:+.4f} | "
                     f"{c['mean_blocks']:.2f} | {c['mean_edits']:.2f} | {100 * c['accuracy']:.1f}% |")
    lines += ["", "## References on validation", "", "| route | mean reward | mean margin gain | blocks | accuracy |",
              "|---|---|---|---|---|",
              f"| full route (no edit) | +0.0000 | +0.0000 | {L} | {100 * full_acc:.1f}% |",
              f"| best static edit: {ref['edit']} | {ref['mean_reward']:+.4f} | {ref['mean_gain']:+.4f} | "
              f"{ref['blocks']:g} | {100 * ref['accuracy']:.1f}% |", "",
              f"Best single static edits on the {args.static_limit} search samples: " +
              "; ".join(f"{r['edit']} {r['mean_reward']:+.4f}" for r in top) + ".", "", "## Reading", ""]
    lines += verdict(curve, ref) if curve else ["- No validation point yet."]
    lines += ["", f"![learning curve]({args.name}.png)", ""]
    data = {"command": command, "date": date, "args": asdict(args), "num_layers": L, "wall_s": round(wall, 1),
            "validation_curve": curve, "train_curve": train, "static_edits": statics, "best_static_edit": ref,
            "full_route_accuracy": full_acc}
    return "\n".join(lines), data


def plot(path: Path, args: Args, curve: list[dict], train: list[dict], ref: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [c["timesteps"] for c in curve]
    y = np.array([c["mean_reward"] for c in curve])
    half = np.array([paired(c["rewards"], [0.0] * len(c["rewards"]))[2] for c in curve]) - y
    ax.plot(x, y, marker="o", ms=3, label=f"PPO, greedy, validation (n={args.val_limit})")
    ax.fill_between(x, y - half, y + half, alpha=0.2)
    if train:
        ax.plot([t["timesteps"] for t in train], [t["mean_reward"] for t in train], color="gray", lw=0.8, alpha=0.6,
                label="PPO, sampled episodes, search split (training)")
    ax.axhline(ref["mean_reward"], color="tab:red", ls="--", label=f"best static edit ({ref['edit']}), validation")
    ax.axhline(0.0, color="black", ls=":", lw=0.8, label="full route (no edit)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"reward: margin gain - {args.lam:g} x (blocks - L) / L")
    ax.set_title(f"PPO in the edit space (K={args.max_edits}) on {args.task}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    import torch

    from layerroute import RouteExecutor, load_model
    from layerroute.envs.routing_env import LayerRoutingVecEnv, RoutingCore, build_core
    from layerroute.objective import Objective
    from layerroute.policies.ppo import ValidationCallback, train_ppo
    from layerroute.store import ResultsStore, atomic_write, model_header
    from layerroute.tasks import get_task

    args = parse_config(Args, argv, __doc__.splitlines()[0])
    command = experiment_command("ppo_edit", argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f} s] {msg}", flush=True)

    model, tok = load_model(args.model)
    ex = RouteExecutor(model)
    L, task = ex.num_layers, get_task(args.task, seed=args.seed)
    core = build_core(ex, tok, task, mode="edit", lam=args.lam, limit=args.search_limit, seed=args.seed,
                      obs_dim=args.obs_dim, max_edits=args.max_edits, batch_rows=args.batch_rows)
    val = RoutingCore(Objective.from_task(ex, tok, task, "validation", args.val_limit, args.seed, option="--val-limit",
                                          lam=args.lam, batch_rows=args.batch_rows), core.spec, core.proj)
    settings = {k: v for k, v in asdict(args).items() if k not in ("threads", "out", "run_dir", "name")}
    header = {"kind": "ppo-edit", "settings": settings, **model_header(ex), "task": task.name, "split": "search",
              "seed": args.seed}
    with ResultsStore(Path(args.run_dir) / "results.jsonl", header) as store:
        done = {r["key"]: r for r in store.records if r.get("type") in ("static_edit", "reference")}
        for a in range(2 * L):  # 1. every single static edit on the first static_limit search samples
            if f"static:{a}" not in done:
                eps = core.rollout(range(args.static_limit), single_edit(a, L))
                rec = {"type": "static_edit", "key": f"static:{a}", "action": a, "edit": edit_name(a, L),
                       "mean_reward": float(np.mean([r for r, _ in eps])), "n": len(eps)}
                store.append(rec)
                done[rec["key"]] = rec
                log(f"static {rec['edit']}: mean search reward {rec['mean_reward']:+.4f}")
        statics = [done[f"static:{a}"] for a in range(2 * L)]
        best = max(statics, key=lambda r: r["mean_reward"])
        if "reference" not in done:  # 2. the best static edit on validation
            eps = val.rollout(range(len(val.obj)), single_edit(best["action"], L))
            infos = [i for _, i in eps]
            rec = {"type": "reference", "key": "reference", "action": best["action"], "edit": best["edit"],
                   "rewards": [r for r, _ in eps], "mean_reward": float(np.mean([r for r, _ in eps])),
                   "mean_gain": float(np.mean([i["gain"] for i in infos])), "blocks": infos[0]["blocks"],
                   "accuracy": float(np.mean([i["correct"] for i in infos]))}
            store.append(rec)
            done["reference"] = rec
        ref = done["reference"]
        n_val = len(val.obj)
        full_acc = float(np.mean([c for *_, c in val.score_routes(range(n_val), [tuple(range(L))] * n_val)]))
        log(f"best static edit: {ref['edit']} ({best['mean_reward']:+.4f} on search, {ref['mean_reward']:+.4f} on "
            f"validation); full route accuracy on validation {full_acc:.3f}")
        # 3. PPO, with the validation curve as it trains
        train_ppo(LayerRoutingVecEnv(args.n_envs, core=core), store, args.timesteps, seed=args.seed,
                  n_steps=args.n_steps, batch_size=args.batch_size, learning_rate=args.lr, progress=False,
                  checkpoint_every=args.eval_every, callbacks=(ValidationCallback(val, store, args.eval_every, log),))
        curve = sorted((r for r in store.records if r.get("type") == "validation"), key=lambda r: r["timesteps"])
        train = [r for r in store.records if r.get("type") == "curve"]
    text, data = render(args, command, L, statics, ref, full_acc, curve, train, time.perf_counter() - start,
                        datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"))
    atomic_write(args.path(f"{args.name}.md"), text)
    atomic_write(args.path(f"{args.name}.json"), json.dumps(data, indent=1))
    plot(args.path(f"{args.name}.png"), args, curve, train, ref)
    log(f"wrote {args.path(args.name)}.md, .json and .png")
    print(text)


if __name__ == "__main__":
    main()
