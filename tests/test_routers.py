"""Routers: window pooling, batched prefill routing, save/load safety, RoutedModel, training, CLI, pipeline."""

import json
import warnings

import pytest
import torch

from layerroute import RouteExecutor, load_model
from layerroute.errors import RouteError
from layerroute.cli import main
from layerroute.models import weights_digest
from layerroute.routers import (RoutedModel, RouterConfig, RouterError, RouterNetwork, load_routers, route_prompts,
                                save_routers, window_means)
from layerroute.routers.training import Labels, class_weights, focal_loss, load_labels, train_routers
from layerroute.store import ResultsStore
from layerroute.tasks.base import Example, Task

from .conftest import altered_checkpoints, padded_batch, tiny_model


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def make_net(model, seed=0, **kw):
    torch.manual_seed(seed)
    ex = RouteExecutor(model)
    cfg = RouterConfig(num_layers=ex.num_layers, hidden_size=ex.fingerprint.hidden_size, bottleneck=16,
                       model=ex.fingerprint.to_dict(), weights_digest=weights_digest(model), **kw)
    net = RouterNetwork(cfg)
    with torch.no_grad():  # larger weights so that the routers choose every action somewhere
        for p in net.parameters():
            p.mul_(4.0)
    return net


def batch():
    return padded_batch(96, [7, 3, 10, 1], 10, seed=1)


