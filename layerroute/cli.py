"""The ``layerroute`` command line."""

from __future__ import annotations

import argparse
import sys

from .errors import LayerRouteError
from .models import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF id, model directory or .gguf file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _load(args, check_supported: bool = True):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, check_supported=check_supported)


def cmd_info(args) -> int:
    from .errors import UnsupportedModelError
    from .models import decoder_stack

    model, _ = _load(args, check_supported=False)
    print(f"model:      {args.model} ({type(model).__name__})")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    try:
        stack = decoder_stack(model)
    except UnsupportedModelError as exc:
        print("supported:  no")
        print(f"reason:     {exc}")
        return 1
    fp = stack.fingerprint
    windows = sorted({w for w in stack.windows if w is not None})
    print(f"layers:     {fp.num_layers} decoder blocks of {fp.block_params:,} parameters")
    print(f"hidden:     {fp.hidden_size}")
    print(f"attention:  {stack.attn_implementation}" + (f", sliding windows {windows}" if windows else ""))
    print("supported:  yes")
    return 0


def cmd_run(args) -> int:
    from .executor import RouteExecutor
    from .tasks.prompts import render_prompt

    model, tok = _load(args)
    ex = RouteExecutor(model)
    route = ex.route(args.route)
    ids = tok(render_prompt(tok, args.prompt, chat=not args.no_chat), return_tensors="pt",
              add_special_tokens=False).input_ids
    out = ex.generate(ids, routes=route, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out.sequences[0, ids.shape[1]:]
    print(f"route: {route.describe()}", file=sys.stderr)
    print(tok.decode(new, skip_special_tokens=True).strip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="layers, parameters, and whether the model can be routed")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="generate with a route")
    _add_model_args(p)
    p.add_argument("--route", default=None,
                   help="JSON file or spec: identity, skip:20-24, repeat:10, repeat:10x3, chain:0-9,9,10-29 (join with +)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LayerRouteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
