"""The shared objective: batched equals one-at-a-time, hand-computed margins, prefix reuse, budgets."""

import math

import pytest
import torch

from layerroute import LayerRouteError, RouteExecutor
from layerroute.budget import Budget, BudgetError
from layerroute.objective import Objective, ObjectiveError, PrefixState
from layerroute.scoring import continuation_nll, score_batch, task_prompts
from layerroute.tasks.base import Example, Task

from .conftest import tiny_model


def choice_task(scoring, n=10):
    words = ["red", "blue", "green", "gold", "pink", "gray", "cyan", "lime", "teal", "navy", "plum"][:n]
    exs = [Example(f"t/{w}", f"Which colour is {w} {'really ' * i}like?", "ABCD"[i % 4],
                   ("cherry red", "sky", "grass green", "sun")) for i, w in enumerate(words)]
    return Task("hand", "choice", exs, choice_scoring=scoring, answer_prefix="It is")


def routes_for(ex, n):
    specs = ["identity", "skip:1", "repeat:2", "skip:0,3", "chain:4,3,2,1,0", "skip:2-3"]
    return [ex.route(specs[i % len(specs)]) for i in range(n)]


def ref_logprobs(ex, ids, route, **kw):
    """The reference: log-softmax of one unpadded row's logits along ``route`` [T, V]."""
    return torch.log_softmax(ex(torch.tensor([ids]), routes=route, **kw).logits[0].double(), dim=-1)


def ref_continuation(ex, tok, prompt, continuation, route):
    """The reference: summed log-prob of ``continuation``'s tokens after ``prompt``, and their count."""
    p = tok(prompt, add_special_tokens=False).input_ids
    full = tok(prompt + continuation, add_special_tokens=False).input_ids
    assert full[:len(p)] == p and len(full) > len(p)  # the prompt's tokens are a prefix
    lp = ref_logprobs(ex, full, route)
    return float(sum(lp[t - 1, full[t]] for t in range(len(p), len(full)))), len(full) - len(p)


def ref_choice_scores(ex, tok, task, example, prompt, route):
    """Per option: the log-prob of its letter as the next token (letter), or of its text (cloze)."""
    if task.choice_scoring == "letter":
        lp = ref_logprobs(ex, tok(prompt, add_special_tokens=False).input_ids, route)[-1]
        letter_ids = [tok(" " + x, add_special_tokens=False).input_ids for x in "ABCD"[:len(example.choices)]]
        assert all(len(t) == 1 for t in letter_ids)
        return [float(lp[t[0]]) for t in letter_ids], [1] * len(letter_ids)
    return tuple(zip(*(ref_continuation(ex, tok, prompt, " " + c, route) for c in example.choices)))


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_batched_objective_equals_one_at_a_time_scoring(tiny, tok, scoring):
    """Batched, packed scores of mixed routes against log-softmax sums over one unpadded row each."""
    task = choice_task(scoring)
    obj = Objective(tiny, tok, task, batch_rows=7)
    routes = routes_for(tiny, len(task))
    batched = obj.score(range(len(task)), routes)
    prompts = task_prompts(tok, task, task.examples)
    checked = 0
    for i, (ex, r) in enumerate(zip(task.examples, routes)):
        lls, lens = ref_choice_scores(tiny, tok, task, ex, prompts[i], r)
        g = "ABCD".index(ex.answer)
        margin = lls[g] - max(x for j, x in enumerate(lls) if j != g)
        assert float(batched.margin[i]) == pytest.approx(margin, abs=1e-4)
        assert bool(batched.correct[i]) == (max(range(len(lls)), key=lls.__getitem__) == g)
        ref = score_batch(tiny, tok, task, [ex], [r])[0]
        assert ref.gold_nll == pytest.approx(-lls[g] / lens[g], abs=1e-4)
        assert bool(batched.correct[i]) == ref.correct == (float(batched.margin[i]) > 0)
        assert int(batched.blocks[i]) == r.cost
        checked += 1
    assert checked == len(task) == 10
    assert 0 < int(batched.correct.sum()) < len(task)  # the test sees both outcomes


