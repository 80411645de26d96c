"""Per-sample MCTS (an oracle): never worse than identity, budgets, seeds, prefix reuse equals naive,
lockstep equals one at a time, resuming, refusals, and `layerroute analyze`."""

import json

import pytest

from layerroute.cli import main
from layerroute.objective import Objective
from layerroute.search import SearchError
from layerroute.search.analyze import AnalyzeError, analyze, compare, load_mcts, load_pair, report
from layerroute.search.labels import LabelError, check_pair, null_threshold, robust_layers
from layerroute.search.mcts import MCTS, EditTree, MCTSConfig, Node
from layerroute.store import read_store

from .test_objective import choice_task

NO_STOP = dict(beat_margin=-1.0, stop_shorter=0)  # the edit space's early stops off: every simulation runs
SPACES = [dict(space="edit", **NO_STOP), dict(space="sequential"), dict(space="cola"),
          dict(space="cola", macros=True, max_count=3)]


def _run(obj, seed=0, keys=None, **cfg):
    keys = keys or [ex.uid for ex in obj.examples]
    return list(MCTS(obj, MCTSConfig(**{"simulations": 16, **cfg}), seed).search(keys))


def _same(a, b):
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b):
        assert x["layers"] == y["layers"]
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-4)
        assert [t["layers"] for t in x["top"]] == [t["layers"] for t in y["top"]]


@pytest.mark.parametrize("cfg", SPACES)
def test_never_worse_than_identity_and_prefix_reuse_equals_naive(tiny, tok, cfg):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("cloze", n=4))
    fast = _run(obj, **cfg, lockstep=3)
    naive = _run(obj, **cfg, naive=True)
    _same(fast, naive)
    L = obj.num_layers
    assert len(fast) == 4  # one record per sample
    for r in fast:
        assert r["reward"] >= r["identity"]["reward"]
        assert r["identity"]["blocks"] == L and r["simulations"] == 16
        assert r["top"][0]["layers"] == r["layers"] and r["top"][0]["reward"] == r["reward"]
        assert r["routes_scored"] <= 17  # the identity route, then at most one new route per simulation
    assert any(r["reward"] > r["identity"]["reward"] for r in fast)  # the search finds something
    assert any(r["layers"] != list(range(L)) for r in fast)
    # prefix reuse and deduplication run fewer blocks than re-running every route
    ratio = sum(r["block_executions"] for r in fast) / sum(r["block_executions"] for r in naive)
    assert ratio < 1
    assert all(r["peak_cache_bytes"] > 0 for r in fast)
    if cfg["space"] == "sequential":
        assert all(r["layers"] == sorted(r["layers"]) for r in fast)  # in order


@pytest.mark.parametrize("cfg", SPACES[1:])
def test_budgets_and_length_bounds_hold(tiny, tok, cfg):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("letter", n=4), budget=0.6)  # at most 3 of 5 blocks
    records = _run(obj, **cfg, simulations=20)
    assert len(records) == 4 and all(r["top"] for r in records)
    for r in records:
        assert r["identity"]["reward"] is None  # the identity route is over the budget
        routes = [r["layers"]] + [t["layers"] for t in r["top"]]
        assert all(1 <= len(x) <= 3 for x in routes)
        assert all(max(x.count(b) for b in x) <= (cfg.get("max_count", 2)) for x in routes)
    wide = Objective(tiny, tok, choice_task("letter", n=3))
    records = _run(wide, space="cola", max_length=6, simulations=30)
    assert len(records) == 3 and all(r["top"] for r in records)
    for r in records:
        assert all(len(t["layers"]) <= 6 for t in r["top"])
        assert all(max(t["layers"].count(b) for b in t["layers"]) <= 2 for t in r["top"])


def test_seeded_lockstep_leaves_and_cache_cap_do_not_change_results(tiny, tok):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("cloze", n=4))
    ref = _run(obj, seed=3)
    _same(ref, _run(obj, seed=3))  # same seed, same result
    assert [r["top"] for r in _run(obj, seed=4)] != [r["top"] for r in ref]  # the seed matters
    _same(ref, [rec for ex in obj.examples for rec in _run(obj, seed=3, keys=[ex.uid])])  # one at a time
    _same(ref, _run(obj, seed=3, lockstep=2, cache_mb=0.0))  # groups and an empty cache: same routes
    keys = [ex.uid for ex in obj.examples]
    _same(ref[::-1], _run(obj, seed=3, keys=keys[::-1]))  # the order of the keys does not matter
    wide = _run(obj, seed=3, leaves_per_sample=4)
    _same(wide, _run(obj, seed=3, leaves_per_sample=4, naive=True))  # virtual loss: same in both modes
    assert all(r["simulations"] == 16 or (r["simulations"] < 16 and r["stopped"]) for r in wide)
    assert all(r["reward"] >= r["identity"]["reward"] for r in wide)


