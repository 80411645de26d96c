"""Routed generation against the full model at batch 1 and 8, router cost included.

    python -m layerroute.experiments.bench_routers --routers runs/router_table/refined [--new-tokens 32]

For real prompts of the routers' task (test split), times greedy decoding of ``--new-tokens``
tokens (EOS ignored, so every run decodes the same count), interleaved, medians of
``--repeats``:

* **full**: the executor along the identity route (within 2% of HF ``generate``, see
  ``bench_executor``);
* **routed**: ``RoutedModel.generate``, which walks the prompt once to let the routers decide
  (that walk is the prefill: it fills the routes' KV cache) and then decodes along the chosen
  routes;
* **same routes, no routing**: the executor along those routes, given in advance, to separate
  the routers' cost from the blocks'.

Ideal speedups from the executed blocks: ``L / k`` (blocks only) and ``(L b + c) / (k b + c)``,
where ``b`` is one block's and ``c`` the fixed per-token cost (embedding, norm, LM head), both
fitted from one-token forwards of 1 and L blocks. Writes ``OUT/bench_routers.md`` (``--out``; the committed
one: ``--out experiments/results``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from layerroute import load_model
from layerroute.config import option, parse_config
from layerroute.experiments import ExperimentArgs
from layerroute.experiments.bench_executor import _median_times
from layerroute.routers import RoutedModel, load_routers
from layerroute.scoring import encode_texts, left_pad, task_prompts
from layerroute.store import atomic_write
from layerroute.tables import write_report
from layerroute.tasks import get_task



def block_costs(ex, batch: int, repeats: int) -> tuple[float, float]:
    """(b, c): one block's and the fixed cost of a one-token forward, from 1 and L blocks."""
    ids = torch.randint(100, 1000, (batch, 1), generator=torch.Generator().manual_seed(0))
    L = ex.num_layers
    t = _median_times({"one": lambda: ex(ids, routes="chain:0", logits_to_keep=1),
                 "all": lambda: ex(ids, logits_to_keep=1)}, repeats * 4)
    b = (t["all"] - t["one"]) / (L - 1)
    return b, max(0.0, t["one"] - b)


@dataclass
class Args(ExperimentArgs):
    routers: str = option(None, "a trained router directory (required)", type=str)
    task: str = option(None, "prompts from this task's test split (default: the routers' task)", type=str)
    new_tokens: int = option(32, "new tokens generated")
    repeats: int = option(5, "timing repeats")
    threads: int = option(1, "torch threads")


def main(argv=None) -> None:
    args = parse_config(Args, argv, __doc__.splitlines()[0])
    if not args.routers:
        raise SystemExit("bench_routers: --routers is required (a trained router directory)")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    net = load_routers(args.routers, model)
    rm = RoutedModel(model, net, tok)
    ex, L = rm.executor, rm.executor.num_layers
    spec = args.task or net.config.training.get("task") or "gen"
    task = get_task(spec)
    prompts = encode_texts(tok, task_prompts(tok, task, task.split("test").examples[:8]))
    gen = dict(max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=0)  # EOS ignored
    lines = [f"# Routed generation on {args.model}: {args.new_tokens} new tokens, prompts from {spec} (test split), "
             f"{args.threads} thread(s)", "",
             "| batch | mean blocks (k of L) | full (s) | routed, routing included (s) | same routes, no routing (s) "
             "| routing walk alone (s) | realized speedup | ideal L/k | ideal with fixed cost | realized / ideal "
             "(fixed cost) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for batch in (1, 8):
        ids, mask = left_pad(prompts[:batch], tok, ex.device)
        routes = rm.route(ids, mask)
        k = sum(r.cost for r in routes) / batch
        t = _median_times({
            "full": lambda: ex.generate(ids, mask, None, **gen),
            "routed": lambda: rm.generate(ids, mask, do_sample=False, **gen),
            "same": lambda: ex.generate(ids, mask, routes, **gen),
            "walk": lambda: rm.route(ids, mask),
        }, args.repeats, warmup=1)
        b, c = block_costs(ex, batch, args.repeats)
        realized, ideal, ideal_fixed = t["full"] / t["routed"], L / k, (L * b + c) / (k * b + c)
        lines.append(f"| {batch} | {k:.1f} of {L} | {t['full']:.3f} | {t['routed']:.3f} | {t['same']:.3f} | "
                     f"{t['walk']:.3f} | {realized:.2f}x | {ideal:.2f}x | {ideal_fixed:.2f}x | "
                     f"{realized / ideal_fixed:.2f} |")
        print(lines[-1], flush=True)
        atomic_write(args.path("bench_routers.md"), "\n".join(lines) + "\n")
    lines += ["", f"Fixed per-token cost c = {c / b:.1f} blocks (fitted at batch 8). The routing walk is the prefill: "
              "generate continues from the KV cache the walk filled, so 'routed' minus 'same routes' is the routers' "
              "own cost (window means and router MLPs at each block). 'Routing walk alone' is that prefill with "
              "the routers."]
    write_report(args.path("bench_routers.md"), "\n".join(lines) + "\n", {"args": asdict(args), "table": lines})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
