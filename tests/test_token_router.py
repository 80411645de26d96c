"""Per-token routers (routers/token_router.py): exactness at "always execute", training lowers the
held-out KL, resume, save/load checks, cached decoding under both rules, bad input."""

import pytest
import torch

from layerroute import InputError, RouteExecutor
from layerroute.routers.network import RouterError
from layerroute.routers.token_router import (CONFIG_NAME, WEIGHTS_NAME, TokenRoutedModel, TrainTokenRouterConfig,
                                             heldout_kl, load_token_routers, new_token_routers, save_token_routers,
                                             train_token_routers)

from .conftest import altered_checkpoints, assert_logits_close, padded_batch, tiny_model


def windows(n, length, seed, vocab=96):
    return torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", ["kv-kept", "absent"])
def test_always_execute_reproduces_the_full_model(rule):
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    net = new_token_routers(ex, init_logit=-8.0, threshold=0.0, rule=rule)  # the gates would skip, but 0 = always
    routed = TokenRoutedModel(model, net)
    ids, mask = padded_batch(96, [9, 5, 9], 9, seed=3)
    out = routed(ids, mask)
    ref = ex(ids, mask).logits
    real = mask.bool()
    assert out.executed_share == 1.0
    assert_logits_close(out.logits[real], ref[real])
    kw = dict(max_new_tokens=6, output_logits=True)
    gen, base = routed.generate(ids, mask, **kw), ex.generate(ids, mask, **kw)
    assert torch.equal(gen.sequences, base.sequences)
    assert_logits_close(gen.logits, base.logits)
    # and the guard: at the default threshold these gates skip, which changes the logits
    routed.threshold = 0.5
    skipping = routed(ids, mask)
    assert skipping.executed_share == 0.0 and (skipping.logits[real] - ref[real]).abs().max() > 1e-2


@pytest.mark.parametrize("rule", ["kv-kept", "absent"])
def test_per_token_decisions_keep_cached_decoding_exact(rule):
    model = tiny_model("qwen2")
    ex = RouteExecutor(model)
    torch.manual_seed(1)
    net = new_token_routers(ex, init_logit=0.0, rule=rule)  # random-ish decisions around 0.5
    routed = TokenRoutedModel(model, net)
    ids, mask = padded_batch(96, [8, 4, 8, 6], 8, seed=4)
    out = routed(ids, mask)
    assert 0.2 < out.executed_share < 0.8  # the decisions really differ per token
    assert out.keep.shape == (4, ex.num_layers, 8)
    kw = dict(max_new_tokens=8, output_logits=True)
    cached = routed.generate(ids, mask, **kw)
    plain = routed.generate(ids, mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert_logits_close(cached.logits, plain.logits)
    # a batch-1 generation counts the (token, block) pairs its decisions executed, as a recomputation does
    assert bool(mask[0].all())
    gen = routed.generate(ids[:1], max_new_tokens=6)
    seen, again = routed.last_decisions, routed(gen.sequences[:, :-1])
    assert (seen.executed, seen.total) == (int(again.keep.sum()), again.keep.numel())
    # the prefill logits are those of the decisions' token mask run directly
    direct = ex(ids, mask, token_mask=out.keep, token_rule=rule).logits
    assert_logits_close(out.logits[mask.bool()], direct[mask.bool()])


def small_config(tmp_path, **kw):
    base = dict(output=str(tmp_path / "tr"), steps=24, batch_size=8, lr=1e-2, lam=0.0, val_windows=8,
                eval_every=8, bottleneck=16, progress=False)
    return TrainTokenRouterConfig(**{**base, **kw})


def test_training_lowers_heldout_kl_and_saves_the_routers(tmp_path):
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    train, val = windows(64, 12, seed=0), windows(8, 12, seed=1)
    net, summary = train_token_routers(ex, train, val, small_config(tmp_path))
    assert summary["heldout_kl_start"] > 0.05  # random gates at 0.5 skip about half the pairs
    assert summary["heldout_kl_end"] < 0.5 * summary["heldout_kl_start"]
    loaded = load_token_routers(tmp_path / "tr", model)
    assert loaded.config.training["heldout_kl_end"] == summary["heldout_kl_end"]
    assert heldout_kl(ex, loaded, val)[0] == pytest.approx(summary["heldout_kl_end"], rel=1e-5)
    # only router weights are written (no base weights)
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "tr" / WEIGHTS_NAME)).keys()
    assert all(k.startswith("gates.") for k in names)
    # lambda trades KL for compute: a large lambda executes less
    _, cheap = train_token_routers(ex, train, val, small_config(tmp_path, output=str(tmp_path / "cheap"), lam=2.0))
    assert cheap["executed_share_end"] < summary["executed_share_end"]


