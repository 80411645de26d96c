"""The routers' confidence threshold tau: the rule, tau = 1 is the full model, the validation choice."""

import json

import pytest
import torch

from layerroute import RouteExecutor
from layerroute.cli import main
from layerroute.routers import RoutedModel, RouterConfig, RouterError, load_routers, route_prompts, save_routers
from layerroute.routers.network import _choose
from layerroute.routers.tau import calibrate_tau, choose_tau, sweep_tau
from layerroute.routers.routed_model import RouterPolicy
from layerroute.evaluation import evaluate
from layerroute.tasks.base import Example, Task

from .test_objective import choice_task
from .test_routers import base, batch, make_net  # noqa: F401  (fixture)


def test_choose_skips_or_repeats_only_above_tau():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.45, 0.1, 0.45], [0.05, 0.9, 0.05]])
    logits, used = p.log(), torch.zeros(4, dtype=torch.long)
    assert _choose(logits, used, None, False).tolist() == [0, 2, 0, 1]  # no tau: the most likely action
    assert _choose(logits, used, None, False, tau=0.5).tolist() == [0, 1, 1, 1]  # 0.5 is not above 0.5
    assert _choose(logits, used, None, False, tau=0.4).tolist() == [0, 2, 0, 1]
    assert _choose(logits, used, None, False, tau=1.0).tolist() == [1, 1, 1, 1]  # never skip or repeat
    # a budget that cannot pay for an execute still skips, whatever tau says
    assert _choose(logits, torch.full((4,), 3), 3, False, tau=0.9).tolist() == [0, 0, 0, 0]


def test_tau_one_reproduces_the_full_model_exactly(base):  # noqa: F811
    ids, mask = batch()
    rm = RoutedModel(base, make_net(base), tau=1.0)
    assert all(r.layers == tuple(range(rm.executor.num_layers)) for r in rm.route(ids, mask))
    assert route_prompts(make_net(base), RouteExecutor(base), ids, mask)[1].counts.ne(1).any()  # routers do route
    with rm.disable_routing():
        full = rm(ids, mask).logits
    real = mask.bool()  # padding positions carry no meaning
    assert torch.allclose(rm(ids, mask).logits[real], full[real], atol=1e-5)
    out = rm.generate(ids, mask, max_new_tokens=4, do_sample=False)
    plain = RouteExecutor(base).generate(ids, mask, None, max_new_tokens=4).sequences
    assert torch.equal(out, plain)


def test_tau_chosen_on_validation_meets_its_epsilon(tiny, tok):  # noqa: F811
    base_task = choice_task("letter", n=11)
    task = Task("hand", "choice", [Example(f"t/{i}", f"Question {i} {'x ' * (i % 7)}?", "ABCD"[i % 4],
                                           base_task.examples[0].choices) for i in range(60)],
                choice_scoring="letter", answer_prefix="It is")
    assert len(task.split("validation", 0).examples) >= 5
    net, ex = make_net(tiny.model, seed=3), tiny
    cal = calibrate_tau(net, ex, tok, task, seed=0, limit=None, epsilon=0.2, grid=(1.0, 0.8, 0.6, 0.45, 0.35),
                        rule="point")
    full = next(r for r in cal["sweep"] if r["tau"] == 1.0)
    chosen = cal["chosen"]
    assert net.config.tau == cal["tau"] == chosen["tau"] and full["mean_blocks"] == ex.num_layers
    assert chosen["accuracy"] >= full["accuracy"] - 0.2
    assert len({r["mean_blocks"] for r in cal["sweep"]}) > 1  # tau changes what the routers do
    assert all(r["mean_blocks"] >= chosen["mean_blocks"] for r in cal["sweep"] if r["accuracy"] >= full["accuracy"] - 0.2)
    again = evaluate(ex, tok, task.split("validation", 0), RouterPolicy(net), progress=False)  # the saved tau
    assert again.accuracy == chosen["accuracy"] and again.mean_blocks == pytest.approx(chosen["mean_blocks"])
    rows = [{"tau": 1.0, "accuracy": 0.5, "mean_blocks": 5}, {"tau": 0.9, "accuracy": 0.495, "mean_blocks": 4},
            {"tau": 0.5, "accuracy": 0.48, "mean_blocks": 2}]
    assert choose_tau(rows, 0.01, "point")["tau"] == 0.9 and choose_tau(rows, 0.0, "point")["tau"] == 1.0


