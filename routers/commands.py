"""The routers plug-in's commands: ``train-router`` and ``pipeline``.

Registered through the ``layerroute.commands`` entry point. Only argparse runs at import time;
the handlers build a ``TrainRouterConfig`` / ``PipelineConfig`` and call the library.
"""

from __future__ import annotations

from dataclasses import fields

from layerroute.args import add_model_args, load
from layerroute.cli import Command, baseline_check


def config_of(cls, args, **given):
    """A config dataclass from the parsed arguments that share its field names (``given`` wins)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **given)


def cmd_train_router(args) -> int:
    from layerroute.store import check_store_weights

    from .training import TrainRouterConfig, train_router_run

    def load_checked():  # labels searched on another checkpoint of the same shape are refused
        model, tok = load(args)
        for path in args.labels:
            check_store_weights(path, model)
        return model, tok

    config = config_of(TrainRouterConfig, args, robust=not args.no_filter, base_model=args.model)
    train_router_run(config, load_checked)
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import PipelineConfig, run_pipeline

    return run_pipeline(config_of(PipelineConfig, args), lambda: load(args))


def build_train_router(p) -> None:
    add_model_args(p)
    p.add_argument("--labels", nargs="+", required=True,
                   help="results stores (dirs or results.jsonl) of one task: MCTS, Optuna or PPO outputs")
    p.add_argument("--null-labels", nargs="+", default=None,
                   help="the same search run with --null, for the robust filter (default: the folder LABELS-null)")
    p.add_argument("--no-filter", action="store_true",
                   help="learn every searched route as it is, chance included (no robust filter)")
    p.add_argument("--output", required=True,
                   help="directory for routers.safetensors, router_config.json and policy_config.json")
    p.add_argument("--overwrite", action="store_true", help="replace routers already in --output")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="samples per training step (all their layers)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=5, help="epochs without a better validation loss before stopping")
    p.add_argument("--refine-epochs", type=int, default=5, help="on-policy refinement epochs (0: none)")
    p.add_argument("--val-share", type=float, default=0.2,
                   help="share of the samples held out for early stopping when no store covers the validation split")
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--budget", default=None, help="optional hard compute budget of the routers at inference")
    p.add_argument("--tau", type=float, default=None,
                   help="skip or repeat a block only where the router is surer than tau (in [0, 1]; default: chosen "
                        "on the validation split)")
    p.add_argument("--epsilon", type=float, default=0.01,
                   help="tau is the most compute saved with validation accuracy at most this far below the full model's")
    p.add_argument("--tau-limit", type=int, default=100, help="validation samples that choose tau")
    p.add_argument("--seed", type=int, default=0)


def build_pipeline(p) -> None:
    add_model_args(p)
    p.add_argument("--task", default="suite", help="task to search, train and test on (default: the generated suite)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default=None, help="optional hard compute budget of the routers: a share or a block "
                   "count (default: none; tau decides)")
    p.add_argument("--epsilon", type=float, default=0.01,
                   help="tau: the most compute saved with validation accuracy at most this far below the full model's")
    p.add_argument("--tau-limit", type=int, default=48, help="validation samples that choose tau")
    p.add_argument("--search-limit", type=int, default=24, help="search-split samples searched with MCTS")
    p.add_argument("--simulations", type=int, default=16, help="MCTS simulations per sample")
    p.add_argument("--epochs", type=int, default=30, help="router training epochs (early stopping on validation)")
    p.add_argument("--refine-epochs", type=int, default=5, help="on-policy refinement epochs (0: none)")
    p.add_argument("--test-limit", type=int, default=50, help="test-split samples per evaluation")
    p.add_argument("--calib-limit", type=int, default=16, help="search-split samples that calibrate the static route")
    p.add_argument("--baseline", default="similarity", help="static baseline compared at the routers' compute "
                   "(greedy is stronger but takes minutes per removed block on CPU)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--output", default="runs/pipeline",
                   help="folder for summary.md, summary.json, the search stores and the routers")
    p.add_argument("--overwrite", action="store_true", help="redo a search already in --output")


def cmd_train_token_router(args) -> int:
    from .token_router import TrainTokenRouterConfig, train_token_router_run

    config = config_of(TrainTokenRouterConfig, args, base_model=args.model, progress=not args.no_progress)
    train_token_router_run(config, lambda: load(args))
    return 0


def build_train_token_router(p) -> None:
    add_model_args(p)
    p.add_argument("--output", default="runs/token_router",
                   help="directory for token_routers.safetensors, token_router_config.json and the training state "
                        "(an unfinished run there with the same settings resumes)")
    p.add_argument("--overwrite", action="store_true", help="start again even if --output holds a run")
    p.add_argument("--tasks", default="gen,suite,gsm8k,mmlu",
                   help="tasks whose texts form the corpus (search split: training; validation split: held out)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--max-length", type=int, default=128, help="tokens per window")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lambda", dest="lam", type=float, default=0.1,
                   help="weight of the executed share in the loss (>= 0; larger skips more)")
    p.add_argument("--gate", default="straight-through", choices=["straight-through", "gumbel"])
    p.add_argument("--temperature", type=float, default=1.0, help="Gumbel-sigmoid temperature")
    p.add_argument("--bottleneck", type=int, default=64)
    p.add_argument("--init-logit", type=float, default=0.0, help="initial router bias (0: probability 0.5)")
    p.add_argument("--threshold", type=float, default=0.5, help="inference threshold saved with the routers")
    p.add_argument("--rule", default="kv-kept", choices=["kv-kept", "absent"],
                   help="what a skipped token is at a block at inference (saved with the routers)")
    p.add_argument("--val-windows", type=int, default=16, help="held-out windows for the KL")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations and checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register() -> list[Command]:
    return [
        Command("train-router", "train per-layer routers on searched routes (MCTS, Optuna or PPO stores)",
                build_train_router, cmd_train_router),
        Command("train-token-router", "train per-token routers (one gate per block) by distillation from the full "
                "model: KL + lambda x executed share", build_train_token_router, cmd_train_token_router,
                small={"steps": 2, "batch_size": 2, "max_length": 32, "val_windows": 2, "eval_every": 1}),
        Command("pipeline", "the main job: MCTS search, train routers, evaluate against the full model and the best "
                "static route, generate with the routed model", build_pipeline, cmd_pipeline,
                checks={"baseline": baseline_check}),
    ]
