"""The headline: accuracy against mean executed blocks, with 95% CIs, for every method on one plot.

    OMP_NUM_THREADS=1 python -m layerroute.experiments.headline [--test-limit 300] [--tasks gen,suite,mmlu] \
        [--out experiments/results]

Routers are trained on ``gen`` only, from the robust labels of the edit-space MCTS store
(``--labels``, filtered against its ``-null`` twin), and their tau is chosen on ``gen``'s
validation split (within ``--epsilon`` of the full model). Then, on the test split of every task
(``gen`` trained, its first ``--test-limit``; ``suite`` and ``mmlu`` never seen by the routers, their first
``--unseen-limit``), each point is measured:

- the full model, and ``drop_last`` at several compute levels (``--drop-last``);
- on ``gen``: the recalibrated static routes of ``static_routes.json`` (fitted on 256 search-split
  samples, chosen on 256 validation samples, scored on these same test samples); on the unseen tasks
  the same gen-fitted routes, scored as they are (the routers are gen-trained too);
- the routers along a tau sweep (``--taus``) and at the validation-chosen tau;
- PPO in the edit space, if ``--ppo-policy`` names an exported policy;
- the per-sample MCTS oracle on gen's search split, gold and null (``--labels``): upper bounds
  that read the label, drawn hollow, never results.

Then routed generation speed at the chosen tau against the full route (median seconds per new
token, batch 1). Rows are written to ``OUT/headline.md`` and ``.json`` as they finish and a rerun
skips the finished ones; ``headline.png`` is drawn at the end. ``OUT`` is ``--out`` (``runs/experiments`` unless
named; the committed files: ``--out experiments/results``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from layerroute.config import parse_config
from layerroute.experiments import RESULTS, ExperimentArgs, experiment_command


@dataclasses.dataclass
class Config(ExperimentArgs):
    tasks: str = "gen,suite,mmlu"
    test_limit: int = 300
    unseen_limit: int = 200
    labels: str = str(RESULTS / "mcts_edit_gen")
    statics: str = str(RESULTS / "static_routes.json")
    taus: str = "0.99,0.95,0.9,0.8,0.7,0.6,0.5"
    tau_limit: int = 200
    epsilon: float = 0.01
    drop_last: str = "29,28,27,24"
    ppo_policy: str = ""
    speed_prompts: int = 6
    new_tokens: int = 24
    batch_size: int = 16
    seed: int = 0
    routers: str = "runs/headline-routers"


ADDED = ("ppo_policy", "speed_prompts", "new_tokens")  # settings that change no finished row


class Rows:
    """Rows kept in ``OUT/headline.json`` (rewritten after each) so a rerun skips what is done."""

    def __init__(self, cfg: Config, command: str):
        self.path = Path(cfg.out) / "headline.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        now = dataclasses.asdict(cfg)
        same = {k: v for k, v in old.get("config", {}).items() if k not in ADDED} == \
            {k: v for k, v in now.items() if k not in ADDED}
        self.data = old if same else {"command": command, "config": now, "rows": [], "extra": {}}
        if same:  # a rerun that only adds points (e.g. --ppo-policy) keeps the finished ones
            self.data.update(command=f"{old['command']}; then {command}" if command != old["command"] else command,
                             config=now)
        self.data["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def done(self, key: str):
        return next((r for r in self.data["rows"] if r["key"] == key), None)

    def add(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.save()
        print(f"  {row['task']:>6} {row['method']:<34} {_acc(row)} {row['mean_blocks']:6.2f} blocks", flush=True)
        return row

    def save(self) -> None:
        from layerroute.store import atomic_write

        atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        atomic_write(self.path.with_suffix(".md"), render(self.data))


def _acc(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['accuracy']:5.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"


def row_of(task: str, method: str, kind: str, result, note: str = "", **extra) -> dict:
    return {"key": f"{task}:{method}", "task": task, "method": method, "kind": kind, "n": result.n,
            "accuracy": result.accuracy, "ci95": list(result.ci95), "mean_blocks": result.mean_blocks,
            "note": note, **extra}


def render(data: dict) -> str:
    """The markdown report: one table per task, the strongest static route at the routers' compute."""
    lines = [f"# Accuracy against compute: `{data['config']['model']}`", "",
             f"Command: `{data['command']}`  ", f"Date: {data['date']}", "",
             "Test split, 95% Wilson CIs. ORACLE rows read the label (gen's search split): upper bounds, "
             "each beside its chance level (null labels), never results.", ""]
    tasks = list(dict.fromkeys(r["task"] for r in data["rows"]))
    for task in tasks:
        rows = sorted((r for r in data["rows"] if r["task"] == task), key=lambda r: (-r["mean_blocks"], r["method"]))
        lines += [f"## {task}", "", "| method | kind | n | accuracy (95% CI) | mean blocks | note |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['kind']} | {r['n']} | {_acc(r)} | {r['mean_blocks']:.2f} | {r['note']} |"
                  for r in rows]
        lines += ["", verdict(rows, data.get("chosen_tau")), ""]
    lines += goals(data)
    for name, text in data.get("extra", {}).items():
        lines += [f"## {name}", "", text, ""]
    return "\n".join(lines)


