"""Scoring, the evaluator, output dirs, and the static baselines."""

import math

import pytest
import torch

from layerroute import LayerRouteError, RouteExecutor
from layerroute.evaluation import eval_header, evaluate, limit_examples, wilson_interval, write_summary
from layerroute.objective import Objective
from layerroute.store import ResultsStore, read_store
from layerroute.scoring import continuation_nll, score_batch
from layerroute.budget import blocks_for_ratio
from layerroute.search.baselines import BASELINES, baseline_route, choose_on_validation, greedy_cost, \
    greedy_order, last_token_states
from layerroute.tasks.base import Example, Task
from layerroute.tasks.prompts import render_prompt

from .conftest import tiny_model


def choice_task(scoring="letter", n=12):
    countries = ["France", "Spain", "Italy", "Japan", "Egypt", "Peru", "Chile", "Kenya", "Nepal", "Cuba",
                 "Iran", "Iraq", "Oman", "Laos"][:n]
    exs = [Example(f"t/{c}", f"What is the capital of {c}? Options follow.\nA. x\nB. y\nC. z", "ABC"[i % 3],
                   ("Paris", "Madrid", "Rome")) for i, c in enumerate(countries)]
    return Task("hand", "choice", exs, choice_scoring=scoring, answer_prefix="The answer is")


def manual_nll(model, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return -sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n_cont, len(ids)))


def test_continuation_nll_matches_manual_computation(tiny, tok):
    prompts = ["The capital of France is", "Two plus two is a longer prompt here"]
    conts = [" Paris", " four, of course"]
    nll, lens, _ = continuation_nll(tiny, tok, prompts, conts, [tiny.route()] * 2)
    for p, c, got, n in zip(prompts, conts, nll, lens):
        ids = tok(p + c, add_special_tokens=False).input_ids
        assert n == len(ids) - len(tok(p, add_special_tokens=False).input_ids)
        assert got == pytest.approx(manual_nll(tiny.model, ids, n), abs=1e-4)


def test_letter_scoring_picks_the_argmax_letter(tiny, tok):
    task = choice_task("letter", n=4)
    scores = score_batch(tiny, tok, task, list(task.examples), [tiny.route()] * 4)
    letter_ids = [tok(" " + x, add_special_tokens=False).input_ids[-1] for x in "ABC"]
    for ex, s in zip(task.examples, scores):
        ids = tok(render_prompt(tok, ex.question, answer_prefix=task.answer_prefix), add_special_tokens=False).input_ids
        with torch.no_grad():
            last = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1, letter_ids]
        assert s.prediction == "ABC"[int(last.argmax())]
        assert s.correct == (s.prediction == ex.answer)
        assert s.blocks == 5


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_batched_and_unbatched_evaluation_agree(tiny, tok, scoring):
    task = choice_task(scoring)
    routes = lambda ex: tiny.route("skip:1" if ex.uid < "t/K" else "repeat:2")  # noqa: E731
    one = evaluate(tiny, tok, task, routes, batch_size=1, progress=False)
    many = evaluate(tiny, tok, task, routes, batch_size=5, progress=False)
    assert [s.prediction for s in one.samples] == [s.prediction for s in many.samples]
    assert [s.gold_nll for s in one.samples] == pytest.approx([s.gold_nll for s in many.samples], abs=1e-4)
    assert one.mean_blocks == many.mean_blocks == sum(4 if e.uid < "t/K" else 6 for e in task.examples) / 12
    assert one.accuracy == many.accuracy


def test_generate_scoring_batched_equals_unbatched(tiny, tok):
    exs = [Example(f"g/{i}", f"What is {i} plus {i}? Think, then answer.", str(2 * i)) for i in range(6)]
    task = Task("gen", "generate", exs, max_new_tokens=6, extract="last_number")
    one = evaluate(tiny, tok, task, batch_size=1, progress=False)
    many = evaluate(tiny, tok, task, batch_size=6, progress=False)
    assert [s.prediction for s in one.samples] == [s.prediction for s in many.samples]
    assert one.tokens_per_second > 0 and one.samples[0].tokens > 6


@pytest.mark.slow
def test_real_model_scores_hand_made_cases(smollm):
    """SmolLM2 knows these; the scorer must say so."""
    model, tok, ex = smollm
    exs = [Example("c/fr", "What is the capital of France?", "B", ("London", "Paris", "Berlin", "Madrid")),
           Example("c/jp", "What is the capital of Japan?", "D", ("Paris", "Rome", "Cairo", "Tokyo"))]
    task = Task("caps", "choice", exs, choice_scoring="cloze", answer_prefix="The capital is")
    res = evaluate(ex, tok, task, progress=False)
    assert [s.prediction for s in res.samples] == ["B", "D"] and res.accuracy == 1.0
    gen = Task("gen", "generate", [Example("g/1", "What is the capital of France?", "the")],
               max_new_tokens=8, extract="first_word")
    sample = evaluate(ex, tok, gen, progress=False).samples[0]
    assert sample.output.startswith("The capital of France is Paris") and sample.correct


