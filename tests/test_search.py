"""The searcher base, the registry, the generic `layerroute search` entry, and resuming a killed search."""

import signal
import subprocess
import sys
import time

import pytest

from layerroute.cli import main
from layerroute.objective import Objective
from layerroute.search import SEARCHERS, RandomSearch, SearchError, get_searcher, register_searcher, run_search
from layerroute.search.base import RandomConfig
from layerroute.store import ResultsStore, read_store

from .test_objective import choice_task


def test_registry_refuses_duplicates_and_unknown_names():
    assert {"random_search", "greedy", "unified", "drop_last", "similarity", "random"} <= set(SEARCHERS)
    with pytest.raises(SearchError, match="already registered"):
        register_searcher(type("Again", (RandomSearch,), {"name": "random_search"}))
    with pytest.raises(SearchError, match="unknown searcher 'nope'; choose from"):
        get_searcher("nope")


@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_every_searcher_respects_the_budget(tiny, tok, name, tmp_path):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("cloze", n=4), budget=0.6)
    cls = SEARCHERS[name]
    # MCTS's default edit space refuses a hard budget below the full route: its per-layer space honours it
    config = cls.Config(**({"trials": 6} if cls.Config is RandomConfig else {"space": "sequential"} if name == "mcts"
                           else {}))
    with ResultsStore(tmp_path, {"kind": name}) as store:
        summary = run_search(cls(obj, config, seed=1), store)
    units = [r for r in store.records if r.get("type") != "summary"]
    checked = routes = 0
    for r in store.records:
        label = r.get("label")  # mcts: a route; its summary: a note
        found = ([r["layers"]] if "layers" in r else []) + ([r["route"]["layers"]] if "route" in r else []) \
            + [t["layers"] for t in r.get("top", [])] + ([label["layers"]] if isinstance(label, dict) else [])
        assert all(len(layers) <= 3 for layers in found), (r.get("key"), found)
        checked += bool(found) and r.get("type") != "summary"
        routes += len(found)
    assert summary["type"] == "summary"
    assert checked == len(units) >= (4 if name == "mcts" else 1)  # every unit (mcts: every sample) had routes
    if name == "mcts":
        assert all(r["top"] for r in units) and routes > 2 * len(units)  # the top routes were checked too


def test_random_search_is_seeded_and_keeps_the_best(tiny, tok, tmp_path):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("letter", n=5))
    runs = []
    for k in range(2):
        with ResultsStore(tmp_path / str(k), {"kind": "r"}) as store:
            runs.append((run_search(RandomSearch(obj, RandomConfig(trials=8, repeat_prob=0.3), seed=4), store),
                         store.records))
    assert runs[0][0] == runs[1][0]
    trials = [r for r in runs[0][1] if r.get("key", "").startswith("trial-")]
    assert runs[0][0]["reward"] == max(r["reward"] for r in trials)
    assert trials[0]["layers"] == list(range(5))  # the identity route is always tried
    with pytest.raises(SearchError, match="--trials must be at least 1"):
        RandomSearch(obj, RandomConfig(trials=0))


def _search_args(tiny_dir, out, *extra):
    return ["search", "random_search", "--model", str(tiny_dir), "--task", "suite:capitals", "--limit", "6",
            "--output", str(out), *extra]


def test_search_cli_writes_store_and_route_and_resumes(tiny_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_search_args(tiny_dir, out, "--trials", "5", "--budget", "0.6", "--lambda", "0.1")) == 0
    assert "best route" in capsys.readouterr().out
    header, records = read_store(out)
    assert header["kind"] == "search:random_search" and header["split"] == "search"
    assert header["settings"]["trials"] == 5 and header["settings"]["budget"] == "0.6"
    assert (out / "route.json").is_file()
    assert main(["eval", "--model", str(tiny_dir), "--task", "suite:capitals", "--limit", "4",
                 "--route", str(out / "route.json")]) == 0
    assert main(_search_args(tiny_dir, out, "--trials", "5", "--budget", "0.6", "--lambda", "0.1")) == 0
    assert read_store(out)[1] == records  # finished: nothing redone, nothing added
    assert main(_search_args(tiny_dir, out, "--trials", "6", "--budget", "0.6", "--lambda", "0.1")) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [(["--lambda", "nan"], "lambda must be a finite number"),
                                       (["--budget", "0.1"], "leaves no block"),
                                       (["--budget", "abc"], "not a number"),
                                       (["--trials", "0"], "--trials must be at least 1")])
def test_search_cli_bad_input(tiny_dir, tmp_path, capsys, extra, msg):
    assert main(_search_args(tiny_dir, tmp_path / "bad", *extra)) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_killed_search_resumes_and_loses_no_finished_line(tiny_dir, tmp_path):
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "layerroute.cli", *_search_args(tiny_dir, out, "--trials", "40")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        path = out / "results.jsonl"
        if path.exists() and len(path.read_text().splitlines()) > 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_store(out)[1]
    assert 5 <= len(before) < 40 and before[-1]["key"].startswith("trial-")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = read_store(out)[1]
    trials = [r["key"] for r in after if r.get("type") != "summary"]
    assert after[:len(before)] == before  # nothing finished was lost or rewritten
    assert sorted(trials) == sorted(f"trial-{t}" for t in range(40))  # each trial exactly once
