"""The lm-evaluation-harness backend: the same numbers as lm-eval's hf model, routed scoring, bad input."""

import json
import re

import pytest
import torch

import layerroute  # noqa: F401  (registers --model layerroute with lm-eval)
from layerroute import InputError, LayerRouteError, RouteExecutor, load_model
from layerroute.cli import main

from .conftest import tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

CONTEXTS = ["The capital of France is", "2 + 2 =", "Question: what colour is the sky?\nAnswer:"]
CONTINUATIONS = [" Paris", " 4", " blue", " the city of light", " five"]


def request(kind, *args):
    return Instance(kind, {}, args, 0)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_dir), device="cpu", batch_size=4, max_length=24)


def backend(model_args: str):
    return get_model("layerroute").create_from_arg_string(model_args, {"batch_size": 1, "device": None})


@pytest.fixture(scope="module")
def full(tiny_dir):
    return backend(f"model={tiny_dir},batch_size=3,max_length=24")


def test_import_layerroute_registers_the_backend_lazily():
    import subprocess
    import sys

    code = ("import sys, layerroute; from lm_eval.api.registry import model_registry as r; "
            "print(r._objs['layerroute'], 'hf' in r, [m for m in sys.modules if m.startswith('layerroute.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("layerroute.policies.lm_eval_backend:LayerRouteLM True")
    assert "policies" not in out.split("True", 1)[1] and "routers" not in out  # nothing of the plug-ins imported


def test_backend_matches_hf_for_all_request_types(hf, full):
    reqs = [request("loglikelihood", c, o) for c in CONTEXTS for o in CONTINUATIONS]
    reqs.append(request("loglikelihood", "", "hello world"))  # an empty context: the prefix token
    want, got = hf.loglikelihood(reqs), full.loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4
    # a document longer than max_length (24) needs several rolling windows
    docs = [request("loglikelihood_rolling", "A long document about many things, " * 6),
            request("loglikelihood_rolling", "x")]
    want, got = hf.loglikelihood_rolling(docs), full.loglikelihood_rolling(docs)
    assert got == pytest.approx(want, abs=1e-3, rel=1e-5)
    gen = [request("generate_until", c, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}) for c in CONTEXTS]
    assert full.generate_until(gen) == hf.generate_until(gen)


def test_generate_until_stops_at_the_until_strings(full):
    ctx = CONTEXTS[0]
    text = full.generate_until([request("generate_until", ctx, {"max_gen_toks": 12})])[0]
    stop = text.split()[2]  # a word from the middle of what it generates unstopped
    calls, forward = [], full.executor.forward
    full.executor.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    try:
        cut = full.generate_until([request("generate_until", ctx, {"until": [stop], "max_gen_toks": 12})])[0]
    finally:
        del full.executor.forward
    assert cut == text.split(stop)[0] and cut != text
    assert len(calls) < 12  # it stopped decoding there, not at max_gen_toks


def test_routed_loglikelihood_is_the_executor_along_the_route(tiny_dir, full):
    """Options packed behind one context along a route score as each option in its own row."""
    routed = backend(f"model={tiny_dir},route=skip:1-2+repeat:3,batch_size=2")
    ex = routed.executor
    route = ex.route("skip:1-2+repeat:3")
    reqs = [request("loglikelihood", c, o) for c in CONTEXTS[:2] for o in CONTINUATIONS[:3]]
    got = routed.loglikelihood(reqs)
    for r, (ll, _) in zip(reqs, got):
        ctx, cont = routed._encode_pair(*r.args)
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(ex(ids, None, route).logits[0, -len(cont) - 1:-1].float(), -1)
        assert ll == pytest.approx(float(logp[range(len(cont)), cont].sum()), abs=1e-4)
    assert [ll for ll, _ in got] != [ll for ll, _ in full.loglikelihood(reqs)]  # the route changed them