def test_limit_larger_than_data_warns_and_uses_all():
    with pytest.warns(UserWarning, match="--limit 50 is larger than the 12 examples"):
        assert len(limit_examples(choice_task().examples, 50)) == 12


def test_empty_task_is_refused(tiny, tok):
    with pytest.raises(LayerRouteError, match="no examples"):
        evaluate(tiny, tok, Task("empty", "choice", []), progress=False)


def test_evaluation_store_resumes_and_refuses_other_runs(tmp_path, tiny, tok):
    task = choice_task(n=6)
    header = eval_header(tiny, task, "all", 0, {"task": "hand"})
    with ResultsStore(tmp_path / "run", header) as store:
        first = evaluate(tiny, tok, Task("hand", "choice", task.examples[:3]), progress=False, store=store)
    with ResultsStore(tmp_path / "run", header) as store:
        res = evaluate(tiny, tok, task, progress=False, store=store)
        write_summary(store, res)
    records = read_store(tmp_path / "run")[1]
    uids = [r["uid"] for r in records if r["type"] == "sample"]  # in scoring order, each once
    assert sorted(uids) == sorted(e.uid for e in task.examples)
    assert records[-1]["metrics"]["n"] == 6
    fresh = evaluate(tiny, tok, task, progress=False)
    assert [s.prediction for s in res.samples] == [s.prediction for s in fresh.samples]
    assert [s.prediction for s in first.samples] == [s.prediction for s in fresh.samples[:3]]
    with pytest.raises(LayerRouteError, match="other settings"):
        ResultsStore(tmp_path / "run", eval_header(tiny, task, "test", 0, {"task": "hand"}))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_each_baseline_hits_its_budget_exactly(tiny, tok, name):
    obj = Objective(tiny, tok, choice_task("cloze"), list(choice_task("cloze").examples)[:4])
    for ratio in (1.0, 0.9, 0.8, 0.6, 0.4, 0.2):
        route = baseline_route(name, obj, ratio, seed=3)
        assert route.cost == blocks_for_ratio(ratio, 5) == math.floor(ratio * 5 + 1e-9)
        assert route.is_monotone and len(set(route.layers)) == route.cost


def test_baselines_choose_sensible_blocks(tiny, tok):
    obj = Objective(tiny, tok, choice_task("cloze"), list(choice_task("cloze").examples)[:4])
    assert baseline_route("drop_last", obj, 0.6).layers == (0, 1, 2)
    assert baseline_route("unified", obj, 0.6).layers == (0, 2, 4)
    # greedy: the first block removed is the one whose removal keeps the mean reward highest
    rewards = {i: obj.mean_reward(tiny.route(f"skip:{i}")) for i in range(5)}
    assert set(range(5)) - set(baseline_route("greedy", obj, 0.8).layers) == {max(rewards, key=rewards.get)}
    # ... and prefix reuse does not change the choice: a second round, recomputed by hand
    first = max(rewards, key=rewards.get)
    second = {i: obj.mean_reward(tiny.route(f"skip:{first},{i}")) for i in range(5) if i != first}
    assert greedy_order(obj, 3) == [first, max(second, key=second.get)]