def goals(data: dict) -> list[str]:
    """Issue 19's three goals, each met or not, from the rows."""
    tau, out = data.get("chosen_tau"), ["## Goals", ""]

    def at_tau(task):
        rows = [r for r in data["rows"] if r["task"] == task]
        full = next((r for r in rows if r["kind"] == "full"), None)
        pick = full if tau == 1.0 else next((r for r in rows if r["kind"] == "router" and r.get("tau") == tau), None)
        return rows, full, pick

    rows, full, pick = at_tau("gen")
    if pick is not None:
        drop, saved = 100 * (full["accuracy"] - pick["accuracy"]), full["mean_blocks"] - pick["mean_blocks"]
        met = drop <= 2 and saved >= 1
        out.append(f"- gen, chosen tau: within 2 points of the full model ({drop:+.1f} below) while saving at least "
                   f"1 block ({saved:.2f} saved): **{'met' if met else 'not met'}**.")
        misses = []
        for r in (r for r in rows if r["kind"] == "router"):
            best = max((q for q in rows if q["kind"] in ("static", "full") and q["mean_blocks"] <= r["mean_blocks"]
                        + 1e-9), key=lambda q: q["accuracy"], default=None)
            if best is not None and r["accuracy"] < best["accuracy"]:
                misses.append(f"tau {r['tau']:g} {100 * r['accuracy']:.1f}% at {r['mean_blocks']:.2f} < "
                              f"{best['method']} {100 * best['accuracy']:.1f}%")
        out.append(f"- gen, along the curve: routers at or above the best static route at no more mean blocks: "
                   f"**{'met' if not misses else 'not met'}**" + (f" ({'; '.join(misses)})" if misses else "") + ".")
    for task in sorted({r["task"] for r in data["rows"]} - {"gen"}):
        _, full, pick = at_tau(task)
        if pick is not None:
            drop = 100 * (full["accuracy"] - pick["accuracy"])
            out.append(f"- {task} (unseen), chosen tau: at most 2 points below the full model ({drop:+.1f}): "
                       f"**{'met' if drop <= 2 else 'not met'}**" + (" (trivially: the routers run the full model)"
                                                                   if tau == 1.0 else "") + ".")
    signal = RESULTS / "signal-gen" / "signal.json"
    if signal.is_file():
        out += ["", f"Why, in `layerroute signal`'s words on gen (`{signal.relative_to(RESULTS)}`): "
                    f"{json.loads(signal.read_text())['verdict']}"]
    return out + [""]


