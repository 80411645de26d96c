"""Null labels and robust router labels: seeded, never the gold, never mistaken for results."""

import pytest

from layerroute.cli import main
from layerroute.objective import Objective, ObjectiveError, null_option
from layerroute.routers.training import load_labels
from layerroute.search.labels import LabelError
from layerroute.tasks.base import Example, Task

from .test_objective import choice_task
from .test_mcts import _mcts_args


def test_null_labels_are_seeded_wrong_options_and_leave_the_gold_alone(tiny, tok):  # noqa: F811
    task = choice_task("cloze", n=11)
    gold = Objective(tiny, tok, task)
    null = Objective(tiny, tok, task, null_seed=0)
    assert (null.gold_index == gold.gold_index).all()  # the real answers stay where they are
    assert (null.target_index != null.gold_index).all()  # a null label is never the gold
    assert (Objective(tiny, tok, task, null_seed=0).target_index == null.target_index).all()  # seeded
    assert (Objective(tiny, tok, task, null_seed=1).target_index != null.target_index).any()
    assert [null_option(ex, 0) for ex in task.examples] == null.target_index.tolist()
    # one forward scores against any label: margins follow the options' log-likelihoods
    samples, route = list(range(len(task.examples))), [tuple(range(tiny.num_layers))] * 11
    lp = gold.option_logliks(gold.advance(gold.begin(samples), route))
    for obj in (gold, null):
        sc = obj.score(samples, route)
        for j, t in enumerate(obj.target_index.tolist()):
            others = [lp[j, k] for k in range(len(task.examples[j].choices)) if k != t]
            assert float(sc.margin[j]) == pytest.approx(float(lp[j, t] - max(others)), abs=1e-4)
            assert bool(sc.correct[j]) == (int(lp[j].argmax()) == t)
    with pytest.raises(ObjectiveError, match="null labels need a task with options"):
        Objective(tiny, tok, Task("hand", "generate", [Example("t/sum", "What is 2 + 2?", "4")], extract="last_number"), null_seed=0)


def test_null_search_is_refused_where_it_has_no_meaning(tiny_dir, tmp_path, capsys):
    assert main(["search", "mcts", "--model", str(tiny_dir), "--task", "gsm8k", "--limit", "3", "--null",
                 "--output", str(tmp_path / "g")]) == 2
    assert "without options" in capsys.readouterr().err and not (tmp_path / "g").exists()
    # a null store never becomes router labels, not even by mistake
    assert main(_mcts_args(tiny_dir, tmp_path / "m-null", "--null")) == 0
    capsys.readouterr()
    with pytest.raises(LabelError, match="must never become router labels"):
        load_labels([tmp_path / "m-null"])
    assert main(["train-router", "--model", str(tiny_dir), "--labels", str(tmp_path / "m-null"),
                 "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "must never become router labels" in err and err.count("\n") == 1
    # a gold store without its null search: robust labels cannot be made, and the error says what to run
    assert main(_mcts_args(tiny_dir, tmp_path / "solo")) == 0
    capsys.readouterr()
    assert main(["train-router", "--model", str(tiny_dir), "--labels", str(tmp_path / "solo"),
                 "--output", str(tmp_path / "r")]) == 2
    assert "--null --output" in capsys.readouterr().err and not (tmp_path / "r").exists()
