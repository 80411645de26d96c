"""``layerroute info``: what a model is and whether it can be routed, remembered per checkpoint.

The report (block stack, parameters, the exactness self-check) needs torch, transformers and the
model, so it takes seconds. It depends only on the model's files, the versions of torch,
transformers and layerroute, the device and the dtype, so it is kept in the cache
(``cache_dir()/info``) under a digest of all of those and printed from there next time, saying so,
without importing torch. ``--recheck`` runs it again. Hub ids are never remembered: their files
are not on this disk to compare.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .model_files import _EMBEDDED, cache_dir, embedded_gguf

_VERSIONED = ("torch", "transformers", "layerroute")


def _files(name: str) -> list[Path] | None:
    """The files that make up a local model (the embedded default's GGUF, a .gguf, or a folder's files)."""
    if name in _EMBEDDED:
        return [embedded_gguf(name)]
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return None


def report_key(args) -> str | None:
    """A digest of everything the report depends on, or None where it cannot be known (a hub id)."""
    from importlib.metadata import PackageNotFoundError, version

    files = _files(args.model)
    if files is None:
        return None
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    for package in _VERSIONED:
        try:
            parts.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package}=?")
    parts += [f"device={args.device}", f"dtype={args.dtype}", f"trust_remote_code={args.trust_remote_code}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def model_report(args) -> dict:
    """Load the model and build the report: its class, size, block stack and the self-check."""
    from .args import load
    from .errors import UnsupportedModelError
    from .executor import RouteExecutor, self_check

    model, _ = load(args, check_supported=False)
    report = {"model": args.model, "class": type(model).__name__,
              "parameters": sum(p.numel() for p in model.parameters())}
    try:
        ex = RouteExecutor(model, verify=False)  # the structure check; the self-check is reported below
    except UnsupportedModelError as exc:
        return {**report, "supported": False, "reason": str(exc)}
    stack, fp = ex.stack, ex.fingerprint
    check = self_check(ex)
    return {**report, "num_layers": fp.num_layers, "block_params": fp.block_params, "hidden": fp.hidden_size,
            "attention": stack.attn_implementation, "windows": sorted({w for w in stack.windows if w is not None}),
            "scales": [f"{what} {value:g}" for what, value in (("embeddings x", stack.embed_multiplier),
                       ("logits x", stack.logit_multiplier), ("logits /", stack.logit_divisor)) if value is not None],
            "self_check": check.describe(), "supported": bool(check.passed)}


def format_report(r: dict) -> str:
    """The report as ``info`` prints it."""
    lines = [f"model:      {r['model']} ({r['class']})", f"parameters: {r['parameters']:,}"]
    if "reason" in r:
        return "\n".join(lines + ["supported:  no", f"reason:     {r['reason']}"])
    windows = f", sliding windows {r['windows']}" if r["windows"] else ""
    lines += [f"layers:     {r['num_layers']} decoder blocks of {r['block_params']:,} parameters",
              f"hidden:     {r['hidden']}", f"attention:  {r['attention']}{windows}"]
    if r["scales"]:
        lines.append(f"scaling:    {', '.join(r['scales'])} (outside the blocks; reproduced by the executor)")
    lines += [f"self-check: {r['self_check']}", f"supported:  {'yes' if r['supported'] else 'no'}"]
    return "\n".join(lines)


def run_info(args) -> int:
    """Print the report (remembered, unless ``args.recheck``); exit 0 if the model can be routed, else 1."""
    key = report_key(args)
    memo = cache_dir() / "info" / f"{key}.json" if key else None
    report, when = None, None
    if memo is not None and memo.is_file() and not args.recheck:
        try:
            saved = json.loads(memo.read_text())
            report, when = saved["report"], saved["checked"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            report = None  # a damaged memo is only a cache: check again and rewrite it
    if report is None:
        report = model_report(args)
        if memo is not None:
            from .store import atomic_write_json

            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo, {"report": report, "checked": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(format_report(report))
    if when:
        print(f"remembered: checked {when} on these same model files, versions, device and dtype; "
              f"--recheck loads the model and checks again")
    return 0 if report["supported"] else 1
