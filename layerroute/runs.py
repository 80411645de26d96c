"""What a run records about itself, and how saved runs are found again.

``run_header`` is the one builder of a results store's header: the kind of run, the settings
that define its results, the model (fingerprint and weights digest), the task, split and seed.
``list_runs`` finds every results store, router and policy under a folder and names its model,
task and headline figure (``layerroute runs DIR``). Both are light: no torch at import time.
"""

from __future__ import annotations

import json
from pathlib import Path


def run_header(kind: str, executor, task, split: str, seed: int, settings: dict, **extra) -> dict:
    """The header of a results store: what defines a run's results (a store with others is refused)."""
    from .store import model_header

    return {"kind": kind, "settings": settings, **model_header(executor), "task": getattr(task, "name", task),
            "split": split, "seed": seed, **extra}


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def _headline(header: dict, records: list[dict]) -> str:
    """The one figure that says how a finished store came out (or how far an unfinished one got)."""
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), None)
    samples = sum(r.get("type") == "sample" for r in records)
    if summary is None:
        return f"unfinished: {len(records)} records"
    m = summary.get("metrics") or summary
    if "accuracy" in m and "mean_blocks" in m:
        return f"accuracy {_pct(m['accuracy'])} at {m['mean_blocks']:.2f} blocks, n={m.get('n', samples)}"
    if "oracle_accuracy" in m:
        return f"oracle {_pct(m['oracle_accuracy'])} at {m.get('mean_best_blocks', float('nan')):.2f} blocks, " \
               f"n={m.get('samples', '?')}"
    if "timesteps" in m:  # PPO: the last learning-curve point
        curve = [r for r in records if r.get("type") == "curve"]
        return f"{m['timesteps']} steps" + (f", last rollout mean reward {curve[-1]['mean_reward']:.4f} at "
                                             f"{curve[-1]['mean_blocks']:.2f} blocks" if curve else "")
    if "route" in m and "reward" in m:
        blocks = len(m["route"].get("layers", [])) if isinstance(m["route"], dict) else "?"
        return f"best route {blocks} blocks, mean reward {m['reward']:.4f}" + \
            (f", Pareto front of {len(m['front'])}" if m.get("front") else "")
    return f"{len(records)} records"


def _model(header_model, name=None) -> str:
    fp = header_model if isinstance(header_model, dict) else {}
    shape = f"{fp.get('architecture', '?')}, {fp.get('num_layers', '?')} blocks" if fp else "?"
    return f"{name} ({shape})" if name else shape


def _describe_store(path: Path) -> tuple[str, str, str, str]:
    from .store import StoreError, read_store

    try:
        header, records = read_store(path)
    except StoreError as exc:
        return "unreadable store", "", "", str(exc)
    settings = header.get("settings") or {}
    return (str(header.get("kind", "?")), _model(header.get("model"), settings.get("model")),
            f"{header.get('task', '?')} ({header.get('split', '?')})", _headline(header, records))


def _describe_config(path: Path) -> tuple[str, str, str, str]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable config", "", "", str(path)
    if path.name == "router_config.json":
        training = config.get("training") or {}
        val = (training.get("best_val") or {}).get("agreement")
        figure = f"tau {config.get('tau')}" + (f", validation agreement {val:.3f}" if isinstance(val, float) else "")
        return "routers", _model(config.get("model"), config.get("base_model")), str(training.get("task", "")), figure
    return f"policy ({config.get('type', '?')})", _model(config.get("model")), str(config.get("task", "")), ""


def list_runs(folder: str | Path) -> list[dict]:
    """Every results store (``results.jsonl``), router directory and saved policy under ``folder``."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        if path.name == "results.jsonl":
            describe = _describe_store
        elif path.name == "router_config.json" or (path.name == "policy_config.json"
                                                    and not (path.parent / "router_config.json").exists()):
            describe = _describe_config
        else:
            continue
        kind, model, task, figure = describe(path)
        found.append({"path": str(path.parent), "kind": kind, "model": model, "task": task, "figure": figure})
    return found


def format_runs(rows: list[dict]) -> str:
    if not rows:
        return "no runs, routers or policies found"
    lines = ["| path | kind | model | task | headline |", "|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['kind']} | {r['model']} | {r['task']} | {r['figure']} |" for r in rows]
    return "\n".join(lines)
