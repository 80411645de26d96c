"""Optuna per-task routes: one static route for a task, found by an Optuna study.

Space (``--space``). Each layer ``i`` gets a score ``u_i`` in [0, 1] (float parameters, so TPE,
random, CMA-ES and NSGA-II all apply):

* ``skip`` (default): under a budget of ``k < L`` blocks, the ``k`` layers with the highest ``u``
  run, in order (exactly ``k`` blocks, like the static baselines, so no trial wastes budget);
  without one, layer ``i`` runs if ``u_i >= 0.5``;
* ``actions`` (Dr.LLM): skip if ``u_i < 1/3``, execute if ``u_i < 2/3``, else repeat (two passes).

The budget holds by construction: a sampled route over ``objective.max_blocks`` is repaired by
removing one pass at a time from the executed layer with the lowest ``u`` (ties: the later
layer), and a route with no block keeps the layer with the highest ``u``. The trial stores the
repaired route, so no trial, pruned or complete, ever runs over the budget. ``trial-0`` is the
all-``0.5`` point: the identity route, or the first blocks under a budget (``drop_last``).
TPE starts from ``TPE_STARTUP`` random trials (5, not Optuna's 10: studies here are short).

Scoring and pruning: a trial scores its route on the objective's chunks (``objective.batches``)
and reports the running mean reward after each; the ``median`` pruner stops a trial whose
running mean is below the median of earlier trials at the same chunk. Pruned trials are stored
but never become the best route. A route a complete trial has scored is not scored again (the
record says ``same_as``), and a trial continues from the longest prefix state it shares with
earlier trials (kept every 3 blocks per chunk in the objective's prefix cache, LRU under ``--cache-mb``). With
``--multi-objective`` the study maximises the mean reward and minimises blocks (NSGA-II by
default; Optuna cannot prune multi-objective trials), and the summary holds the Pareto front,
plotted to ``pareto.png`` next to the store.

Storage: real Optuna storage. Default ``sqlite:///<output>/study.db``; ``--storage`` takes an RDB
URL or a journal file path (``JournalStorage(JournalFileBackend(path))``, for many processes).
A study resumes by name (``--study-name``, default derived from the task and the settings); the
searcher stores its settings in the study's user attrs and refuses a study with other settings.

Units: ``trial-0`` .. ``trial-{N-1}``, one record per finished trial (number, layers, blocks,
reward, state). A key already finished in the study is read back, not rerun, so raising
``--trials`` runs only the new trials. Each trial's sampler is seeded from ``(seed, key)``
(optuna's ``reseed_rng`` idea, made deterministic), so the same seed gives the same trials in one
process, and on Ray (``layerroute.search.distributed``, where actors run trials against the one
shared storage) the random sampler gives exactly the local trials; model-based samplers there
see the trials finished so far, which depends on timing. On a cluster, give ``--storage`` a path
or URL every node reaches (the default sqlite file sits on the driver's disk).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from layerroute.tasks.base import stable_rng

from .base import SearchConfig, SearchError, Searcher, option, register_searcher

SPACES = ("skip", "actions")
SAMPLERS = ("auto", "tpe", "random", "cmaes", "nsga2")
PRUNERS = ("median", "none")
ATTR = "layerroute"  # the study user attr that holds the searcher's settings
NSGA2_POPULATION = 12  # small: studies here hold tens of trials, not thousands
PRUNE_STARTUP = 5  # trials before the median pruner may stop one
TPE_STARTUP = 5  # random trials before TPE models the rest
PREFIX_STRIDE = 3  # a trial's prefix state is kept after every 3 blocks


@dataclass
class OptunaConfig(SearchConfig):
    trials: int = option(40, "finished trials (complete or pruned) the study should hold; rerun with more to "
                             "add trials")
    space: str = option("skip", "skip: each layer run or skipped, in order (under a budget of k blocks: exactly "
                                "k); actions: Dr.LLM skip/execute/repeat per layer", choices=SPACES)
    sampler: str = option("auto", "auto (TPE; NSGA-II with --multi-objective), tpe, random, cmaes or nsga2",
                          choices=SAMPLERS)
    multi_objective: bool = option(False, "maximise reward and minimise blocks; returns the Pareto front "
                                          "(pareto.png)")
    pruner: str = option("median", "median: stop a trial whose running mean reward is below the median of "
                                   "earlier trials at the same chunk; none", choices=PRUNERS)
    storage: str = option("", "Optuna storage: an RDB URL (sqlite:///x.db) or a journal file path (many "
                              "processes); default sqlite:///<output>/study.db")
    study_name: str = option("", "the study to create or resume (default: from the task and the settings)")
    cache_mb: float = option(256.0, "memory cap of the prefix states reused across trials, in MiB (0: none)")

    def validate(self) -> None:
        if self.trials < 1:
            raise SearchError(f"--trials must be at least 1, got {self.trials}")
        for name, value, allowed in (("space", self.space, SPACES), ("sampler", self.sampler, SAMPLERS),
                                     ("pruner", self.pruner, PRUNERS)):
            if value not in allowed:
                raise SearchError(f"--{name} {value!r} is unknown; use one of {', '.join(allowed)}")
        if self.multi_objective and self.sampler == "cmaes":
            raise SearchError("--sampler cmaes cannot optimise several objectives; use nsga2, tpe or random")
        if self.sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
            raise SearchError("--sampler cmaes needs the cmaes package: pip install cmaes")

    @property
    def sampler_name(self) -> str:
        return self.sampler if self.sampler != "auto" else "nsga2" if self.multi_objective else "tpe"


def route_layers(u, space: str, max_blocks: int | None) -> tuple[int, ...]:
    """The in-order route of layer scores ``u`` (see the module docstring), repaired to the budget."""
    order = sorted(range(len(u)), key=lambda i: (u[i], -i))  # who loses a pass first
    if space == "skip" and max_blocks is not None and max_blocks < len(u):
        return tuple(sorted(order[-max_blocks:]))
    counts = [int(x >= 0.5) for x in u] if space == "skip" else [0 if x < 1 / 3 else 1 if x < 2 / 3 else 2 for x in u]
    while max_blocks is not None and sum(counts) > max_blocks:
        counts[next(i for i in order if counts[i])] -= 1
    if not any(counts):
        counts[order[-1]] = 1
    return tuple(i for i, c in enumerate(counts) for _ in range(c))


def make_storage(spec: str):
    """An Optuna storage: in memory (``""``), an RDB URL (``sqlite:///x.db``) or a journal file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if not spec:
        return optuna.storages.InMemoryStorage()
    try:
        if "://" in spec:
            if spec.startswith("sqlite:///"):
                Path(spec.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(spec)
        Path(spec).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(spec))
    except Exception as exc:  # a bad URL, a missing driver, an unwritable path
        raise SearchError(f"cannot open the Optuna storage {spec!r}: {str(exc).splitlines()[0]}") from None


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


@register_searcher
class OptunaSearch(Searcher):
    """One route per task: an Optuna study (TPE by default) over skip sets or Dr.LLM actions, under the budget."""

    name = "optuna"
    Config = OptunaConfig

    def __init__(self, objective, config=None, seed: int = 0):
        super().__init__(objective, config, seed)
        self._study = None

    def units(self) -> list[str]:
        self.study()  # created (or checked) here, on the driver, before any worker opens it
        return [f"trial-{t}" for t in range(self.config.trials)]

    def settings(self) -> dict:
        settings = super().settings()
        del settings["trials"]  # the study's extent, not its definition: more trials resume it
        del settings["cache_mb"]  # speed only
        return settings

    # ---- the study --------------------------------------------------------------------------
    def study_settings(self) -> dict:
        """What defines the study's trials; kept in its user attrs and compared on resume."""
        obj, cfg = self.objective, self.config
        uids = hashlib.sha256("\n".join(ex.uid for ex in obj.examples).encode()).hexdigest()[:16]
        return {"model": obj.executor.fingerprint.to_dict(), "task": obj.task.name, "samples": uids,
                "num_samples": len(obj), "reward": obj.reward_kind, "lambda": obj.lam, "max_blocks": obj.max_blocks,
                "batch_rows": obj.batch_rows, "space": cfg.space, "sampler": cfg.sampler_name,
                "multi_objective": cfg.multi_objective, "pruner": self.pruning, "seed": self.seed}

    @property
    def pruning(self) -> str:
        return "none" if self.config.multi_objective else self.config.pruner

    def storage_spec(self) -> str:
        if self.config.storage:
            return self.config.storage
        return f"sqlite:///{self.workdir / 'study.db'}" if self.workdir is not None else ""

    def study_name(self) -> str:
        if self.config.study_name:
            return self.config.study_name
        digest = hashlib.sha256(_canonical(self.study_settings()).encode()).hexdigest()[:8]
        budget = self.objective.max_blocks or "all"
        return f"{self.objective.task.name}-{self.config.space}-{budget}blocks-{digest}"

    def study(self):
        """The study, created or resumed from its storage; refused if it holds other settings."""
        if self._study is not None:
            return self._study
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage, name = make_storage(self.storage_spec()), self.study_name()
        pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP) if self.pruning == "median" \
            else optuna.pruners.NopPruner()
        directions = ["maximize", "minimize"] if self.config.multi_objective else ["maximize"]
        try:
            study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        except KeyError:
            try:
                study = optuna.create_study(storage=storage, study_name=name, pruner=pruner, directions=directions)
            except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
                study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        mine, theirs = self.study_settings(), study.user_attrs.get(ATTR)
        where = f"study {name!r} in {self.storage_spec() or 'memory'}"
        if theirs is None:
            if study.get_trials(deepcopy=False):
                raise SearchError(f"{where} has trials but was not made by layerroute's optuna searcher; choose "
                                  f"another --study-name or --storage")
            study.set_user_attr(ATTR, mine)
        elif _canonical(theirs) != _canonical(mine):
            diff = sorted(k for k in set(theirs) | set(mine) if _canonical(theirs.get(k)) != _canonical(mine.get(k)))
            detail = "; ".join(f"{k}: stored {theirs.get(k)!r}, now {mine.get(k)!r}" for k in diff)
            raise SearchError(f"{where} holds another study's settings ({detail}); choose another --study-name "
                              f"or --storage")
        self._study = study
        return study

    def sampler(self, key: str):
        """A sampler seeded from ``(seed, key)``: the same trial plan in any process."""
        import optuna

        seed = stable_rng(f"optuna:{self.seed}:{key}").randrange(2 ** 31)
        name = self.config.sampler_name
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)

    def distributions(self) -> dict:
        import optuna

        return {f"u{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(self.objective.num_layers)}

    # ---- trials -----------------------------------------------------------------------------
    def search(self, keys):
        import optuna

        study = self.study()
        done = {t.user_attrs.get("key"): t for t in study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))}
        for key in keys:
            if key in done:  # finished in the study already (a resumed or shared study)
                t = done[key]
                yield {"key": key, "number": t.number, **t.user_attrs["record"]}
            else:
                yield self._trial(study, key)

    def _trial(self, study, key: str) -> dict:
        import optuna

        dists = self.distributions()
        if key == "trial-0":  # the anchor: every u = 0.5
            params = {name: 0.5 for name in dists}
            running = []
            record = self._score(route_layers(list(params.values()), self.config.space, self.objective.max_blocks),
                                 running=running)
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=dists, user_attrs={"key": key, "record": record},
                intermediate_values=None if self.config.multi_objective else dict(enumerate(running)),
                **self._values(record)))
            number = next(t.number for t in reversed(study.get_trials(deepcopy=False))
                          if t.user_attrs.get("key") == key)
            return {"key": key, "number": number, **record}
        study.sampler = self.sampler(key)
        trial = study.ask(dists)
        trial.set_user_attr("key", key)
        try:
            layers = route_layers([trial.params[name] for name in dists], self.config.space, self.objective.max_blocks)
            record = self._scored(study, layers) or self._score(layers, trial)
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        trial.set_user_attr("record", record)
        if record["state"] == "PRUNED":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, values=self._values(record)["values"])
        return {"key": key, "number": trial.number, **record}

    @staticmethod
    def _scored(study, layers) -> dict | None:
        """The record of a complete trial of the study with the same route: a route is scored once."""
        import optuna

        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            record = t.user_attrs.get("record")
            if record is not None and tuple(record["layers"]) == layers:
                return {**record, "same_as": t.number}
        return None

    def _rewards(self, chunk: list[int], layers: tuple[int, ...]):
        """Rewards of ``layers`` on ``chunk``, continuing from the longest cached prefix state.

        States after every ``PREFIX_STRIDE`` blocks of the routes scored so far are kept per chunk in the
        objective's prefix cache (LRU, capped at ``--cache-mb``), so a trial reruns only the blocks after the prefix it shares
        with earlier trials (TPE's trials share ever longer prefixes as it converges)."""
        obj = self.objective
        if obj.reward_kind == "correct" and obj.task.kind == "generate" or self.config.cache_mb <= 0:
            return obj.score(chunk, [layers] * len(chunk)).reward  # decoding: no prefix states
        cache = obj.prefixes.limit(int(self.config.cache_mb * 2 ** 20))
        state, start = cache.deepest(chunk, layers)
        if state is None:
            state = obj.begin(chunk)
        for m in range(PREFIX_STRIDE, len(layers) + 1, PREFIX_STRIDE):
            if m > start:
                state = obj.advance(state, [layers[start:m]] * len(chunk))
                cache.put(chunk, layers[:m], state)
                start = m
        return obj.finish(obj.advance(state, [layers[start:]] * len(chunk))).reward

    def _values(self, record: dict) -> dict:
        """``create_trial`` keywords: the objective values of a record."""
        if self.config.multi_objective:
            return {"values": [record["reward"], record["blocks"]]}
        return {"values": [record["reward"]]}

    def _score(self, layers: tuple[int, ...], trial=None, running: list | None = None) -> dict:
        """Mean reward of ``layers`` chunk by chunk, reported to ``trial`` (pruned when it says so);
        ``running`` collects the running mean after each chunk."""
        obj = self.objective
        assert obj.max_blocks is None or len(layers) <= obj.max_blocks
        total, n, state, step = 0.0, 0, "COMPLETE", -1
        for step, chunk in enumerate(obj.batches(range(len(obj)))):
            total += float(self._rewards(chunk, tuple(layers)).sum())
            n += len(chunk)
            if running is not None:
                running.append(total / n)
            if trial is not None and self.pruning != "none":
                trial.report(total / n, step)
                if n < len(obj) and trial.should_prune():
                    state = "PRUNED"
                    break
        return {"layers": list(layers), "blocks": len(layers), "reward": total / n, "state": state,
                "samples": n, "chunks": step + 1}

    # ---- the result -------------------------------------------------------------------------
    def summarize(self, records: list[dict]) -> dict:
        complete = [r for r in records if r["state"] == "COMPLETE" and math.isfinite(r["reward"])]
        if not complete:
            raise SearchError("no trial finished unpruned; raise --trials or use --pruner none")
        best = max(complete, key=lambda r: (r["reward"], -r["blocks"]))  # ties: fewer blocks, then the earlier
        summary = {"route": self.route(best["layers"]).to_dict(), "reward": best["reward"], "blocks": best["blocks"],
                   "trial": best["number"], "trials": len(records),
                   "pruned": sum(r["state"] == "PRUNED" for r in records),
                   "study": self.study_name(), "storage": self.storage_spec() or "memory"}
        if self.config.multi_objective:
            summary["front"] = pareto_front(complete)
            if self.workdir is not None:
                plot_pareto(complete, summary["front"], self.workdir / "pareto.png", self.objective.task.name)
        return summary