def test_an_interrupted_run_resumes_to_the_same_routers(tmp_path):
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    train, val = windows(32, 10, seed=0), windows(4, 10, seed=1)
    for gate in ("straight-through", "gumbel"):
        straight, _ = train_token_routers(ex, train, val, small_config(tmp_path, output=str(tmp_path / f"a{gate}"),
                                                                        steps=16, gate=gate))
        train_token_routers(ex, train, val, small_config(tmp_path, output=str(tmp_path / f"b{gate}"), steps=8,
                                                         gate=gate))
        resumed, summary = train_token_routers(ex, train, val, small_config(tmp_path, output=str(tmp_path / f"b{gate}"),
                                                                             steps=16, gate=gate))
        assert [h["step"] for h in summary["history"]] == [0, 8, 16]
        for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), (gate, k)
    with pytest.raises(RouterError, match="other settings \\(lam\\); pass --overwrite"):
        train_token_routers(ex, train, val, small_config(tmp_path, output=str(tmp_path / "bgumbel"), steps=16,
                                                         gate="gumbel", lam=0.5))


def test_saved_token_routers_refuse_another_model_and_corrupt_files(tmp_path):
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    d = save_token_routers(tmp_path / "r", new_token_routers(ex, base_model="tiny"))
    assert load_token_routers(d, model) is not None
    for name, other in altered_checkpoints("llama").items():
        with pytest.raises(RouterError, match="made on another checkpoint of the same shape"):
            load_token_routers(d, other)
    with pytest.raises(RouterError, match="made for llama with 5 layers .* but the model is llama with 3 layers"):
        load_token_routers(d, tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(RouterError, match="TokenRoutedModel|another checkpoint"):
        TokenRoutedModel.from_pretrained(altered_checkpoints("llama")["one value"], d)
    # a truncated weights file, a corrupt config, a missing directory: one RouterError line each
    blob = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RouterError, match="is corrupt or truncated") as err:
        load_token_routers(d, model)
    assert "\n" not in str(err.value)
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(RouterError, match="is corrupt \\(not JSON"):
        load_token_routers(d, model)
    with pytest.raises(RouterError, match="does not exist"):
        load_token_routers(tmp_path / "nothing", model)


def test_bad_training_arguments_get_one_clear_error(tmp_path):
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    train = windows(8, 8, seed=0)
    bad = [(dict(lam=-0.1), "--lambda must be a finite number >= 0 .* got -0.1"),
           (dict(lam=float("nan")), "--lambda must be"),
           (dict(gate="hard"), "--gate must be one of straight-through, gumbel"),
           (dict(rule="sparse"), "--rule must be one of kv-kept, absent"),
           (dict(steps=0), "--steps must be a positive integer"),
           (dict(threshold=1.5), "must be a number in \\[0, 1\\]")]
    for kw, message in bad:
        with pytest.raises(InputError, match=message) as err:
            train_token_routers(ex, train, train, small_config(tmp_path, **kw))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "tr").exists()  # nothing was written


def test_routed_model_loads_token_routers(tmp_path):
    from layerroute.routers import RoutedModel

    model = tiny_model("llama")
    d = save_token_routers(tmp_path / "r", new_token_routers(RouteExecutor(model), threshold=0.0))
    routed = RoutedModel.from_pretrained(model, d)
    assert isinstance(routed, TokenRoutedModel)
    ids = torch.randint(1, 90, (2, 6))
    assert_logits_close(routed(ids).logits, RouteExecutor(model)(ids).logits)
    with routed.disable_routing():
        assert routed(ids).executed_share is None
    routed.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS_NAME).read_bytes() == (d / WEIGHTS_NAME).read_bytes()


def test_train_token_router_command_trains_and_resumes(tiny_dir, tmp_path, capsys):
    from layerroute.cli import commands, main

    if "train-token-router" not in {c.name for c in commands()}:
        pytest.skip("the routers plug-in does not register train-token-router in this checkout")
    out = tmp_path / "tr"
    argv = ["train-token-router", "--model", str(tiny_dir), "--tasks", "gen", "--steps", "4", "--max-length", "24",
            "--batch-size", "2", "--val-windows", "2", "--eval-every", "2", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "held-out KL" in first and (out / WEIGHTS_NAME).is_file() and (out / "train_state.json").is_file()
    assert main(argv) == 0  # a finished run: resumes at its last step, trains nothing more
    assert capsys.readouterr().out == first
    assert main(argv[:-1] + ["--lambda", "-1"]) != 0
