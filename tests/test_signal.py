"""`layerroute signal`: the single-edit scores, the probe's AUC, and its refusals."""

import numpy as np
import pytest

from layerroute.cli import main
from layerroute.objective import Objective
from layerroute.search.signal import SignalError, edit_scores, margins, probe_auc, signal, single_edits

from .test_objective import choice_task


def test_probe_auc_is_near_one_half_on_shuffled_targets_and_high_on_a_real_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    y = (x[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(int)
    real = probe_auc(x, y, seed=0, shuffles=20)
    assert real["auc"] > 0.9 and real["p_value"] < 0.1
    noise = probe_auc(x, rng.permutation(y), seed=0, shuffles=20)
    assert abs(noise["auc"] - 0.5) < 0.12 and abs(noise["shuffled_auc_mean"] - 0.5) < 0.05
    assert probe_auc(x, np.r_[np.ones(3), np.zeros(197)].astype(int), seed=0)["auc"] is None  # too few positives


def test_edit_scores_equal_scoring_each_edit_from_scratch(tiny, tok):  # noqa: F811
    obj = Objective(tiny, tok, choice_task("cloze", n=5), batch_rows=12)
    L = obj.num_layers
    edits = single_edits(L)
    assert len(edits) == 2 * L and edits[0] == ("skip 0", 0, tuple(range(1, L)))
    lp, pooled = edit_scores(obj, edits, batch=2, progress=False)
    assert lp.shape[:2] == (5, 1 + 2 * L) and pooled.shape[0] == 5
    routes = [tuple(range(L))] + [tuple(range(kept)) + rest for _, kept, rest in edits]
    assert routes[1 + L] == (0, 0) + tuple(range(1, L))  # repeat 0
    for r, route in enumerate(routes):  # the reference: every route from the embeddings, its own margin
        sc = obj.score(range(5), [route] * 5)
        m, c = margins(lp[:, r:r + 1], obj.gold_index)
        assert m[:, 0].tolist() == pytest.approx(sc.margin.tolist(), abs=1e-4)
        assert c[:, 0].tolist() == sc.correct.tolist()


def test_signal_report_and_its_refusals(tiny, tok, tiny_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SignalError, match="at least 20 samples"):
        signal(Objective(tiny, tok, choice_task("letter", n=10)))
    assert main(["signal", "--model", str(tiny_dir), "--task", "suite:capitals", "--limit", "12",
                 "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "at least 20 samples" in err and not (tmp_path / "s").exists()
    assert main(["signal", "--model", str(tiny_dir), "--task", "gsm8k", "--output", str(tmp_path / "s")]) == 2
    assert "needs a task with options" in capsys.readouterr().err
    assert main(["signal", "--model", str(tiny_dir), "--task", "suite", "--limit", "24",
                 "--output", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert "Verdict:" in text and "gold - null" in text and "probe AUC" in text
    for name in ("signal.md", "signal.json", "signal.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0