def test_cloze_margin_equals_hand_computation(tiny, tok):
    task = choice_task("cloze", n=3)
    obj = Objective(tiny, tok, task)
    prompts = task_prompts(tok, task, task.examples)
    route = tiny.route("skip:1")
    got = obj.score(range(3), [route] * 3).margin
    for i, ex in enumerate(task.examples):
        nll, _, _ = continuation_nll(tiny, tok, [prompts[i]] * 4, [" " + c for c in ex.choices], [route] * 4)
        g = "ABCD".index(ex.answer)
        want = -nll[g] + min(n for j, n in enumerate(nll) if j != g)
        assert float(got[i]) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "eager"),
                                         ("gemma2", "eager"), ("gemma3", "sdpa"), ("granite", "sdpa")])
def test_packed_options_score_as_separate_rows(tok, family, attn):
    """Cloze options packed behind one shared prompt (one row per sample) give the margins of
    one row per option, for reordered and repeated routes and sliding windows shorter than the prompt."""
    ex = RouteExecutor(tiny_model(family, vocab_size=len(tok), attn_implementation=attn))
    task = choice_task("cloze", n=6)
    packed, plain = Objective(ex, tok, task, batch_rows=3), Objective(ex, tok, task, pack=False)
    assert packed.packed and not plain.packed and packed.ids.shape[0] == 6 and plain.ids.shape[0] == 24
    routes = routes_for(ex, 6)
    a, b = packed.score(range(6), routes), plain.score(range(6), routes)
    assert torch.allclose(a.margin, b.margin, atol=1e-4) and torch.equal(a.correct, b.correct)
    assert 0 < int(b.correct.sum()) < 6
    state = packed.advance(packed.begin([1, 4]), [(0, 1), (2,)])  # the walk agrees too
    want = plain.finish(plain.advance(plain.begin([1, 4]), [(0, 1), (2,)]))
    assert torch.allclose(packed.finish(state).margin, want.margin, atol=1e-4)


def test_a_model_that_cannot_pack_scores_separate_rows(tok, monkeypatch):
    import layerroute.executor as executor_module

    ex = RouteExecutor(tiny_model("llama", vocab_size=len(tok)))
    build = executor_module._build_mask  # emulate a model that ignores the packed mask: options see each other
    monkeypatch.setattr(executor_module, "_build_mask", lambda *a, **k: build(*a, **{**k, "segments": None}))
    with pytest.warns(UserWarning, match="own row"):
        obj = Objective(ex, tok, choice_task("cloze", n=4))
    assert not obj.packed and obj.ids.shape[0] == 16
    want = Objective(RouteExecutor(tiny_model("llama", vocab_size=len(tok))), tok, choice_task("cloze", n=4), pack=False)
    assert torch.allclose(obj.score(range(4), [ex.route()] * 4).margin, want.score(range(4), [ex.route()] * 4).margin,
                          atol=1e-5)