def test_the_default_rule_needs_the_loss_bound_within_epsilon():
    rows = [{"tau": 1.0, "accuracy": 0.5, "mean_blocks": 5, "loss_bound": 0.0},
            {"tau": 0.9, "accuracy": 0.5, "mean_blocks": 4, "loss_bound": 0.008},
            {"tau": 0.5, "accuracy": 0.5, "mean_blocks": 2, "loss_bound": 0.04}]  # same accuracy, unsure
    assert choose_tau(rows, 0.01)["tau"] == 0.9 and choose_tau(rows, 0.05)["tau"] == 0.5
    assert choose_tau(rows, 0.005)["tau"] == 1.0 and choose_tau(rows, 0.01, "point")["tau"] == 0.5
    with pytest.raises(ValueError, match="unknown tau rule"):
        choose_tau(rows, 0.01, "loose")


def test_sweep_equals_evaluating_every_tau_in_full(tiny, tok):  # noqa: F811
    """The sweep scores the full route once and re-walks only examples whose routers leave it."""
    base_task = choice_task("letter", n=11)
    task = Task("hand", "choice", [Example(f"t/{i}", f"Question {i} {'x ' * (i % 7)}?", "ABCD"[i % 4],
                                           base_task.examples[0].choices) for i in range(24)],
                choice_scoring="letter", answer_prefix="It is")
    net, grid = make_net(tiny.model, seed=3), (1.0, 0.8, 0.6, 0.45, 0.35)
    rows = sweep_tau(net, tiny, tok, task, grid, batch_size=5)
    assert [r["tau"] for r in rows] == sorted(grid, reverse=True)
    assert 0 < rows[-1]["rerouted"] <= len(task.examples) and rows[0]["rerouted"] == 0
    assert rows[0]["loss_bound"] == 0.0 and all(r["loss_bound"] is not None for r in rows)
    for row in rows:
        full = evaluate(tiny, tok, task, RouterPolicy(net, tau=row["tau"]), batch_size=5, progress=False)
        assert (row["accuracy"], row["n"]) == (full.accuracy, full.n)
        assert row["mean_blocks"] == pytest.approx(full.mean_blocks)


def test_bad_tau_and_routers_saved_before_tau(base, tmp_path, tiny_dir, capsys):  # noqa: F811
    with pytest.raises(RouterError, match=r"tau must be a number in \[0, 1\]"):
        RouterConfig(num_layers=2, hidden_size=4, tau=1.5)
    with pytest.raises(RouterError, match=r"tau must be a number in \[0, 1\]"):
        RoutedModel(base, make_net(base), tau=-0.1)
    for cmd in (["eval", "--task", "suite", "--router", str(tmp_path)], ["run", "--prompt", "hi", "--router",
                                                                        str(tmp_path)]):
        assert main([*cmd, "--model", str(tiny_dir), "--tau", "1.5"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --tau must be a number in [0, 1]") and err.count("\n") == 1
    net = make_net(base)
    save_routers(tmp_path / "old", net)
    cfg = json.loads((tmp_path / "old" / "router_config.json").read_text())
    del cfg["tau"]  # as written before tau existed
    (tmp_path / "old" / "router_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="saved before routers had a confidence threshold"):
        old = load_routers(tmp_path / "old", base)
    ids, mask = batch()
    assert old.config.tau is None
    assert [r.layers for r in route_prompts(old, RouteExecutor(base), ids, mask)[0]] == \
        [r.layers for r in route_prompts(net, RouteExecutor(base), ids, mask)[0]]  # its old rule, unchanged
