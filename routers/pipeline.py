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
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PipelineConfig:
    """The pipeline's settings (``layerroute pipeline -h`` explains each)."""

    model: str = "smollm2-135m"
    task: str = "suite"
    seed: int = 0
    budget: str | None = None
    epsilon: float = 0.01
    tau_limit: int = 48
    search_limit: int = 24
    simulations: int = 16
    epochs: int = 30
    refine_epochs: int = 5
    test_limit: int = 50
    calib_limit: int = 16
    baseline: str = "similarity"
    batch_size: int = 16
    prompt: str = "What is the capital of France?"
    max_new_tokens: int = 16
    output: str = "runs/pipeline"
    overwrite: bool = False


def _header(cfg: PipelineConfig, task, ex, kind: str, settings: dict) -> dict:
    from layerroute.runs import run_header

    # fields and kind: the pipeline reads its task by name only; they stay in the settings so that
    # stores written before keep resuming
    return run_header(kind, ex, task, "search", cfg.seed,
                      {"task": cfg.task, "seed": cfg.seed, "fields": None, "kind": None, **settings})


def run_pipeline(config: PipelineConfig, load) -> int:
    """The pipeline (see the module docstring); ``load()`` gives (model, tokenizer)."""
    from layerroute.store import ResultsStore

    out = Path(config.output)
    with ResultsStore(out / "search") as gold, ResultsStore(out / "search-null") as null:  # locks before the model
        return _run_pipeline(config, load, {"search": gold, "search-null": null})


def _run_pipeline(cfg: PipelineConfig, load, stores: dict) -> int:
    """The four steps, each printed with the seconds since the start, then the summary (``summary.md``, ``.json``)."""
    from layerroute.executor import RouteExecutor
    from layerroute.tasks import get_task

    t_start = time.perf_counter()
    step = lambda text: print(f"\n## {text}  [{time.perf_counter() - t_start:.0f} s]\n", flush=True)  # noqa: E731
    model, tok = load()
    ex = RouteExecutor(model)
    task = get_task(cfg.task, seed=cfg.seed)
    print(f"# layerroute pipeline: {cfg.model} ({ex.fingerprint.describe()}) on {task.name}")

    step(f"1. MCTS search (edit space) on {cfg.search_limit} search-split samples: gold labels (ORACLE) and "
         f"null labels (chance)")
    oracle = _search_labels(cfg, ex, tok, task, stores)
    step("2. Train routers on the robust labels, then choose tau on the validation split")
    net, report = _train_routers(cfg, ex, tok, task)
    step(f"3. Evaluate on {cfg.test_limit} test-split samples")
    rows = _evaluate(cfg, ex, tok, task, net)
    step("4. Generate with the routed model")
    route, answer = _generate(cfg, model, net, tok)
    step("Summary")
    _write_summary(cfg, task, ex, rows, oracle, report, route, answer, time.perf_counter() - t_start)
    return 0


def _search_labels(cfg: PipelineConfig, ex, tok, task, stores: dict) -> dict:
    """Step 1: MCTS in the edit space with gold labels and with null labels; the two searches' summaries."""
    from layerroute.objective import Objective
    from layerroute.search import get_searcher, run_search

    searcher_cls = get_searcher("mcts")
    config = searcher_cls.Config(simulations=cfg.simulations)
    oracle = {}
    for kind, folder in (("gold", "search"), ("null", "search-null")):
        obj = Objective.from_task(ex, tok, task, "search", cfg.search_limit, cfg.seed, option="--search-limit",
                                  null_seed=cfg.seed if kind == "null" else None)
        searcher = searcher_cls(obj, config, seed=cfg.seed)
        header = {**_header(cfg, task, ex, "search:mcts", {"limit": cfg.search_limit, "reward": "margin",
                                                             "lam": 0.0, **searcher.settings()}), "labels": kind}
        with stores[folder].open(header, overwrite=cfg.overwrite) as store:
            oracle[kind] = run_search(searcher, store)
    print(f"on the searched samples: full model {100 * oracle['gold'].get('identity_accuracy', float('nan')):.1f}%, "
          f"ORACLE {100 * oracle['gold'].get('oracle_accuracy', float('nan')):.1f}% with gold labels against "
          f"{100 * oracle['null'].get('oracle_accuracy', float('nan')):.1f}% with null labels (chance)")
    return oracle