@pytest.mark.parametrize("field,value,msg", [("simulations", 0, "--simulations must be at least 1, got 0"),
                                             ("random_child", 1.5, "--random-child must be in [0, 1]"),
                                             ("leaves_per_sample", 0, "--leaves-per-sample must be at least 1")])
def test_bad_config_is_refused(tiny, tok, field, value, msg):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("letter", n=2))
    with pytest.raises(SearchError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        MCTS(obj, MCTSConfig(**{field: value}))
    with pytest.raises(SearchError, match="unknown sample keys"):
        list(MCTS(obj, MCTSConfig(simulations=2)).search(["nope"]))


def _mcts_args(tiny_dir, out, *extra):
    return ["search", "mcts", "--model", str(tiny_dir), "--task", "suite:capitals", "--limit", "5",
            "--simulations", "8", "--lockstep", "2", "--output", str(out), *extra]


def test_cli_resumes_refuses_other_settings_and_analyzes(tiny_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(_mcts_args(tiny_dir, out)) == 0
    printed = capsys.readouterr().out  # an oracle figure never comes without (a way to) its chance level
    assert "ORACLE (upper bound)" in printed and f"--null --output {tmp_path / 'm-null'}" in printed
    header, records = read_store(out)
    assert header["kind"] == "search:mcts" and header["settings"]["space"] == "edit"
    samples = [r for r in records if "identity" in r]
    assert len(samples) == 5 and records[-1]["type"] == "summary" and records[-1]["oracle"] is True
    # a run killed after two samples (and in the middle of a line) resumes with the rest, same results
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:20])
    with pytest.warns(UserWarning, match="torn last line"):
        assert main(_mcts_args(tiny_dir, out)) == 0
    again = [r for r in read_store(out)[1] if "identity" in r]
    assert [r["key"] for r in again] == [r["key"] for r in samples]
    assert [r["layers"] for r in again] == [r["layers"] for r in samples]
    # a larger --limit grows the store: finished samples are kept, only the new ones are searched
    assert main(_mcts_args(tiny_dir, out, "--limit", "7")) == 0
    header7, grown = read_store(out)
    rows = [r for r in grown if "identity" in r]
    assert header7["settings"]["limit"] == 7 and len(rows) == 7 and grown[-1]["samples"] == 7
    assert [r["layers"] for r in rows[:5]] == [r["layers"] for r in samples]
    assert main(_mcts_args(tiny_dir, out)) == 0  # back to 5: nothing searched, a summary of those 5
    assert len(read_store(out)[1]) == len(grown) + 1 and read_store(out)[1][-1]["samples"] == 5
    capsys.readouterr()
    # another space (or other settings) is refused, with nothing written
    assert main(_mcts_args(tiny_dir, out, "--space", "cola")) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(_mcts_args(tiny_dir, tmp_path / "bad", "--simulations", "0")) == 2
    assert "--simulations must be" in capsys.readouterr().err  # checked before any model is loaded
    assert not (tmp_path / "bad").exists()
    # analyze: never an oracle figure without its chance level, the null search
    assert main(["analyze", str(out)]) == 2
    assert "needs its chance level" in capsys.readouterr().err
    assert main(_mcts_args(tiny_dir, tmp_path / "m-null", "--null")) == 0
    null_header, null_records = read_store(tmp_path / "m-null")
    assert "null labels (chance level)" in capsys.readouterr().out
    assert main(_mcts_args(tiny_dir, out)) == 0  # finished: the twin's chance level is printed beside it
    assert f"its chance level (null labels, {tmp_path / 'm-null'})" in capsys.readouterr().out
    assert null_header["labels"] == "null" and header["labels"] == "gold"
    assert main(["analyze", str(tmp_path / "m-null"), "--null", str(out)]) == 2  # a null store is no gold store
    assert "searched with --null" in capsys.readouterr().err
    assert main(["analyze", str(out), "--output", str(tmp_path / "an")]) == 0
    printed = capsys.readouterr().out
    assert "ORACLE" in printed and "null (chance)" in printed and "a shorter route stays correct" in printed
    assert "Robust labels" in printed
    for name in ("analyze.md", "actions.png", "rewards.png"):
        assert (tmp_path / "an" / name).stat().st_size > 0
    # a store that is not an MCTS one is refused clearly
    assert main(["search", "random_search", "--model", str(tiny_dir), "--task", "suite:capitals", "--limit", "2",
                 "--trials", "2", "--output", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "r")]) == 2
    assert "not an MCTS one" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _rec(identity_correct, shortest, best_layers, reward=1.0, id_reward=0.5):
    return {"key": str(len(best_layers)) + str(shortest), "layers": best_layers, "blocks": len(best_layers),
            "reward": reward, "margin": reward, "correct": shortest is not None,
            "identity": {"reward": id_reward, "margin": 0.5, "correct": identity_correct, "blocks": 4},
            "shortest_correct_blocks": shortest, "num_layers": 4}


