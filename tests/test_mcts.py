"""Per-sample MCTS (an oracle): never worse than identity, budgets, seeds, prefix reuse equals naive,
lockstep equals one at a time, resuming, refusals, and `layerroute analyze`."""

import json

import pytest

from layerroute.cli import main
from layerroute.objective import Objective
from layerroute.search import SearchError
from layerroute.search.analyze import AnalyzeError, analyze, report
from layerroute.search.mcts import MCTS, MCTSConfig
from layerroute.store import read_store

from .test_objective import choice_task, tiny, tok  # noqa: F401  (fixtures)

SPACES = [dict(space="drllm"), dict(space="cola"), dict(space="cola", macros=True, max_count=3)]


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
    if cfg["space"] == "drllm":
        assert all(r["layers"] == sorted(r["layers"]) for r in fast)  # in order


@pytest.mark.parametrize("cfg", SPACES)
def test_budgets_and_length_bounds_hold(tiny, tok, cfg):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("letter", n=4), budget=0.6)  # at most 3 of 5 blocks
    for r in _run(obj, **cfg, simulations=20):
        assert r["identity"]["reward"] is None  # the identity route is over the budget
        routes = [r["layers"]] + [t["layers"] for t in r["top"]]
        assert all(1 <= len(x) <= 3 for x in routes)
        assert all(max(x.count(b) for b in x) <= (cfg.get("max_count", 2)) for x in routes)
    wide = Objective(tiny, tok, choice_task("letter", n=3))
    for r in _run(wide, space="cola", max_length=6, simulations=30):
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
    assert all(r["simulations"] == 16 and r["reward"] >= r["identity"]["reward"] for r in wide)


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
    header, records = read_store(out)
    assert header["kind"] == "search:mcts" and header["settings"]["space"] == "drllm"
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
    capsys.readouterr()
    # another space (or other settings) is refused, with nothing written
    assert main(_mcts_args(tiny_dir, out, "--space", "cola")) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(_mcts_args(tiny_dir, tmp_path / "bad", "--simulations", "0")) == 2
    assert "--simulations must be" in capsys.readouterr().err  # checked before any model is loaded
    assert not (tmp_path / "bad").exists()
    # analyze: figures, table and PNGs
    assert main(["analyze", str(out), "--output", str(tmp_path / "an")]) == 0
    printed = capsys.readouterr().out
    assert "ORACLE" in printed and "shorter route that stays correct" in printed
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
        report(path)
    path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in recs))
    assert "33.3%" in report(path) and (tmp_path / "actions.png").is_file()