def test_window_means_match_a_loop_over_samples():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 12, 5, generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for b, n in enumerate([12, 5, 2]):
        mask[b, 12 - n:] = 1
    means, valid = window_means(hidden, mask, 4)
    assert valid.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]
    for b, n in enumerate([12, 5, 2]):
        real = hidden[b, 12 - n:]
        w = min(4, n)
        bounds = [-(-j * n // w) for j in range(w + 1)]  # window j: ceil(j n / w) .. ceil((j + 1) n / w)
        for j in range(w):
            assert torch.allclose(means[b, j], real[bounds[j]:bounds[j + 1]].mean(0), atol=1e-6)


def test_batch_routes_each_sample_as_if_alone_and_uses_every_action(base):
    ex, net = RouteExecutor(base), make_net(base)
    ids, mask = batch()
    routes, walk = route_prompts(net, ex, ids, mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        alone, w1 = route_prompts(net, ex, ids[b:b + 1, -n:], mask[b:b + 1, -n:])
        assert alone[0].layers == routes[b].layers
        assert torch.allclose(w1.logits[0], walk.logits[b], atol=1e-5)
    assert set(walk.counts.unique().tolist()) == {0, 1, 2}  # the test exercises skip, execute and repeat


def test_budget_caps_the_routes(base):
    ex, net = RouteExecutor(base), make_net(base)
    ids, mask = batch()
    free = route_prompts(net, ex, ids, mask)[0]
    capped = route_prompts(net, ex, ids, mask, budget="3")[0]
    assert max(r.cost for r in free) > 3 and all(1 <= r.cost <= 3 for r in capped)


def test_save_load_round_trip_gives_identical_routes_and_logits(base, tmp_path):
    net = make_net(base)
    model = RoutedModel(base, net)
    ids, mask = batch()
    before = model(ids, mask)
    files = model.save_pretrained(tmp_path / "r")
    again = RoutedModel.from_pretrained(base, tmp_path / "r")
    after = again(ids, mask)
    assert [r.layers for r in after.routes] == [r.layers for r in before.routes]
    assert torch.equal(after.logits, before.logits) and torch.equal(after.router_logits, before.router_logits)
    # only the routers are written: no base weights
    assert sorted(p.name for p in files.iterdir()) == ["policy_config.json", "router_config.json",
                                                        "routers.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(str(files / "routers.safetensors"))
    assert all(k.startswith("routers.") for k in saved)
    assert sum(t.numel() for t in saved.values()) == net.num_parameters() < sum(p.numel() for p in base.parameters())
    config = json.loads((files / "router_config.json").read_text())
    assert config["type"] == "router" and config["weights_digest"] == weights_digest(base)
    assert (files / "router_config.json").read_text() == json.dumps(config, indent=2, sort_keys=True) + "\n"


def test_mismatched_corrupt_truncated_and_missing_files_are_refused(base, tmp_path):
    d = save_routers(tmp_path / "r", make_net(base))
    load_routers(d, tiny_model("llama"))  # an equal checkpoint (another object) loads
    for other in {"all weights": tiny_model("llama", seed=1), **altered_checkpoints("llama")}.values():
        with pytest.raises(RouterError, match="another checkpoint of the same shape"):
            load_routers(d, other)
    with pytest.raises(RouterError, match="made for llama with 5 layers .* but the model is llama with 4 layers"):
        load_routers(d, tiny_model("llama", num_hidden_layers=4))
    weights = d / "routers.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(RouterError, match="corrupt or truncated"):
        load_routers(d, base)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(RouterError, match="corrupt or truncated"):
        load_routers(d, base)
    weights.write_bytes(good)
    config = json.loads((d / "router_config.json").read_text())
    (d / "router_config.json").write_text(json.dumps({**config, "bottleneck": 8}))
    with pytest.raises(RouterError, match="does not match router_config.json"):
        load_routers(d, base)
    (d / "router_config.json").write_text("{not json")
    with pytest.raises(RouterError, match="corrupt"):
        load_routers(d, base)
    (d / "router_config.json").unlink()
    with pytest.raises(RouterError, match="router_config.json is missing"):
        load_routers(d, base)


def test_unknown_config_keys_are_dropped_with_a_warning(base):
    data = {**json.loads(make_net(base).config.to_json()), "from_the_future": 1}
    with pytest.warns(UserWarning, match="from_the_future"):
        config = RouterConfig.from_dict(data)
    assert config.bottleneck == 16
    with pytest.raises(RouterError, match="version"):
        RouterConfig.from_dict({**data, "version": 99})


def test_routed_generate_equals_the_executor_along_the_chosen_routes(base):
    model = RoutedModel(base, make_net(base))
    ids, mask = batch()
    routes = model.route(ids, mask)
    assert len({r.layers for r in routes}) > 1  # samples really take different routes
    eos = base.generation_config.eos_token_id  # unset options come from the generation config, as in HF
    got = model.generate(ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.executor.generate(ids, mask, routes, max_new_tokens=6, eos_token_id=eos, pad_token_id=0).sequences
    assert torch.equal(got, want)
    sampled = model.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=5, seed=3, pad_token_id=0)
    assert torch.equal(sampled, model.executor.generate(ids, mask, routes, max_new_tokens=6, do_sample=True, top_k=5,
                                                        seed=3, eos_token_id=eos, pad_token_id=0).sequences)
    with model.disable_routing():
        plain = model.generate(ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(plain, base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                do_sample=False, pad_token_id=0))
        assert model(ids, mask).routes is None
    with pytest.raises(RouterError, match="num_beams"):
        model.generate(ids, mask, num_beams=2)


def test_the_routing_walk_is_the_prefill_generation_continues_from(base):
    ex, net = RouteExecutor(base), make_net(base)
    ids, mask = batch()
    routes, decided = route_prompts(net, ex, ids, mask, prefill=True)
    ref = ex(ids, mask, routes, use_cache=True, logits_to_keep=1)
    got = decided.prefill
    assert torch.allclose(got.logits, ref.logits, atol=1e-5)
    assert [(s.layer, s.row_list) for s in got.cache.schedule] == [(s.layer, s.row_list) for s in ref.cache.schedule]
    for a, b in zip(got.cache.keys + got.cache.values, ref.cache.keys + ref.cache.values):
        assert torch.allclose(a, b, atol=1e-5)
    want = ex.generate(ids, mask, routes, max_new_tokens=5, output_logits=True)
    reused = ex.generate(ids, mask, routes, max_new_tokens=5, output_logits=True, prefill=got)
    assert torch.equal(reused.sequences, want.sequences)
    assert torch.allclose(reused.logits, want.logits, atol=1e-5)
    other = [ex.route(None)] * ids.shape[0]
    with pytest.raises(RouteError, match="not made for these prompts"):
        ex.generate(ids, mask, other, max_new_tokens=2, prefill=route_prompts(net, ex, ids, mask, prefill=True)[1].prefill)


def synthetic_task(n=48):
    """Two kinds of prompt; each kind has its own 'searched' route."""
    colours = ["red", "blue", "green", "gold", "pink", "gray"]
    exs = [Example(f"s/{i}", (f"Name a colour like {colours[i % 6]}." if i % 2 else
                              f"Add {i} and {i + 3} please, then tell me the number."), "A", ("x", "y"))
           for i in range(n)]
    return Task("synthetic", "choice", exs, choice_scoring="cloze", answer_prefix="It is")


def test_training_on_synthetic_labels_reaches_high_agreement(tok):  # noqa: F811
    model = tiny_model("llama", vocab_size=len(tok))
    ex = RouteExecutor(model)
    task = synthetic_task()
    route_of = {0: (0, 2, 3, 3, 4), 1: (0, 1, 2, 4)}  # skip 1 + repeat 3, or skip 3
    chains = {e.uid: route_of[i % 2] for i, e in enumerate(task.examples)}
    labels = Labels("synthetic", {}, 0, chains, {})
    net, report = train_routers(ex, tok, labels, bottleneck=32, epochs=40, batch_size=8, lr=3e-3,
                                patience=40, refine_epochs=3, progress=False, task=task)
    assert report["val_held_out"] and report["val_samples"] == 10
    assert report["best_val"]["agreement"] >= 0.95
    assert max(report["on_policy_val"]["agreement"], report["refinement"]["on_policy_val_after"]["agreement"]) >= 0.95
    assert sum(report["label_counts"]) == 38 * 5 and report["label_counts"][2] > 0


def test_class_weights_follow_the_loaded_counts_and_focal_loss_weights_classes():
    labels = torch.tensor([[1, 1, 1, 1, 0, 0, 2, 1]])
    w = class_weights(labels, beta=0.999)
    assert w[2] > w[0] > w[1] and abs(float(w.mean()) - 1) < 1e-5
    assert class_weights(torch.tensor([[1, 1]]))[0] == 0  # absent classes get no weight
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 1])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(focal_loss(logits, target, torch.ones(3), gamma=0.0), ce.mean())
    assert focal_loss(logits, target, torch.ones(3), gamma=2.0) < ce.mean()


def _store(path, task_spec, records, split="search", limit=None, digest=None, settings=None):
    header = {"kind": "search:mcts", "settings": {"task": task_spec, "seed": 0, "limit": limit, **(settings or {})},
              "model": {},
              "task": task_spec, "split": split, "seed": 0, "weights_digest": digest}
    with ResultsStore(path, header) as store:
        for r in records:
            store.append(r)


def test_labels_from_per_sample_and_summary_stores(tmp_path):
    from layerroute.tasks import get_task

    task = get_task("suite", seed=0)
    search = task.split("search").examples
    val = task.split("validation").examples
    _store(tmp_path / "mcts", "suite", [{"key": search[0].uid, "layers": [0, 1, 1, 3]},
                                        {"key": search[1].uid, "layers": [3, 2]},  # reordered: skipped
                                        {"key": "suite/not-a-sample", "layers": [0]},  # the task changed: warned
                                        {"type": "summary", "samples": 2}])
    _store(tmp_path / "val", "suite", [{"key": "route", "layers": [0, 2]},
                                       {"type": "summary", "route": {"layers": [0, 2]}}], split="validation", limit=3)
    with pytest.warns(UserWarning, match="1 routes name samples that task 'suite' does not have"):
        labels = load_labels([tmp_path / "mcts", tmp_path / "val"])
    assert labels.search == {search[0].uid: (0, 1, 1, 3)} and labels.skipped == 1
    assert labels.validation == {e.uid: (0, 2) for e in val[:3]}
    _store(tmp_path / "other", "gen", [{"key": "x", "layers": [0]}])
    with pytest.raises(RouterError, match="one task per router"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unknown sample, warned about above
        load_labels([tmp_path / "mcts", tmp_path / "other"])


def test_labels_read_the_task_as_its_search_did(tmp_path):
    """A store's settings say how the task was read (fields, kind, scoring, extractor); its labels read it so."""
    from layerroute.tasks import get_task

    choice = tmp_path / "choice.jsonl"
    choice.write_text("".join(json.dumps({"q": f"Pick {i}", "opts": ["x", "y"], "a": "A"}) + "\n" for i in range(10)))
    settings = {"fields": "question=q,choices=opts,answer=a", "kind": "choice", "scoring": "cloze", "extract": None,
                "skip_bad_rows": False}
    uid = get_task(f"jsonl:{choice}", fields={"question": "q", "choices": "opts", "answer": "a"},
                   kind="choice").split("search").examples[0].uid
    _store(tmp_path / "cloze", f"jsonl:{choice}", [{"key": uid, "layers": [0, 1]}], settings=settings)
    labels = load_labels(tmp_path / "cloze")
    assert labels.task_options == {"seed": 0, "fields": {"question": "q", "choices": "opts", "answer": "a"},
                                   "kind": "choice", "choice_scoring": "cloze"}
    assert labels.task().choice_scoring == "cloze" and labels.search == {uid: (0, 1)}

    words = tmp_path / "words.jsonl"  # gold answers with no number: only the first_word extractor reads them
    words.write_text("".join(json.dumps({"question": f"Capital {i}?", "answer": "Paris"}) + "\n" for i in range(10)))
    uid = get_task(f"jsonl:{words}", extract="first_word").split("search").examples[0].uid
    _store(tmp_path / "words", f"jsonl:{words}", [{"key": uid, "layers": [0]}],
           settings={"extract": "first_word", "seed": 3})
    labels = load_labels(tmp_path / "words")
    assert labels.task_options == {"seed": 3, "extract": "first_word"} and labels.seed == 3
    assert labels.task().examples[0].answer == "paris"


def test_train_router_cli_then_eval_and_run_with_the_router(tiny_dir, tmp_path, capsys):
    from layerroute.tasks import get_task

    task = get_task("suite", seed=0)
    records = [{"key": e.uid, "layers": [0, 1, 2, 4] if i % 2 else [0, 1, 1, 2, 3, 4]}
               for i, e in enumerate(task.split("search").examples[:12])]
    _store(tmp_path / "labels", "suite", records, digest=weights_digest(load_model(str(tiny_dir))[0]))
    out = tmp_path / "routers"
    assert main(["train-router", "--model", str(tiny_dir), "--labels", str(tmp_path / "labels"), "--epochs", "2",
                 "--refine-epochs", "1", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "10 train / 2 validation samples" in text and "% of the base model" in text
    assert main(["train-router", "--model", str(tiny_dir), "--labels", str(tmp_path / "labels"),
                 "--output", str(out)]) == 2
    assert "already holds routers" in capsys.readouterr().err
    for flag in ("--router", "--policy"):
        assert main(["eval", "--model", str(tiny_dir), "--task", "suite", "--limit", "4", flag, str(out)]) == 0
        assert "accuracy" in capsys.readouterr().out
    assert main(["run", "--model", str(tiny_dir), "--router", str(out), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert "block executions of 5" in capsys.readouterr().err
    (out / "routers.safetensors").write_bytes(b"junk")
    assert main(["eval", "--model", str(tiny_dir), "--task", "suite", "--limit", "4", "--router", str(out)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_pipeline_runs_end_to_end_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", "--model", str(tiny_dir), "--search-limit", "6", "--simulations", "3",
                 "--epochs", "2", "--refine-epochs", "1", "--test-limit", "4", "--calib-limit", "3",
                 "--baseline", "drop_last", "--max-new-tokens", "3", "--tau-limit", "4", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    for step in ("1. MCTS search", "2. Train routers", "tau ", "3. Evaluate", "4. Generate", "| routers (tau ",
                 "| full model |", "drop_last static route", "ORACLE, reads labels: upper bound",
                 "null labels: its chance level", "robust labels:"):
        assert step in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["method"] == "full model" and summary["rows"][1]["method"].startswith("routers (tau ")
    assert summary["rows"][0]["mean_blocks"] == 5
    RoutedModel.from_pretrained(str(tiny_dir), out / "routers")  # the saved routers load on their base
