"""The Optuna per-task searcher: storage resume, seeds, budgets, pruning, refused studies, Pareto front, Ray."""

import dataclasses
import json
import random
import time

import optuna
import pytest

from layerroute.cli import main
from layerroute.objective import Objective
from layerroute.search import SearchError, run_search
from layerroute.search.optuna_search import OptunaConfig, OptunaSearch, make_storage, pareto_front, route_layers
from layerroute.store import ResultsStore, read_store

from .test_objective import choice_task


@pytest.fixture(scope="module")
def obj(tiny, tok):  # noqa: F811
    return Objective(tiny, tok, choice_task("cloze", n=4), budget=0.6, batch_rows=2)  # 3 blocks, 2 chunks


def _run(obj, path, seed=0, **config):
    with ResultsStore(path, {"kind": "search:optuna"}) as store:
        summary = run_search(OptunaSearch(obj, OptunaConfig(**config), seed=seed), store, progress=False)
    return summary, [r for r in store.records if r.get("type") != "summary"]


def test_route_layers_holds_the_budget_and_keeps_a_block():
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(1, 12)
        u = [rng.random() for _ in range(L)]
        cap = rng.choice([None, rng.randint(1, 2 * L)])
        for space in ("skip", "actions"):
            layers = route_layers(u, space, cap)
            assert 1 <= len(layers) <= (cap or 2 * L)
            if space == "skip" and cap is not None and cap < L:
                assert len(layers) == cap  # a binding budget is spent in full
            assert list(layers) == sorted(layers)  # in order
            assert max(layers.count(i) for i in layers) <= (1 if space == "skip" else 2)
    assert route_layers([0.5] * 5, "skip", 3) == (0, 1, 2)  # the anchor under a budget: the first blocks
    assert route_layers([0.5] * 5, "actions", None) == (0, 1, 2, 3, 4)
    assert route_layers([0.9, 0.1, 0.7, 0.2, 0.3], "actions", 3) == (0, 0, 2)  # lowest scores lose passes first
    assert route_layers([0.1, 0.2, 0.0], "skip", None) == (1,)  # nothing kept: the highest score runs
    assert route_layers([0.1, 0.9, 0.0, 0.8], "skip", 2) == (1, 3)  # under a budget: the top scores


@pytest.mark.parametrize("space", ["skip", "actions"])
def test_budget_holds_and_the_best_is_the_best_complete_trial(obj, tmp_path, space):
    summary, records = _run(obj, tmp_path, trials=10, space=space, seed=2)
    assert [r["key"] for r in records] == [f"trial-{i}" for i in range(10)]
    assert all(1 <= r["blocks"] <= 3 and len(r["layers"]) == r["blocks"] for r in records)
    assert records[0]["layers"] == [0, 1, 2]  # trial-0: the first blocks
    complete = [r for r in records if r["state"] == "COMPLETE"]
    assert summary["reward"] == max(r["reward"] for r in complete)
    assert len(summary["route"]["layers"]) <= 3
    assert (tmp_path / "study.db").is_file()  # the default storage sits next to the store


def test_same_seed_same_trials_and_route(obj, tmp_path):
    a, ra = _run(obj, tmp_path / "a", seed=5, trials=8)
    b, rb = _run(obj, tmp_path / "b", seed=5, trials=8)
    assert [r["layers"] for r in ra] == [r["layers"] for r in rb]
    assert a["route"] == b["route"] and a["reward"] == b["reward"]
    _, rc = _run(obj, tmp_path / "c", seed=6, trials=8)
    assert [r["layers"] for r in rc] != [r["layers"] for r in ra]  # the seed matters


def test_study_resumes_from_its_storage(obj, tmp_path):
    storage = str(tmp_path / "study.journal")  # a journal file, as many processes would share
    _, first = _run(obj, tmp_path / "a", trials=4, storage=storage, study_name="s")
    # a fresh results store on the same study: the 4 finished trials are read back, only 2 new ones run
    _, second = _run(obj, tmp_path / "b", trials=6, storage=storage, study_name="s")
    assert second[:4] == first
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))
    assert len(study.trials) == 6
    assert [r["number"] for r in second] == list(range(6))


