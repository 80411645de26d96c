"""The policies plug-in's command: ``train-ppo`` (PPO on the routing environment of ``layerroute.envs``).

Registered through the ``layerroute.commands`` entry point. Only argparse runs at import time.
"""

from __future__ import annotations

import sys

from layerroute.args import add_model_args, add_task_args, default_output, identity, load, task_of, task_record
from layerroute.cli import Command, check_task_flags, refuse_ignored
from layerroute.errors import InputError
from layerroute.runs import run_header


def cmd_train_ppo(args) -> int:
    """``layerroute train-ppo``: PPO on the routing env (search split), resumable; exports DIR/policy."""
    from layerroute.envs.routing_env import LayerRoutingVecEnv
    from layerroute.executor import RouteExecutor
    from layerroute.store import ResultsStore

    from .ppo import train_ppo

    task = task_of(args)  # the arguments were checked by validate (CHECKS) before
    check_task_flags(args, task)
    if args.mode == "edit" and args.budget is not None:
        raise InputError("--budget does not apply to --mode edit (its episodes start from the full route); "
                         "penalise compute with --lambda instead")
    refuse_ignored(args, [("max_edits", args.mode == "edit", "applies to --mode edit only")])
    with ResultsStore(default_output(args, "ppo")) as store:  # the single-writer lock, before the model loads
        model, tok = load(args)
        ex = RouteExecutor(model)
        venv = LayerRoutingVecEnv(args.n_envs, ex, tok, task, mode=args.mode, reward=args.reward, lam=args.lam,
                                  budget=args.budget, limit=args.limit, seed=args.seed, obs_dim=args.obs_dim,
                                  max_edits=args.max_edits, batch_rows=args.batch_rows)
        settings = {k: v for k, v in identity(args).items() if k not in ("timesteps", "device", "no_progress")}
        if args.mode != "edit":  # stores of the other modes predate --max-edits and stay resumable
            settings.pop("max_edits", None)
        store.open(run_header("train-ppo", ex, task, "search", args.seed, settings), overwrite=args.overwrite)
        if args.overwrite:
            import shutil

            shutil.rmtree(store.path.parent / "checkpoints", ignore_errors=True)
        _, policy = train_ppo(venv, store, args.timesteps, seed=args.seed, device=args.device, n_steps=args.n_steps,
                              batch_size=args.batch_size, learning_rate=args.lr, progress=not args.no_progress,
                              task=task_record(args))
        print(ppo_summary(store, policy))
        if policy is not None:
            _warn_if_degenerate(policy, ex, tok, task.split("validation", args.seed))
    return 0


def ppo_summary(store, policy) -> str:
    """The run's last learning-curve point, and the files it wrote."""
    curve = [r for r in store.records if r.get("type") == "curve"]
    summary = store.summary() or {}
    lines = [f"trained {summary.get('timesteps', '?')} environment steps on {summary.get('samples', '?')} "
             f"search-split samples"]
    if curve:
        c = curve[-1]
        lines.append(f"last rollout ({c['episodes']} episodes): mean reward {c['mean_reward']:.4f}, "
                     f"mean blocks {c['mean_blocks']:.2f}")
    folder = store.path.parent
    lines.append(f"wrote {store.path}, {folder / 'tb'}, {folder / 'checkpoints'}" +
                 ("" if policy is None else f" and the policy in {folder / 'policy'} (evaluate with: layerroute "
                                            f"eval --policy {folder / 'policy'})"))
    return "\n".join(lines)


def _warn_if_degenerate(policy, ex, tok, task, limit: int = 32) -> None:
    """Greedy routes of the exported policy on validation samples: a warning when they barely use the model."""
    from layerroute.evaluation import degenerate_warning, policy_blocks

    if len(task):
        warning = degenerate_warning(policy_blocks(ex, tok, task, policy, limit), ex.num_layers)
        if warning:
            print(f"warning: greedy on {min(limit, len(task))} validation samples: {warning}", file=sys.stderr)


def build_train_ppo(p) -> None:
    add_model_args(p)
    add_task_args(p, output="a directory for results.jsonl, the exported policy/, checkpoints/ and tb/ "
                            "(default: runs/ppo-TASK)")
    p.set_defaults(batch_size=256, limit=512)
    p.add_argument("--mode", default="per_sample", choices=["per_sample", "cola", "per_token", "edit"],
                   help="per_sample: skip/execute/repeat per layer; cola: next block or stop; per_token: token "
                        "groups per layer (its exported policy decides inside the blocks); edit: at most --max-edits "
                        "skips or repeats "
                        "of the full route")
    p.add_argument("--max-edits", type=int, default=4, help="edit mode: edits per episode (K >= 1)")
    p.add_argument("--reward", default="margin", choices=["margin", "correct"])
    p.add_argument("--lambda", dest="lam", type=float, default=0.0, help="compute penalty per share of blocks")
    p.add_argument("--budget", default=None, help="hard budget: a share of blocks (0.8) or a block count (24)")
    p.add_argument("--timesteps", type=int, required=True, help="total environment steps (a rerun extends/resumes)")
    p.add_argument("--n-envs", type=int, default=16, help="episodes advanced together per step")
    p.add_argument("--n-steps", type=int, default=64, help="steps per env per PPO rollout")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--obs-dim", type=int, default=16, help="principal components of the hidden-state summary")
    p.add_argument("--batch-rows", type=int, default=64, help="token rows per executor call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register() -> list[Command]:
    return [Command("train-ppo", "train a PPO routing policy on the search split (resumes from --output)",
                    build_train_ppo, cmd_train_ppo, small={"batch_size": 32, "limit": 16})]
