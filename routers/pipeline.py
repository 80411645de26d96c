"""``layerroute pipeline``: search, train routers, evaluate, generate -- the main job, end to end.

1. **Search** (ORACLE labels): per-sample MCTS in the edit space (``search/mcts.py``) on the
   first ``--search-limit`` examples of the task's *search* split, into a resumable results
   store (``OUT/search/``), and the same search against null labels (``OUT/search-null/``).
2. **Train** routers on the robust labels (``routers/training.py``: a searched route is kept only
   where its gain beats chance; a seeded share of the searched samples is held out for early
   stopping), saved to ``OUT/routers/``.
   Then **choose tau** (``routers/tau.py``): the routers' confidence threshold, on the *validation*
   split: the most compute saved while accuracy stays within ``--epsilon`` of the full model.
3. **Evaluate** on the *test* split (never searched): the full model, the routers at that tau
   (their mean executed blocks measured), and the best static route at the routers' compute (``--baseline``,
   calibrated on the search split with ``k = round(router mean blocks)`` blocks).
4. **Generate** one answer with ``RoutedModel`` (the route fixed at prefill; where the routers
   are unsure, it is the full model's answer).

Prints progress, then a summary table; writes ``OUT/summary.md`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _header(args, task, ex, kind: str, settings: dict) -> dict:
    from layerroute.store import model_header

    return {"kind": kind, "settings": {"task": args.task, "seed": args.seed, "fields": None, "kind": None,
                                       **settings},
            **model_header(ex), "task": task.name, "split": "search", "seed": args.seed}


def run_pipeline(args, load) -> int:
    """The pipeline on ``args`` (see ``layerroute pipeline -h``); ``load(args)`` gives (model, tokenizer)."""
    from layerroute.store import ResultsStore

    out = Path(args.output)
    with ResultsStore(out / "search") as gold, ResultsStore(out / "search-null") as null:  # locks before the model
        return _run_pipeline(args, load, {"search": gold, "search-null": null})


def _run_pipeline(args, load, stores: dict) -> int:
    from layerroute.evaluation import evaluate, wilson_interval
    from layerroute.executor import RouteExecutor
    from layerroute.objective import Objective
    from layerroute.search import get_searcher, run_search
    from layerroute.search.baselines import BASELINES
    from layerroute.store import atomic_write
    from layerroute.tasks import get_task
    from layerroute.tasks.prompts import render_prompt

    from .routed_model import RoutedModel, RouterPolicy, save_routers
    from .tau import calibrate_tau
    from .training import load_labels, train_routers

    t_start = time.perf_counter()
    out = Path(args.output)
    step = lambda text: print(f"\n## {text}  [{time.perf_counter() - t_start:.0f} s]\n", flush=True)  # noqa: E731
    model, tok = load(args)
    ex = RouteExecutor(model)
    task = get_task(args.task, seed=args.seed)
    print(f"# layerroute pipeline: {args.model} ({ex.fingerprint.describe()}) on {task.name}")

    step(f"1. MCTS search (edit space) on {args.search_limit} search-split samples: gold labels (ORACLE) and "
         f"null labels (chance)")
    searcher_cls = get_searcher("mcts")
    config = searcher_cls.Config(simulations=args.simulations)
    oracle = {}
    for kind, folder in (("gold", "search"), ("null", "search-null")):
        obj = Objective.from_task(ex, tok, task, "search", args.search_limit, args.seed, option="--search-limit",
                                  null_seed=args.seed if kind == "null" else None)
        searcher = searcher_cls(obj, config, seed=args.seed)
        header = {**_header(args, task, ex, "search:mcts", {"limit": args.search_limit, "reward": "margin",
                                                             "lam": 0.0, **searcher.settings()}), "labels": kind}
        with stores[folder].open(header, overwrite=args.overwrite) as store:
            oracle[kind] = run_search(searcher, store)
    print(f"on the searched samples: full model {100 * oracle['gold'].get('identity_accuracy', float('nan')):.1f}%, "
          f"ORACLE {100 * oracle['gold'].get('oracle_accuracy', float('nan')):.1f}% with gold labels against "
          f"{100 * oracle['null'].get('oracle_accuracy', float('nan')):.1f}% with null labels (chance)")

    step("2. Train routers on the robust labels, then choose tau on the validation split")
    labels = load_labels([out / "search"], ex.fingerprint)  # robust: filtered against out/search-null
    print(f"robust labels: {labels.kept} of {labels.kept + labels.filtered} samples keep their searched route "
          f"(margin gain above {labels.threshold:.3f} nats, which at most 5% of null searches exceed)")
    net, report = train_routers(ex, tok, labels, epochs=args.epochs, budget=args.budget, seed=args.seed,
                                refine_epochs=args.refine_epochs, base_model=args.model)
    cal = calibrate_tau(net, ex, tok, task, args.seed, limit=args.tau_limit, epsilon=args.epsilon,
                        batch_size=args.batch_size)
    print(f"tau {cal['tau']}: the most compute saved on {cal['chosen']['n']} validation samples within "
          f"{100 * args.epsilon:g} points of the full model ({100 * cal['chosen']['accuracy']:.1f}% at "
          f"{cal['chosen']['mean_blocks']:.2f} blocks; full model {100 * cal['sweep'][0]['accuracy']:.1f}%)")
    save_routers(out / "routers", net)
    refine = report.get("refinement", {})
    print(f"routers: {report['parameters']:,} parameters ({100 * report['share_of_base']:.2f}% of the base); "
          f"label counts skip/execute/repeat {report['label_counts']}; validation agreement "
          f"{report['best_val']['agreement']:.3f} (teacher forced), on-policy {report['on_policy_val']['agreement']:.3f}"
          + (f" -> {refine['on_policy_val_after']['agreement']:.3f} after refinement "
             f"({'kept' if refine['kept'] else 'discarded'})" if refine else ""))

    step(f"3. Evaluate on {args.test_limit} test-split samples")
    test = task.split("test", args.seed)
    ev = dict(batch_size=args.batch_size, limit=args.test_limit)
    rows = []

    def add(name, result, note=""):
        lo, hi = result.ci95
        rows.append({"method": name, "n": result.n, "accuracy": result.accuracy, "ci95": [lo, hi], "mean_blocks": result.mean_blocks,
                     "seconds": result.seconds, "note": note})
        print(f"{name}: {100 * result.accuracy:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}), "
              f"{result.mean_blocks:.2f} blocks, {result.seconds:.1f} s", flush=True)

    add("full model", evaluate(ex, tok, test, None, **ev))
    routed = evaluate(ex, tok, test, RouterPolicy(net), **ev)
    add(f"routers (tau {net.config.tau})", routed, "decides at prefill; time includes the routing walk")
    k = max(1, min(ex.num_layers, round(routed.mean_blocks)))
    cal = Objective.from_task(ex, tok, task, "search", args.calib_limit, args.seed, option="--calib-limit")
    static = BASELINES[args.baseline](cal, k, args.seed)
    add(f"{args.baseline} static route ({k} blocks)", evaluate(ex, tok, test, static, **ev),
        f"calibrated on {len(cal)} search-split samples at the routers' compute")

    step("4. Generate with the routed model")
    rm = RoutedModel(model, net, tok)
    ids = tok(render_prompt(tok, args.prompt), return_tensors="pt", add_special_tokens=False).input_ids
    seq = rm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    route = rm.route(ids)[0]
    answer = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print(f"prompt: {args.prompt}\nroute:  {route.describe()}\nanswer: {answer}")

    step("Summary")
    lines = [f"Test split of {task.name} (n={rows[0]['n']}), "
             f"{args.model}; routers trained on {report['train_samples']} searched samples.", "",
             "| method | accuracy (95% CI) | mean blocks | share of blocks | wall time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f}% ({100 * r['ci95'][0]:.1f}-"
                     f"{100 * r['ci95'][1]:.1f}) | {r['mean_blocks']:.2f} | {r['mean_blocks'] / ex.num_layers:.2f} "
                     f"| {r['seconds']:.1f} |")
    for kind, what in (("gold", "ORACLE, reads labels: upper bound"), ("null", "null labels: its chance level")):
        o = oracle[kind]
        if o.get("oracle_accuracy") is not None:
            lo, hi = wilson_interval(round(o["oracle_accuracy"] * o["samples"]), o["samples"])
            lines.append(f"| MCTS on the search split ({what}) | {100 * o['oracle_accuracy']:.1f}% "
                         f"({100 * lo:.1f}-{100 * hi:.1f}) | {o['mean_best_blocks']:.2f} | "
                         f"{o['mean_best_blocks'] / ex.num_layers:.2f} | |")
    lines += ["", f"Routed generation: {args.prompt!r} -> {answer!r} ({route.cost} blocks).",
              f"Total time {time.perf_counter() - t_start:.0f} s."]
    table = "\n".join(lines)
    print(table)
    atomic_write(out / "summary.md", table + "\n")
    atomic_write(out / "summary.json", json.dumps({"rows": rows, "oracle": oracle, "training": report,
                                                   "generation": {"prompt": args.prompt, "answer": answer,
                                                                  "route": route.to_dict()}},
                                                  indent=2, sort_keys=True, default=str) + "\n")
    print(f"\nwrote {out / 'summary.md'}, {out / 'summary.json'} and the routers in {out / 'routers'}",
          file=sys.stderr)
    return 0


def add_pipeline_arguments(p) -> None:
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
    p.add_argument("--baseline", default="similarity", help="static baseline compared at the routers' compute (greedy is stronger but takes minutes per removed block on CPU)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--output", default="runs/pipeline")
    p.add_argument("--overwrite", action="store_true", help="redo a search already in --output")