def test_a_storage_with_another_studys_settings_is_refused(obj, tiny, tok, tmp_path):  # noqa: F811
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    _run(obj, tmp_path / "a", trials=2, storage=storage, study_name="s")
    other = Objective(tiny, tok, choice_task("cloze", n=4), budget=0.8, batch_rows=2)
    with pytest.raises(SearchError, match=r"holds another study's settings \(max_blocks: stored 3, now 4\)"):
        _run(other, tmp_path / "b", trials=2, storage=storage, study_name="s")
    with pytest.raises(SearchError, match="space: stored 'skip', now 'actions'"):
        _run(obj, tmp_path / "c", trials=2, storage=storage, study_name="s", space="actions")
    foreign = optuna.create_study(study_name="theirs", storage=storage)
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(SearchError, match="was not made by layerroute"):
        _run(obj, tmp_path / "d", trials=2, storage=storage, study_name="theirs")


def test_trials_report_chunks_and_a_bad_trial_is_pruned(obj):
    searcher = OptunaSearch(obj, OptunaConfig(trials=2))
    study = searcher.study()  # in memory: no store, no storage given
    dists = searcher.distributions()
    for k in range(6):  # earlier trials that scored far better at every chunk
        study.add_trial(optuna.trial.create_trial(params={n: 0.5 for n in dists}, distributions=dists,
                                                  value=100.0, intermediate_values={0: 100.0, 1: 100.0}))
    trial = study.ask(dists)
    record = searcher._score((0, 1, 2), trial)
    assert record["state"] == "PRUNED" and record["chunks"] == 1 and record["samples"] < len(obj)
    assert study.trials[-1].intermediate_values == {0: pytest.approx(record["reward"])}
    full = searcher._score((0, 1, 2))  # unreported: every chunk is scored
    assert full["state"] == "COMPLETE" and full["chunks"] == 2 and full["samples"] == len(obj)
    records = [{"key": "a", "number": 0, "state": "PRUNED", "reward": 9.0, "blocks": 1, "layers": [0]},
               {"key": "b", "number": 1, "state": "COMPLETE", "reward": -1.0, "blocks": 2, "layers": [0, 1]}]
    assert searcher.summarize(records)["route"]["layers"] == [0, 1]  # a pruned trial is never the best


def test_multi_objective_returns_the_pareto_front_and_plots_it(obj, tmp_path):
    summary, records = _run(obj, tmp_path, trials=10, multi_objective=True, seed=1)
    front = summary["front"]
    assert front and (tmp_path / "pareto.png").stat().st_size > 1000
    complete = [r for r in records if r["state"] == "COMPLETE"]
    for f in front:  # nothing beats a front point on both objectives
        assert not any(r["reward"] > f["reward"] and r["blocks"] <= f["blocks"] for r in complete)
    assert [f["blocks"] for f in front] == sorted({f["blocks"] for f in front})
    assert pareto_front([{"layers": [0], "blocks": 1, "reward": 1.0, "number": 0},
                         {"layers": [0, 1], "blocks": 2, "reward": 0.5, "number": 1}]) == \
        [{"layers": [0], "blocks": 1, "reward": 1.0, "trial": 0}]


def test_bad_options_are_refused():
    with pytest.raises(SearchError, match="--trials must be at least 1"):
        OptunaConfig(trials=0).validate()
    with pytest.raises(SearchError, match="cmaes cannot optimise several objectives"):
        OptunaConfig(sampler="cmaes", multi_objective=True).validate()
    with pytest.raises(SearchError, match="cannot open the Optuna storage 'nosuchdb://x'"):
        make_storage("nosuchdb://x")


def _cli(tiny_dir, out, *extra):
    return ["search", "optuna", "--model", str(tiny_dir), "--task", "suite:capitals", "--limit", "4",
            "--batch-rows", "8", "--budget", "0.6", "--output", str(out), *extra]


def test_cli_resumes_with_more_trials_and_saves_the_route(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_cli(tiny_dir, out, "--trials", "3", "--sampler", "random")) == 0
    assert "best route" in capsys.readouterr().out
    assert main(_cli(tiny_dir, out, "--trials", "5", "--sampler", "random")) == 0
    header, records = read_store(out)
    trials = [r for r in records if r.get("type") != "summary"]
    assert [r["key"] for r in trials] == [f"trial-{i}" for i in range(5)]  # 3, then only the 2 new ones
    assert "trials" not in header["settings"] and header["settings"]["sampler"] == "random"
    route = json.loads((out / "route.json").read_text())
    assert route["layers"] == records[-1]["route"]["layers"] and len(route["layers"]) <= 3


def test_unreachable_ray_address_fails_fast(tiny_dir, tmp_path, capsys):
    t = time.monotonic()
    assert main(_cli(tiny_dir, tmp_path / "r", "--ray-address", "127.0.0.1:1")) == 2
    assert "no Ray cluster answers at 127.0.0.1:1" in capsys.readouterr().err
    # Not a benchmark: a hang is ray.init retrying for minutes; a refused connect returns at once,
    # so even a loaded machine stays far below 60 s.
    assert time.monotonic() - t < 60