def _store(path, records, labels="gold"):
    path.mkdir()
    head = {"format": "layerroute.results", "version": 1, "kind": "search:mcts", "model": {"num_layers": 4},
            "settings": {"space": "edit"}, "task": "t", "split": "search", "seed": 0, "labels": labels}
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [head, *records]))
    return path


def test_null_threshold_and_robust_labels_on_a_constructed_store(tmp_path, capsys):
    # null best routes gain 0.1, 0.2, ..., 2.0 nats: at most 5% (1 of 20) exceed 1.9
    nulls = [dict(_rec(False, None, [0, 1, 3], reward=g / 10 + 0.5), key=f"s{g}", margin=g / 10 + 0.5)
             for g in range(1, 21)]
    assert null_threshold(nulls) == pytest.approx(1.9)
    gold = [dict(_rec(False, 3, [0, 1, 3]), key="s1", margin=0.5 + 1.95),  # gain 1.95 > 1.9: kept
            dict(_rec(False, 3, [1, 2, 3]), key="s2", margin=0.5 + 1.9),  # not above the threshold: full route
            *[dict(_rec(True, 4, [0, 1, 2, 3]), key=f"s{g}") for g in range(3, 21)]]
    assert robust_layers(gold[0], 1.9, 4) == (0, 1, 3) and robust_layers(gold[1], 1.9, 4) == (0, 1, 2, 3)
    g = _store(tmp_path / "g", gold)
    _store(tmp_path / "g-null", nulls, "null")
    c = compare(*load_pair(g)[1:], 4)
    assert c["threshold"] == pytest.approx(1.9) and c["kept"] == 1 and c["samples"] == 20
    assert c["robust_labels"]["skip_block_0"] == 0 and c["best_routes"]["skip_block_0"] == pytest.approx(1 / 20)
    assert c["gold"]["gain above 1 nat"] == (2, 20) and c["null"]["gain above 1 nat"] == (10, 20)
    assert "1.900 nats" in report(g) and (tmp_path / "g" / "rewards.png").is_file()
    with pytest.raises(LabelError, match="differ in split"):
        check_pair({"split": "search"}, {"split": "test", "labels": "null"}, "a", "b")


def test_analyze_figures_by_hand(tmp_path):
    recs = [_rec(True, 3, [0, 1, 3]), _rec(True, 4, [0, 1, 2, 3]), _rec(True, None, [0, 1, 2, 3], 0.5),
            _rec(False, 4, [0, 0, 1, 2, 3]), _rec(False, None, [0, 1, 2, 3], 0.5)]
    a = analyze(recs, 4)
    assert a["share_correct_stay_correct_shorter"] == pytest.approx(1 / 3)
    assert a["share_wrong_made_correct"] == pytest.approx(1 / 2)
    assert a["mean_blocks_saved"] == pytest.approx((1 + 0 + 0 - 1 + 0) / 5)
    assert a["share_reward_improved"] == pytest.approx(3 / 5)
    assert a["share_margin_improved"] == pytest.approx(3 / 5) and a["mean_identity_margin"] == pytest.approx(0.5)
    budgeted = analyze([_rec(True, 3, [0, 1, 3], id_reward=None), _rec(False, None, [0, 1, 2], 0.25, None)], 4)
    assert budgeted["mean_identity_reward"] is None and budgeted["share_margin_improved"] == pytest.approx(1 / 2)
    assert a["action_frequencies"]["skip"][2] == pytest.approx(1 / 5)
    assert a["action_frequencies"]["repeat"][0] == pytest.approx(1 / 5)
    assert a["action_frequencies"]["execute"][3] == pytest.approx(1.0)
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"format": "layerroute.results", "version": 1, "kind": "search:mcts",
                                "model": {"num_layers": 4}, "settings": {}}) + "\n")
    with pytest.raises(AnalyzeError, match="no finished MCTS samples"):
        load_mcts(path)
    path.write_text(path.read_text() + "".join(json.dumps({**r, "key": f"s{i}"}) + "\n" for i, r in enumerate(recs)))
    assert len(load_mcts(path)[1]) == 5