def top_routes(records: list[dict], top: int) -> list[dict]:
    """The ``top`` best distinct routes of complete trials, by search reward (ties: fewer blocks, earlier)."""
    complete = [r for r in records if r["state"] == "COMPLETE" and math.isfinite(r["reward"])]
    if not complete:
        raise SearchError("no trial finished unpruned; raise --trials or use --pruner none")
    out, seen = [], set()
    for r in sorted(complete, key=lambda r: (-r["reward"], r["blocks"], r["number"])):
        if tuple(r["layers"]) not in seen and len(out) < top:
            seen.add(tuple(r["layers"]))
            out.append(r)
    return out


def optuna_route(objective, k: int, seed: int = 0, trials: int = 40, validation=None, top: int = 3,
                 details: list | None = None):
    """The route of an in-memory TPE study on ``objective``'s examples at most ``k`` blocks (the
    ``optuna`` row of ``run_baselines``). With a ``validation`` objective, the ``top`` best distinct
    routes on ``objective`` are re-scored there and the best on validation wins (``validation_key``);
    without one, the best on ``objective``. ``details`` (a list) receives each candidate: its trial,
    layers, search reward, validation stats and whether it was chosen."""
    from layerroute.budget import Budget
    from layerroute.objective import Objective

    from .baselines import choose_on_validation

    obj = Objective(objective.executor, objective.tokenizer, objective.task, objective.examples,
                    reward=objective.reward_kind, lam=objective.lam, budget=Budget(blocks=k), chat=objective.chat,
                    batch_rows=objective.batch_rows, null_seed=objective.null_seed)
    searcher = OptunaSearch(obj, OptunaConfig(trials=trials), seed=seed)
    candidates = top_routes(list(searcher.search(searcher.units())), top if validation is not None else 1)
    routes = {r["number"]: searcher.route(r["layers"]) for r in candidates}
    chosen, stats = (candidates[0]["number"], {}) if validation is None else choose_on_validation(validation, routes)
    if details is not None:
        details += [{"trial": r["number"], "layers": r["layers"], "blocks": r["blocks"], "search_reward": r["reward"],
                     "val": stats.get(r["number"]), "chosen": r["number"] == chosen} for r in candidates]
    return routes[chosen]


def pareto_front(records: list[dict]) -> list[dict]:
    """The records no other record beats on both reward (higher) and blocks (fewer), by blocks."""
    front = {}
    for r in sorted(records, key=lambda r: (r["blocks"], -r["reward"])):
        if not front or r["reward"] > max(f["reward"] for f in front.values()):
            front.setdefault(r["blocks"], r)
    return [{"layers": r["layers"], "blocks": r["blocks"], "reward": r["reward"], "trial": r["number"]}
            for r in front.values()]


def plot_pareto(records: list[dict], front: list[dict], path: Path, title: str) -> None:
    """Every complete trial (reward against blocks) with the Pareto front drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r["blocks"] for r in records], [r["reward"] for r in records], s=14, alpha=0.5, label="trials")
    ax.step([f["blocks"] for f in front], [f["reward"] for f in front], where="post", marker="o", color="C3",
            label="Pareto front")
    ax.set_xlabel("executed blocks per token")
    ax.set_ylabel("mean reward (search split)")
    ax.set_title(f"optuna multi-objective: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