def test_a_router_picks_each_route_from_the_context(tiny_dir, tmp_path):
    from layerroute.routers import RouterPolicy, save_routers

    from .test_routers import make_net

    model, _ = load_model(str(tiny_dir))
    save_routers(tmp_path / "routers", make_net(model))
    routed = backend(f"model={tiny_dir},router={tmp_path / 'routers'},batch_size=4")
    assert isinstance(routed.policy, RouterPolicy)
    reqs = [request("loglikelihood", c, o) for c in CONTEXTS for o in CONTINUATIONS[:2]]
    got = routed.loglikelihood(reqs)
    ex = routed.executor
    for r, (ll, _) in zip(reqs, got):
        ctx, cont = routed._encode_pair(*r.args)
        route = routed.policy.route_batch(ex, torch.tensor([ctx]), torch.ones(1, len(ctx), dtype=torch.long))[0]
        logp = torch.log_softmax(ex(torch.tensor([ctx + cont]), None, route).logits[0, -len(cont) - 1:-1], -1)
        assert ll == pytest.approx(float(logp[range(len(cont)), cont].sum()), abs=1e-4)
    assert routed.generate_until([request("generate_until", CONTEXTS[0], {"max_gen_toks": 4})])[0]
    # tau 1 never skips or repeats: the full model, as with `layerroute eval --router DIR --tau 1`
    sure = backend(f"model={tiny_dir},router={tmp_path / 'routers'},tau=1.0")
    assert backend(f"model={tiny_dir},router={tmp_path / 'routers'},budget=0.9").policy.budget == 0.9
    full = backend(f"model={tiny_dir}")
    assert [ll for ll, _ in sure.loglikelihood(reqs)] == pytest.approx([ll for ll, _ in full.loglikelihood(reqs)],
                                                                       abs=1e-5)
    with pytest.raises(LayerRouteError, match="model_args tau must be a number in"):
        backend(f"model={tiny_dir},router={tmp_path / 'routers'},tau=2")
    with pytest.raises(InputError, match="budget and tau apply to trained routers only, not to a static policy"):
        backend(f"model={tiny_dir},route=skip:1,tau=0.5")


def test_bad_model_args_are_clear_errors(tiny_dir, tmp_path):
    from layerroute.routers import save_routers

    from .test_routers import make_net

    with pytest.raises(InputError, match=r"unknown model_args key\(s\) 'pretrained' for --model layerroute; use model"):
        backend(f"pretrained={tiny_dir}")
    with pytest.raises(InputError, match="route and router exclude each other"):
        backend(f"model={tiny_dir},route=skip:1,router={tmp_path}")
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 'auto'"):
        backend(f"model={tiny_dir},batch_size=auto")
    other = tiny_model("llama", seed=7, vocab_size=49152)  # same shape, other weights
    save_routers(tmp_path / "other", make_net(other))
    with pytest.raises(LayerRouteError, match="other weights|another checkpoint|weights digest"):
        backend(f"model={tiny_dir},router={tmp_path / 'other'}")
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(InputError, match=f"device '{missing}' was asked for but torch sees"):
        backend(f"model={tiny_dir},device={missing}")
    full = backend(f"model={tiny_dir}")
    with pytest.raises(InputError, match="generation option\\(s\\) 'num_beams' are not supported"):
        full.generate_until([request("generate_until", "hi", {"num_beams": 4})])


def write_task(folder, rows):
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")


def test_layerroute_lm_eval_command(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_task(tmp_path, [{"prompt": c, "choices": CONTINUATIONS[:3], "gold": 0} for c in CONTEXTS])
    common = ["--tasks", "tiny_mc", "--include_path", str(tmp_path)]
    assert main(["lm-eval", "--model", "layerroute", "--model_args", f"model={tiny_dir},route=skip:2",
                 *common, "--output_path", str(tmp_path / "out"), "--log_samples"]) == 0
    assert re.search(r"\|tiny_mc\|.*\|acc\s*\|", capsys.readouterr().out)
    # a bad model_args key (the other bad inputs raise the same way: test_bad_model_args_are_clear_errors)
    assert main(["lm-eval", "--model", "layerroute", "--model_args", f"model={tiny_dir},bogus=1", *common]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"error: unknown model_args key\(s\) 'bogus' for --model layerroute; use model, .*", errors[0])


def test_simple_evaluate_after_import(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_task(tmp_path, [{"prompt": c, "choices": CONTINUATIONS[:2], "gold": 1} for c in CONTEXTS])
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="layerroute", model_args=f"model={tiny_dir},batch_size=2", tasks=["tiny_mc"],
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert 0 <= out["results"]["tiny_mc"]["acc,none"] <= 1


def test_executor_generate_stop_hook(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    ex = RouteExecutor(model)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    full = ex.generate(ids, max_new_tokens=6).sequences
    out = ex.generate(ids, max_new_tokens=6, stop=lambda seq: torch.tensor([seq.shape[1] >= 5, False]),
                      pad_token_id=0).sequences
    assert torch.equal(out[1], full[1]) and torch.equal(out[0, :5], full[0, :5]) and (out[0, 5:] == 0).all()
