"""Per-token routers where per-sample ones go (routers/token_policy.py): ``evaluate`` and ``eval --router DIR``
score a task with per-token decisions at prefill and decoding, and report the realised executed blocks per token."""

import pytest
import torch

from layerroute import RouteExecutor
from layerroute.evaluation import evaluate
from layerroute.routers.network import RouterError
from layerroute.routers.token_policy import TokenRouterPolicy
from layerroute.routers.token_router import new_token_routers, save_token_routers
from layerroute.tasks.base import Example, Task

from .conftest import tiny_model


def tasks():
    names = ["France", "Spain", "Italy", "Japan", "Egypt", "Peru", "Chile"]
    choice = [Example(f"c/{c}", f"What is the capital of {c}?\nA. x\nB. y\nC. z", "ABC"[i % 3],
                      ("Paris", "Madrid", "Rome")) for i, c in enumerate(names)]
    gen = [Example(f"g/{i}", f"What is {i} plus {i}? Think, then answer.", str(2 * i)) for i in range(5)]
    return [Task("letters", "choice", choice, choice_scoring="letter", answer_prefix="The answer is"),
            Task("cloze", "choice", choice, choice_scoring="cloze", answer_prefix="It is"),
            Task("sums", "generate", gen, max_new_tokens=5, extract="last_number")]


@pytest.mark.parametrize("rule", ["kv-kept", "absent"])
def test_always_execute_equals_the_full_models_evaluation(tiny, tok, rule):
    net = new_token_routers(tiny, init_logit=-8.0, threshold=0.0, rule=rule)  # gates say skip, but 0 = always
    for task in tasks():
        full = evaluate(tiny, tok, task, batch_size=3, progress=False)
        routed = evaluate(tiny, tok, task, TokenRouterPolicy(net), batch_size=3, progress=False)
        assert [s.prediction for s in routed.samples] == [s.prediction for s in full.samples], task.name
        assert [s.output for s in routed.samples] == [s.output for s in full.samples], task.name
        assert [s.gold_nll for s in routed.samples] == pytest.approx([s.gold_nll for s in full.samples], abs=1e-4)
        assert routed.accuracy == full.accuracy and routed.ci95 == full.ci95
        assert routed.per_token and not full.per_token
        assert routed.mean_blocks == tiny.num_layers  # every real token ran every block
        assert "blocks/token    mean 5.00 executed" in routed.summary()


def test_skipping_routers_change_the_scores_and_report_the_realised_blocks_per_token(tiny, tok):
    torch.manual_seed(1)
    net = new_token_routers(tiny, init_logit=0.0, threshold=0.5)  # random gates around 0.5
    for task in tasks():
        full = evaluate(tiny, tok, task, batch_size=3, progress=False)
        routed = evaluate(tiny, tok, task, TokenRouterPolicy(net), batch_size=3, progress=False)
        assert 0.5 < routed.mean_blocks < tiny.num_layers - 0.5, task.name
        assert [s.gold_nll for s in routed.samples] != pytest.approx([s.gold_nll for s in full.samples], abs=1e-3)
        # batching does not change per-token decisions (padding is neither decided on nor counted)
        one = evaluate(tiny, tok, task, TokenRouterPolicy(net), batch_size=1, progress=False)
        assert [s.prediction for s in one.samples] == [s.prediction for s in routed.samples]
        assert [s.gold_nll for s in one.samples] == pytest.approx([s.gold_nll for s in routed.samples], abs=1e-4)
        assert one.mean_blocks == pytest.approx(routed.mean_blocks, abs=1e-9) or task.kind == "generate"
    assert TokenRouterPolicy(net, threshold=1.0).route_batch(tiny, torch.ones(2, 3, dtype=torch.long), None) == \
        [tiny.route()] * 2


def test_eval_router_takes_a_token_router_folder_and_refuses_another_models(tiny_dir, tmp_path, capsys):
    from layerroute.cli import main
    from layerroute.models import load_model

    model, _ = load_model(str(tiny_dir))
    ours = save_token_routers(tmp_path / "ours", new_token_routers(RouteExecutor(model), threshold=0.0))
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(f'{{"q": "What is {i} plus 1?", "a": "{i + 1}"}}\n' for i in range(6)))
    args = ["eval", "--model", str(tiny_dir), "--task", f"jsonl:{data}", "--fields", "question=q,answer=a",
            "--split", "all", "--batch-size", "3"]
    assert main(args + ["--router", str(ours)]) == 0
    out = capsys.readouterr()
    assert "blocks/token    mean 5.00 executed" in out.out and "(token_router)" in out.err
    other = tiny_model("llama", seed=1, vocab_size=model.config.vocab_size)  # same shape, other weights
    theirs = save_token_routers(tmp_path / "theirs", new_token_routers(RouteExecutor(other), threshold=0.0))
    assert main(args + ["--router", str(theirs)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading")]
    assert len(err) == 1 and "another checkpoint" in err[0], err
    with pytest.raises(RouterError, match="another checkpoint"):
        TokenRouterPolicy.load(theirs, RouteExecutor(model))


def test_run_router_takes_a_token_router_folder(tiny_dir, tmp_path, capsys):
    """`run --router` with token routers at threshold 0 answers as the full model does."""
    from layerroute.cli import main
    from layerroute.models import load_model

    model, _ = load_model(str(tiny_dir))
    ours = save_token_routers(tmp_path / "ours", new_token_routers(RouteExecutor(model), threshold=0.0))
    run = ["run", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "4"]
    assert main(run) == 0
    full = capsys.readouterr().out
    assert main(run + ["--router", str(ours)]) == 0
    out = capsys.readouterr()
    assert out.out == full and "100.0% of the (token, block) pairs" in out.err
    assert main(run + ["--router", str(ours), "--tau", "0.5"]) == 2
    assert "--tau is the routers' confidence threshold: it needs --router (per-sample" in capsys.readouterr().err