def test_greedy_prefix_reuse_gives_the_order_of_scoring_each_candidate_from_scratch(tiny, tok):
    task = choice_task("cloze")
    reuse, naive = (Objective(tiny, tok, task, list(task.examples)[:6], batch_rows=8) for _ in range(2))
    assert greedy_order(reuse, 1) == greedy_order(naive, 1, reuse_prefix=False)
    assert len(set(greedy_order(reuse, 1))) == 4
    # per sample, a round with K kept blocks costs K(K+1)/2 - 1 block executions, against K(K-1) from scratch
    assert greedy_cost(reuse)["sample_blocks"] == 6 * sum(K * (K + 1) // 2 - 1 for K in (5, 4, 3, 2)) == 180
    assert greedy_cost(naive)["sample_blocks"] == 6 * sum(K * (K - 1) for K in (5, 4, 3, 2)) == 240
    assert greedy_cost(reuse)["sample_finishes"] == greedy_cost(naive)["sample_finishes"] == 6 * 14


def picks(obj, route):
    """The option ``route`` answers on each sample of ``obj`` (the highest log-likelihood)."""
    state = obj.advance(obj.begin(range(len(obj))), [route.layers] * len(obj))
    return obj.option_logliks(state).argmax(-1).tolist()


def relabelled(task, examples, answers):
    """``examples`` of ``task`` with other gold answers (option indices)."""
    import dataclasses

    return [dataclasses.replace(ex, answer="ABC"[a]) for ex, a in zip(examples, answers)]


def test_the_best_static_route_is_chosen_on_validation_not_on_the_samples_it_fitted(tiny, tok):
    task = choice_task("cloze", n=14)
    a, b = tiny.route("skip:0"), tiny.route("skip:4")  # two static routes of 4 blocks
    pool = Objective(tiny, tok, task)
    pa, pb = picks(pool, a), picks(pool, b)
    differ = [i for i in range(len(pool)) if pa[i] != pb[i]]
    assert len(differ) >= 3  # the two routes answer these samples differently
    exs = [task.examples[i] for i in differ]
    fit = Objective(tiny, tok, task, relabelled(task, exs, [pa[i] for i in differ]))  # a right, b wrong
    val = Objective(tiny, tok, task, relabelled(task, exs, [pb[i] for i in differ]))  # b right, a wrong
    assert choose_on_validation(fit, {"a": a, "b": b})[0] == "a"
    name, stats = choose_on_validation(val, {"a": a, "b": b})
    assert name == "b" and stats["b"]["accuracy"] == 1.0 and stats["a"]["accuracy"] == 0.0
    assert stats["b"]["n"] == len(differ) and stats["b"]["ci95"][1] == pytest.approx(1.0)


def test_similarity_drops_the_run_whose_states_hf_finds_most_alike(tok):
    """The reference is HF's own forward: hooks take each block's input and output at the prompt's
    last token, one unpadded prompt at a time, and the angle between states is written out here.
    Block 4 is scaled up so that the run at the end is not the most alike (else any formula that
    prefers late blocks would pass)."""
    model = tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        model.model.layers[4].mlp.down_proj.weight.mul_(5.0)
    obj = Objective(RouteExecutor(model), tok, choice_task("cloze"), list(choice_task("cloze").examples)[:4])
    assert last_token_states(obj).shape == (6, 4, 64)
    states = []
    hooks = [block.register_forward_pre_hook(lambda m, args, kw: states.append(args[0] if args else
                                                                               kw["hidden_states"]), with_kwargs=True)
             for block in model.model.layers]
    hooks.append(model.model.layers[-1].register_forward_hook(lambda m, args, out: states.append(out)))
    angles = torch.zeros(4, dtype=torch.float64)  # dropping blocks s, s+1: the angle between h[s] and h[s+2]
    try:
        for prompt in obj.prompts:
            states.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([tok(prompt, add_special_tokens=False).input_ids]), use_cache=False)
            h = [x[0, -1].double() for x in states]
            assert len(h) == 6
            for s in range(4):
                angles[s] += math.acos(max(-1.0, min(1.0, float(h[s] @ h[s + 2] / (h[s].norm() * h[s + 2].norm())))))
    finally:
        for hook in hooks:
            hook.remove()
    best, second = angles.argsort()[:2].tolist()
    assert best != 3 and angles[second] - angles[best] > 1e-2  # a clear choice, not the last run
    assert set(range(5)) - set(baseline_route("similarity", obj, 0.6).layers) == {best, best + 1}


def test_bad_budgets_are_refused():
    with pytest.raises(LayerRouteError, match=r"must be a number in \(0, 1\]"):
        blocks_for_ratio(1.5, 30)
    with pytest.raises(LayerRouteError, match="leaves no block"):
        blocks_for_ratio(0.01, 30)
    assert [blocks_for_ratio(r, 30) for r in (1.0, 0.9, 0.8, 0.7)] == [30, 27, 24, 21]


def test_calibration_uses_only_the_search_split_and_refuses_none(tiny, tok):
    task = choice_task("cloze")
    obj = Objective.from_task(tiny, tok, task, "search", limit=None)
    assert [e.uid for e in obj.examples] == [e.uid for e in task.split("search").examples]
    with pytest.raises(LayerRouteError, match="no examples"), pytest.warns(UserWarning, match="--calib-limit 32"):
        Objective.from_task(tiny, tok, Task("empty", "choice", []), limit=32, option="--calib-limit")


def test_error_bars_never_negative_and_a_perfect_score_plots(tmp_path):
    """A Wilson bound can round a hair inside a share of 1: the plot must still draw (README's baselines line)."""
    from layerroute.search.baselines import plot_curves
    from layerroute.tables import error_bars

    hi = 1.0 - 1e-12
    assert error_bars([1.0, 0.5], [(0.9, hi), (0.4, 0.6)]) == [[pytest.approx(10.0), pytest.approx(10.0)],
                                                              [0.0, pytest.approx(10.0)]]
    rows = [{"baseline": "full", "blocks": 4, "accuracy": 1.0, "ci95": (0.5, hi)},
            {"baseline": "drop_last", "blocks": 3, "accuracy": 1.0, "ci95": (0.5, hi)}]
    plot_curves(rows, tmp_path / "curves.png", "perfect")
    assert (tmp_path / "curves.png").stat().st_size > 0