def test_edit_actions_are_the_single_edits_of_the_route(tiny, tok):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("letter", n=2))
    tree = EditTree(MCTS(obj, MCTSConfig()), 0, obj.examples[0].uid)
    L = obj.num_layers
    r = (0, 1, 1, 3)
    acts = tree.actions(Node(r, 0, False))
    expected = {r[:i] + r[i + 1:] for i in range(4)} | {r[:i] + r[i + 2:] for i in range(3)}
    expected |= {r[:i + 1] + r[i:] for i in range(4)}
    assert len(acts) == len(set(acts)) and set(acts) == expected - {r}
    assert (0, 1, 3) in acts and (0, 1, 1, 1, 3) in acts  # skipping either 1 (or repeating either) counts once
    assert tree.root.chain == tuple(range(L))  # the root is the full route
    long = tuple(range(L)) * 2  # 2L: no repeat fits any more
    assert all(len(a) < len(long) for a in tree.actions(Node(long, 0, False)))
    assert tree.actions(Node((3,), 0, False)) == [(3, 3)]  # a route keeps at least one block


def test_edit_early_stops_follow_their_definitions(tiny, tok):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("letter", n=2))
    L = obj.num_layers
    s = MCTS(obj, MCTSConfig(beat_margin=1.0, stop_shorter=2))
    t = EditTree(s, 0, obj.examples[0].uid)
    t.record(tuple(range(L)), -0.5, -0.5, False)  # the full route: wrong
    t.record((0, 1, 2, 4), 0.4, 0.4, True)  # correct, 1 block shorter, gain 0.9 nats: no stop
    assert t.stopped is None
    t.record((0, 0, 1, 2, 3, 4), 0.6, 0.6, True)  # gain 1.1 > 1.0: beats the full route
    assert t.stopped == "beats the full route"
    t = EditTree(s, 0, obj.examples[0].uid)
    t.record(tuple(range(L)), 2.0, 2.0, True)
    t.record((0, 1, 4), 0.1, 0.1, True)  # correct and 2 blocks shorter
    assert t.stopped == "a correct route 2 blocks shorter"
    t = EditTree(MCTS(Objective(tiny, tok, choice_task("letter", n=2), reward="correct"), MCTSConfig()), 0, "x")
    t.record(tuple(range(L)), 0.0, 3.0, False)
    t.record((0, 1, 2, 3, 4, 4), 1.0, -0.1, True)  # reward correct: beats = correct where the full route is not
    assert t.stopped == "beats the full route"
    # in a real search: a stopped sample ran fewer simulations, prefix reuse still equals naive
    obj = Objective(tiny, tok, choice_task("cloze", n=4))
    fast = _run(obj, simulations=40, beat_margin=0.0, lockstep=4)
    _same(fast, _run(obj, simulations=40, beat_margin=0.0, naive=True))
    stopped = [r for r in fast if r["stopped"] == "beats the full route"]
    assert stopped and all(r["simulations"] < 40 and r["margin"] > r["identity"]["margin"] for r in stopped)


def test_edit_label_is_the_shortest_correct_route_and_budgets_are_refused(tiny, tok):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("cloze", n=4))
    records = _run(obj, simulations=30, **NO_STOP)
    assert len(records) == 4 and any(r["label"] for r in records)  # both branches below can be reached
    for r in records:
        correct = [t for t in r["top"] if t["correct"]]
        if r["label"] is None:
            assert not correct and r["shortest_correct_blocks"] is None
        else:
            assert len(r["label"]["layers"]) == r["shortest_correct_blocks"]
            assert all(len(t["layers"]) >= len(r["label"]["layers"]) for t in correct)
    with pytest.raises(SearchError, match="does not fit it"):
        MCTS(Objective(tiny, tok, choice_task("letter", n=2), budget=0.8), MCTSConfig(space="edit"))