def test_generate_margin_is_minus_gold_nll_and_correct_decodes(tiny, tok):
    """Margins against the gold answer's log-softmax sum; correctness against a greedy loop,
    one unpadded row at a time, both written here."""
    from layerroute.tasks.extract import last_number

    exs = [Example(f"g/{i}", f"What is {i} plus {i}?", str(2 * i)) for i in range(4)]
    task = Task("gen", "generate", exs, max_new_tokens=4, extract="last_number")
    routes = routes_for(tiny, 4)
    scores = Objective(tiny, tok, task).score(range(4), routes)
    by_decoding = Objective(tiny, tok, task, reward="correct").score(range(4), routes)
    ref = score_batch(tiny, tok, task, exs, routes)
    texts, answers = [], []
    for i, (ex, prompt) in enumerate(zip(exs, task_prompts(tok, task, exs))):
        ll, n = ref_continuation(tiny, tok, prompt, " " + ex.answer, routes[i])
        assert float(scores.margin[i]) == pytest.approx(ll / n, abs=1e-4) == -ref[i].gold_nll
        ids = tok(prompt, add_special_tokens=False).input_ids
        for _ in range(task.max_new_tokens):
            nxt = int(ref_logprobs(tiny, ids, routes[i])[-1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
        texts.append(tok.decode(ids[len(tok(prompt, add_special_tokens=False).input_ids):], skip_special_tokens=True))
        answers.append(last_number(texts[-1]) or "")
        assert bool(by_decoding.correct[i]) == (answers[-1] == ex.answer) == ref[i].correct
    assert len(texts) == 4 and [s.output for s in ref] == texts and [s.prediction for s in ref] == answers


def test_prefix_reuse_equals_full_routes(tiny, tok):
    task = choice_task("cloze", n=4)
    obj = Objective(tiny, tok, task)
    state = obj.advance(obj.begin([0, 1, 2, 3]), [[0, 1]] * 4)
    tails = [[2, 3, 4], [3, 4], [2, 2, 4], [4, 3]]
    reused = obj.finish(obj.advance(state, tails))
    full = obj.score(range(4), [[0, 1] + t for t in tails])
    assert torch.allclose(reused.margin, full.margin, atol=1e-5)
    assert reused.blocks.tolist() == full.blocks.tolist() == [5, 4, 5, 4]
    # states of single samples stack back into one batch
    stacked = PrefixState.concat([state.select(2), state.select(0)])
    again = obj.finish(obj.advance(stacked, [tails[2], tails[0]]))
    assert torch.allclose(again.margin, full.margin[[2, 0]], atol=1e-5)


def test_lambda_and_hard_budget(tiny, tok):
    task = choice_task("letter", n=3)
    plain = Objective(tiny, tok, task).score(range(3), [[0, 1, 2, 3, 4]] * 3)
    obj = Objective(tiny, tok, task, lam=0.5, budget=Budget(blocks=4))
    s = obj.score(range(3), [[0, 1, 2, 3, 4], [0, 1, 2, 3], [0]])
    assert math.isinf(float(s.reward[0])) and float(s.reward[0]) < 0
    assert float(s.reward[1]) == pytest.approx(float(s.margin[1]) - 0.5 * 4 / 5)
    assert float(s.reward[2]) == pytest.approx(float(s.margin[2]) - 0.5 * 1 / 5)
    correct = Objective(tiny, tok, task, reward="correct").score(range(3), [[0, 1, 2, 3, 4]] * 3)
    assert correct.reward.tolist() == plain.correct.float().tolist()


def test_bad_objective_settings_are_refused(tiny, tok):
    task = choice_task("letter", n=2)
    for lam in (float("nan"), float("inf"), "0.1"):
        with pytest.raises(ObjectiveError, match="lambda must be a finite number"):
            Objective(tiny, tok, task, lam=lam)
    with pytest.raises(ObjectiveError, match="unknown reward 'accuracy'"):
        Objective(tiny, tok, task, reward="accuracy")
    with pytest.raises(BudgetError, match="leaves no block"):
        Objective(tiny, tok, task, budget=0.1)
    with pytest.raises(ObjectiveError, match="no examples"):
        Objective(tiny, tok, Task("empty", "choice", []))
    with pytest.raises(ObjectiveError, match="no notion of correct"):
        Objective(tiny, tok, Task("ll", "loglik", [Example("l/1", "a", "b")]), reward="correct")
    obj = Objective(tiny, tok, task)
    with pytest.raises(ObjectiveError, match="sample index 5 is out of range"):
        obj.score([5], [[0]])
    with pytest.raises(LayerRouteError, match="out of range"):
        obj.score([0], [[9]])


@pytest.mark.parametrize("text,want", [("0.8", Budget(ratio=0.8)), ("1", Budget(ratio=1.0)), ("24", Budget(blocks=24)),
                                       (0.5, Budget(ratio=0.5))])
def test_budget_parse(text, want):
    assert Budget.parse(text) == want


@pytest.mark.parametrize("text,msg", [("abc", "not a number"), ("-1", "positive"), ("0", "positive"),
                                      ("2.5", "whole number"), ("nan", "positive"), ("inf", "positive")])
def test_bad_budgets_are_refused(text, msg):
    with pytest.raises(BudgetError, match=msg):
        Budget.parse(text)
    assert Budget(ratio=0.8).max_blocks(30) == 24 and Budget(blocks=7).max_blocks(30) == 7