def test_ray_run_equals_local_run(tiny_dir, tmp_path):
    pytest.importorskip("ray")
    args = ("--trials", "6", "--sampler", "random", "--pruner", "none", "--seed", "3")
    assert main(_cli(tiny_dir, tmp_path / "local", *args)) == 0
    assert main(_cli(tiny_dir, tmp_path / "ray", *args, "--workers", "2")) == 0
    local, remote = (read_store(tmp_path / d)[1] for d in ("local", "ray"))

    def trials(records):
        return sorted((r["key"], r["layers"], round(r["reward"], 4)) for r in records if r.get("type") != "summary")
    assert trials(remote) == trials(local)
    assert remote[-1]["route"] == local[-1]["route"]


def test_optuna_joins_the_baselines_table_and_the_best_row_is_chosen_on_validation(tiny, tok):  # noqa: F811
    from layerroute.search.baselines import run_baselines, validation_key

    from .test_evaluation import choice_task as capitals  # 14 questions: 4 in the validation split

    task = capitals("cloze", n=14)
    rows = run_baselines(tiny, tok, task, [0.6], ["drop_last", "optuna"], calib_limit=4, val_limit=4, progress=False)
    assert [r["baseline"] for r in rows] == ["full", "drop_last", "optuna", "best"]
    assert rows[2]["blocks"] <= 3 and rows[2]["accuracy"] is not None
    assert rows[1]["calib_n"] == rows[2]["calib_n"] == 4
    assert rows[1]["val"]["n"] == rows[2]["val"]["n"] == len(task.split("validation").examples) == 4
    chosen = max(rows[1:3], key=lambda r: validation_key(r["val"]))
    assert rows[3]["chosen"] == chosen["baseline"] and rows[3]["route"] == chosen["route"]


def test_optuna_route_chooses_among_its_top_trials_on_validation(tiny, tok):  # noqa: F811
    from layerroute.search.optuna_search import optuna_route

    task = choice_task("cloze", n=8)
    fit = Objective(tiny, tok, task)
    details = []
    optuna_route(fit, 3, seed=0, trials=10, validation=fit, top=3, details=details)
    assert len(details) == 3 and [d["search_reward"] for d in details] == sorted(
        (d["search_reward"] for d in details), reverse=True)
    # a validation split on which the search-best route is wrong everywhere and another candidate right
    answers = {}
    for d in details:
        state = fit.advance(fit.begin(range(len(fit))), [d["layers"]] * len(fit))
        answers[d["trial"]] = fit.option_logliks(state).argmax(-1).tolist()
    best = details[0]["trial"]
    other = next(d["trial"] for d in details[1:] if answers[d["trial"]] != answers[best])
    keep = [i for i in range(len(fit)) if answers[other][i] != answers[best][i]]
    val = Objective(tiny, tok, task, [dataclasses.replace(task.examples[i], answer="ABCD"[answers[other][i]])
                                      for i in keep])
    details = []
    route = optuna_route(fit, 3, seed=0, trials=10, validation=val, top=3, details=details)
    chosen = next(d for d in details if d["chosen"])
    assert route.layers == tuple(chosen["layers"]) and chosen["trial"] != best
    assert chosen["val"]["accuracy"] == 1.0 and details[0]["val"]["accuracy"] == 0.0
    assert optuna_route(fit, 3, seed=0, trials=10).layers == tuple(details[0]["layers"])  # no validation: search-best


def test_prefix_reuse_across_trials_equals_scoring_from_scratch(tiny, tok):  # noqa: F811
    obj, other = (Objective(tiny, tok, choice_task("letter", n=6), batch_rows=4) for _ in range(2))
    cached, plain = OptunaSearch(obj, OptunaConfig()), OptunaSearch(other, OptunaConfig(cache_mb=0))
    for layers in [(0, 1, 2, 3, 4), (0, 1, 2, 4), (0, 1, 2, 3), (1, 2, 3, 4), (0, 1, 2, 3, 4, 4)]:
        a, b = cached._score(layers), plain._score(layers)
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)
        assert a["reward"] == pytest.approx(obj.mean_reward(layers), abs=1e-5)
    # the states live in the objective's one prefix cache, keyed by (the chunk's samples, the blocks run)
    assert len(obj.prefixes) and not len(other.prefixes)
    assert (((0, 1, 2, 3), (0, 1, 2)) in obj.prefixes.lru) and obj.prefixes.bytes > 0