def _train_routers(cfg: PipelineConfig, ex, tok, task):
    """Step 2: routers trained on the robust labels, tau chosen on validation, saved in ``OUTPUT/routers``;
    ``(routers, training report)``."""
    from .routed_model import save_routers
    from .tau import calibrate_tau, describe as describe_tau
    from .training import load_labels, train_routers

    out = Path(cfg.output)
    labels = load_labels([out / "search"], ex.fingerprint)  # robust: filtered against out/search-null
    print(f"robust labels: {labels.kept} of {labels.kept + labels.filtered} samples keep their searched route "
          f"(margin gain above {labels.threshold:.3f} nats, which at most 5% of null searches exceed)")
    net, report = train_routers(ex, tok, labels, epochs=cfg.epochs, budget=cfg.budget, seed=cfg.seed,
                                refine_epochs=cfg.refine_epochs, base_model=cfg.model)
    cal = calibrate_tau(net, ex, tok, task, cfg.seed, limit=cfg.tau_limit, epsilon=cfg.epsilon,
                        batch_size=cfg.batch_size)
    print(describe_tau(cal))
    save_routers(out / "routers", net)
    refine = report.get("refinement", {})
    print(f"routers: {report['parameters']:,} parameters ({100 * report['share_of_base']:.2f}% of the base); "
          f"label counts skip/execute/repeat {report['label_counts']}; validation agreement "
          f"{report['best_val']['agreement']:.3f} (teacher forced), on-policy {report['on_policy_val']['agreement']:.3f}"
          + (f" -> {refine['on_policy_val_after']['agreement']:.3f} after refinement "
             f"({'kept' if refine['kept'] else 'discarded'})" if refine else ""))
    return net, report


def _evaluate(cfg: PipelineConfig, ex, tok, task, net) -> list[dict]:
    """Step 3: the full model, the routers and a static route at the routers' compute on the test split; rows."""
    from layerroute.evaluation import degenerate_warning, evaluate
    from layerroute.objective import Objective
    from layerroute.search.baselines import BASELINES

    from .routed_model import RouterPolicy

    test = task.split("test", cfg.seed)
    ev = dict(batch_size=cfg.batch_size, limit=cfg.test_limit)
    rows = []

    def add(name, result, note=""):
        lo, hi = result.ci95
        rows.append({"method": name, "n": result.n, "accuracy": result.accuracy, "ci95": [lo, hi], "mean_blocks": result.mean_blocks,
                     "seconds": result.seconds, "note": note})
        print(f"{name}: {100 * result.accuracy:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}), "
              f"{result.mean_blocks:.2f} blocks, {result.seconds:.1f} s", flush=True)

    add("full model", evaluate(ex, tok, test, None, **ev))
    routed = evaluate(ex, tok, test, RouterPolicy(net), **ev)
    warning = degenerate_warning([r.blocks for r in routed.samples], ex.num_layers)
    if warning:
        print(f"warning: routers: {warning}", file=sys.stderr)
    add(f"routers (tau {net.config.tau})", routed, "decides at prefill; time includes the routing walk")
    k = max(1, min(ex.num_layers, round(routed.mean_blocks)))
    cal = Objective.from_task(ex, tok, task, "search", cfg.calib_limit, cfg.seed, option="--calib-limit")
    static = BASELINES[cfg.baseline](cal, k, cfg.seed)
    add(f"{cfg.baseline} static route ({k} blocks)", evaluate(ex, tok, test, static, **ev),
        f"calibrated on {len(cal)} search-split samples at the routers' compute")
    return rows


def _generate(cfg: PipelineConfig, model, net, tok):
    """Step 4: greedy generation from ``cfg.prompt`` with the routed model; ``(its route, the answer)``."""
    from layerroute.tasks.prompts import render_prompt

    from .routed_model import RoutedModel

    rm = RoutedModel(model, net, tok)
    ids = tok(render_prompt(tok, cfg.prompt), return_tensors="pt", add_special_tokens=False).input_ids
    seq = rm.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    route = rm.route(ids)[0]
    answer = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print(f"prompt: {cfg.prompt}\nroute:  {route.describe()}\nanswer: {answer}")
    return route, answer


def _write_summary(cfg: PipelineConfig, task, ex, rows, oracle, report, route, answer, seconds: float) -> None:
    """The summary table (test rows, then the MCTS oracle and its null level), printed and written to
    ``OUTPUT/summary.md`` and ``summary.json``."""
    from layerroute.evaluation import wilson_interval
    from layerroute.store import atomic_write

    out = Path(cfg.output)
    lines = [f"Test split of {task.name} (n={rows[0]['n']}), "
             f"{cfg.model}; routers trained on {report['train_samples']} searched samples.", "",
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
    lines += ["", f"Routed generation: {cfg.prompt!r} -> {answer!r} ({route.cost} blocks).",
              f"Total time {seconds:.0f} s."]
    table = "\n".join(lines)
    print(table)
    atomic_write(out / "summary.md", table + "\n")
    atomic_write(out / "summary.json", json.dumps({"rows": rows, "oracle": oracle, "training": report,
                                                   "generation": {"prompt": cfg.prompt, "answer": answer,
                                                                  "route": route.to_dict()}},
                                                  indent=2, sort_keys=True, default=str) + "\n")
    print(f"\nwrote {out / 'summary.md'}, {out / 'summary.json'} and the routers in {out / 'routers'}",
          file=sys.stderr)