def verdict(rows: list[dict], tau: float | None) -> str:
    """The routers at the chosen tau against the strongest static route (the full model included)
    that runs at most their mean blocks; the difference with its 95% CI (Newcombe)."""
    from layerroute.evaluation import newcombe_interval

    full = next((r for r in rows if r["kind"] == "full"), None)
    chosen = full if tau == 1.0 else next((r for r in rows if r["kind"] == "router" and r.get("tau") == tau), None)
    if chosen is None or full is None:
        return ""
    text = (f"Routers at the validation-chosen tau {tau:g}: {100 * chosen['accuracy']:.1f}% at "
            f"{chosen['mean_blocks']:.2f} blocks" + (" (they never leave the full route)" if tau == 1.0 else "")
            + f"; full model {100 * full['accuracy']:.1f}% at {full['mean_blocks']:.0f}.")
    statics = [r for r in rows if r["kind"] in ("static", "full") and r["mean_blocks"] <= chosen["mean_blocks"] + 1e-9]
    best = max(statics, key=lambda r: r["accuracy"], default=None)
    if best is None:
        return text + " No static route runs as few blocks, so there is no comparison at equal compute."
    k1, k2 = round(chosen["accuracy"] * chosen["n"]), round(best["accuracy"] * best["n"])
    lo, hi = newcombe_interval(k1, chosen["n"], k2, best["n"])
    word = "above" if lo > 0 else "below" if hi < 0 else "not distinguishable from"
    return text + (f" Against the strongest static route at no more compute, {best['method']} "
                   f"({100 * best['accuracy']:.1f}% at {best['mean_blocks']:.0f} blocks): "
                   f"{100 * (chosen['accuracy'] - best['accuracy']):+.1f} points (95% CI {100 * lo:+.1f} to "
                   f"{100 * hi:+.1f}), {word} it.")


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerroute.tables import error_bars

    tasks = list(dict.fromkeys(r["task"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    style = {"full": ("k", "*"), "static": ("tab:blue", "s"), "router": ("tab:red", "o"), "ppo": ("tab:green", "^"),
             "oracle": ("tab:purple", "D"), "null": ("tab:gray", "D")}
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in data["rows"] if r["task"] == task]
        for kind, (color, marker) in style.items():
            pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["mean_blocks"])
            if not pts:
                continue
            x = [r["mean_blocks"] for r in pts]
            y = [100 * r["accuracy"] for r in pts]
            err = error_bars([r["accuracy"] for r in pts], [r["ci95"] for r in pts])
            hollow = kind in ("oracle", "null")  # upper bounds and chance: not results
            names = {"oracle": "MCTS ORACLE (upper bound)", "null": "MCTS null (chance)"}
            ax.errorbar(x, y, yerr=err, color=color, marker=marker, ls="-" if kind == "router" else "none",
                        mfc="none" if hollow else color, capsize=2, zorder=5 if kind == "full" else 2,
                        ms=10 if kind == "full" else 6, label=names.get(kind, kind))
        tau = data.get("chosen_tau")
        pick = next((r for r in rows if (r["kind"] == "full" if tau == 1.0 else r.get("tau") == tau)), None)
        if pick is not None:
            ax.plot(pick["mean_blocks"], 100 * pick["accuracy"], "o", ms=14, mfc="none", mec="tab:red",
                    label=f"routers at the chosen tau {tau:g}")
        ax.set_title(f"{task} ({'trained' if task == 'gen' else 'unseen by the routers'})")
        ax.set_xlabel("mean executed blocks")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def routers_for(cfg: Config, ex, tok, rows: Rows):
    """Train (or reload) the routers on gen's robust labels and choose tau on gen's validation split."""
    from layerroute.routers import load_routers, save_routers
    from layerroute.routers.tau import calibrate_tau, choose_tau
    from layerroute.routers.training import load_labels, train_routers
    from layerroute.tasks import get_task

    folder = Path(cfg.routers)
    if (folder / "router_config.json").is_file():
        net = load_routers(folder, ex.model)
    else:
        labels = load_labels([Path(cfg.labels)], ex.fingerprint)
        rows.data["extra"]["labels"] = (
            f"Robust labels from `{cfg.labels}`: {labels.kept} of {labels.kept + labels.filtered} samples keep "
            f"their searched route (margin gain above {labels.threshold:.3f} nats, exceeded by at most 5% of null "
            f"searches); the rest are labelled with the full route.")
        net, _ = train_routers(ex, tok, labels, seed=cfg.seed, base_model=cfg.model)
    cal = net.config.training.get("tau", {})
    if cal.get("rule") != "bound" or cal.get("epsilon") != cfg.epsilon:  # (re)choose tau on validation
        cal = calibrate_tau(net, ex, tok, get_task("gen", seed=cfg.seed), cfg.seed, limit=cfg.tau_limit,
                            epsilon=cfg.epsilon, batch_size=cfg.batch_size)
        save_routers(folder, net)
    point = choose_tau(cal["sweep"], cfg.epsilon, "point")
    rows.data["chosen_tau"] = cal["tau"]
    rows.data["extra"]["tau"] = (
        f"tau {cal['tau']:g} chosen on {cal['chosen']['n']} gen validation samples: the most compute saved while "
        f"the upper end of the paired 95% CI of the accuracy loss stays within {100 * cfg.epsilon:g} point(s) "
        f"(rule `bound`). The measured loss alone (rule `point`) would take tau {point['tau']:g}. Validation "
        f"sweep (tau: accuracy, loss bound, blocks): " + ", ".join(
            f"{r['tau']:g}: {100 * r['accuracy']:.1f}%, {100 * r['loss_bound']:.1f}, {r['mean_blocks']:.2f}"
            for r in cal["sweep"]) + ".")
    return net


def measure_task(cfg: Config, ex, tok, net, name: str, statics: list[dict], rows: Rows) -> None:
    from layerroute.evaluation import evaluate
    from layerroute.route import Route
    from layerroute.routers import RouterPolicy
    from layerroute.routers.tau import sweep_tau
    from layerroute.tasks import get_task

    test = get_task(name, seed=cfg.seed).split("test", cfg.seed)
    limit = cfg.test_limit if name == "gen" else cfg.unseen_limit
    chosen = net.config.tau
    if rows.done(f"{name}:full model") is None:  # the full model is the sweep's tau = 1 row
        grid = {float(t) for t in cfg.taus.split(",") if t} | {chosen, 1.0}
        for r in sweep_tau(net, ex, tok, test, sorted(grid), limit=limit, batch_size=cfg.batch_size):
            common = {"task": name, "n": r["n"], "accuracy": r["accuracy"], "ci95": r["ci95"],
                      "mean_blocks": r["mean_blocks"], "tau": r["tau"]}
            if r["tau"] == 1.0:
                rows.add({**common, "key": f"{name}:full model", "method": "full model", "kind": "full",
                          "note": "= the routers at tau 1"})
            else:
                rows.add({**common, "key": f"{name}:routers tau {r['tau']:g}", "method": f"routers tau {r['tau']:g}",
                          "kind": "router", "note": f"{r['rerouted']} of {r['n']} samples leave the full route"})
    full = rows.done(f"{name}:full model")

    def point(method, kind, policy, note="", **extra):
        if rows.done(f"{name}:{method}") is None:
            r = evaluate(ex, tok, test, policy, batch_size=cfg.batch_size, limit=limit, progress=False)
            rows.add(row_of(name, method, kind, r, note, **extra))

    if chosen < 1.0:  # a tau chosen off the sweep's grid (a rerun after the rule changed)
        point(f"routers tau {chosen:g}", "router", RouterPolicy(net, tau=chosen), tau=chosen)

    known = {}
    if name == "gen":  # static_routes.json scored these same test samples: checked on the full model
        ref = next((s for s in statics if s["method"] == "full"), None)
        if ref and ref["test"]["n"] == full["n"] and abs(ref["test"]["accuracy"] - full["accuracy"]) < 1e-9:
            known = {s["key"]: s for s in statics if s["method"] != "full"}
    for k in (int(x) for x in cfg.drop_last.split(",") if x):
        s = known.get(f"drop_last@{k / ex.num_layers:g}")
        if s is None:
            point(f"drop_last ({k})", "static", Route(tuple(range(k)), ex.fingerprint))
    for s in statics:
        if s["method"] == "full":
            continue
        method = f"{s['method']} ({len(s['layers'])})" + ("" if s["method"] == "drop_last" else ", gen-fitted")
        if s["key"] in known:
            if rows.done(f"gen:{method}") is None:
                t = s["test"]
                rows.add({"key": f"gen:{method}", "task": "gen", "method": method, "kind": "static", "n": t["n"],
                          "accuracy": t["accuracy"], "ci95": t["ci95"], "mean_blocks": t["blocks"],
                          "note": f"from {Path(cfg.statics).name} (fit on 256 search, chosen on 256 validation)"})
        elif s["best"]:  # unseen tasks: only the routes the validation split chose, scored as they are
            point(method, "static", Route(tuple(s["layers"]), ex.fingerprint), "fitted on gen, scored as it is")
    if cfg.ppo_policy:
        from layerroute.policies import load_policy

        point("PPO (edit mode)", "ppo", load_policy(cfg.ppo_policy, ex), f"policy {cfg.ppo_policy}")


def oracle_points(cfg: Config, rows: Rows) -> None:
    """Gold and null per-sample MCTS figures on gen's search split: upper bounds and their chance level."""
    from layerroute.evaluation import wilson_interval
    from layerroute.search.analyze import load_pair

    header, gold, null = load_pair(cfg.labels)
    for kind, recs, name in (("oracle", gold, "MCTS ORACLE, gold labels"), ("null", null, "MCTS null labels")):
        key = f"gen:{name}"
        if rows.done(key) is None:
            k, n = sum(bool(r["correct"]) for r in recs), len(recs)
            rows.add({"key": key, "task": "gen", "method": name, "kind": kind, "n": n, "accuracy": k / n,
                      "ci95": list(wilson_interval(k, n)), "mean_blocks": sum(r["blocks"] for r in recs) / n,
                      "note": f"search split, {header['settings'].get('simulations')} simulations; reads the "
                              f"{'gold' if kind == 'oracle' else 'null'} label: upper bound, not a result"})


def speed(cfg: Config, ex, tok, net) -> str:
    """Median seconds per new token (batch 1, greedy) of routed generation against the full route."""
    from layerroute.routers import RoutedModel
    from layerroute.tasks import get_task
    from layerroute.tasks.prompts import render_prompt

    rm = RoutedModel(ex.model, net, tok)
    test = get_task("gen", seed=cfg.seed).split("test", cfg.seed)
    prompts = [render_prompt(tok, e.question) for e in test.examples[:cfg.speed_prompts]]
    times = {"routed": [], "full route": []}
    blocks = []
    for text in prompts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        for name in times:  # new tokens counted from the output: both stop at the end-of-sequence token
            t = time.perf_counter()
            if name == "routed":
                seq = rm.generate(ids, max_new_tokens=cfg.new_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
                blocks.append(rm.route(ids)[0].cost)
            else:
                seq = ex.generate(ids, None, [ex.route(None)], max_new_tokens=cfg.new_tokens, do_sample=False,
                                  eos_token_id=tok.eos_token_id).sequences
            times[name].append((time.perf_counter() - t) / max(1, seq.shape[1] - ids.shape[1]))
    r, f = statistics.median(times["routed"]), statistics.median(times["full route"])
    return (f"Routed generation at tau {net.config.tau}: median {1000 * r:.1f} ms per new token against "
            f"{1000 * f:.1f} ms for the full route through the same executor ({f / r:.2f}x), batch 1, "
            f"{cfg.new_tokens} new tokens, {len(prompts)} gen test prompts, mean {statistics.mean(blocks):.2f} "
            f"blocks; the routed time includes the routers' prefill walk.")


def static_routes(cfg: Config) -> list[dict]:
    """The rows of ``static_routes.json`` (recalibrated gen routes; not random), each marked ``best``
    where the validation split chose it at its budget."""
    if not cfg.statics:
        return []
    data = json.loads(Path(cfg.statics).read_text())
    best = data.get("best_static", {})
    return [{**r, "best": best.get(str(r["budget"])) == r["method"]} for r in data["rows"] if r["method"] != "random"]


def main(argv=None) -> None:
    cfg = parse_config(Config, argv, __doc__.splitlines()[0])
    command = experiment_command("headline", argv)
    import torch

    from layerroute import RouteExecutor, load_model

    torch.manual_seed(cfg.seed)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    rows = Rows(cfg, command)
    model, tok = load_model(cfg.model)
    ex = RouteExecutor(model)
    net = routers_for(cfg, ex, tok, rows)
    rows.save()
    statics = static_routes(cfg)
    oracle_points(cfg, rows)
    for name in (t for t in cfg.tasks.split(",") if t):
        print(f"# {name}", flush=True)
        measure_task(cfg, ex, tok, net, name, statics, rows)
    if "speed" not in rows.data["extra"]:
        rows.data["extra"]["speed"] = speed(cfg, ex, tok, net)
    rows.save()
    plot(rows.data, Path(cfg.out) / "headline.png")
    print(render(rows.data))


if __name__ == "__main__":
    main()
