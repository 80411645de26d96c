"""The executor against the Hugging Face forward (the oracle), batching, and cached decoding."""

import random

import pytest
import torch

from layerroute import InputError, LayerRouteError, Route, RouteError, RouteExecutor

from .conftest import FAMILIES, assert_logits_close, padded_batch, tiny_model


def hf_logits(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def random_routes(fp, n, rng):
    """Skip, repeat and reorder routes."""
    L = fp.num_layers
    routes = []
    for k in range(n):
        kind = k % 3
        if kind == 0:  # skip
            keep = sorted(rng.sample(range(L), rng.randint(1, L - 1)))
            routes.append(Route(tuple(keep), fp))
        elif kind == 1:  # repeat
            counts = [rng.choice([1, 1, 2, 3]) for _ in range(L)]
            routes.append(Route(tuple(i for i, c in enumerate(counts) for _ in range(c)), fp))
        else:  # reorder, with repeats
            routes.append(Route(tuple(rng.choice(range(L)) for _ in range(rng.randint(2, L + 2))), fp))
    return routes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_route_matches_hf_forward(family):
    model = tiny_model(family)
    ex = RouteExecutor(model)
    assert ex.check.passed and ex.check.max_diff <= ex.check.tolerance * ex.check.scale  # the self-check ran
    ids, mask = padded_batch(model.config.vocab_size, [14, 9, 14], 14)
    ref = hf_logits(model, ids, mask)
    out = ex(ids, mask).logits
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max().item() <= 1e-5
    # Without padding, positions need no help: plain HF forward.
    ref = model(input_ids=ids[:1]).logits
    assert (ex(ids[:1]).logits - ref).abs().max().item() <= 1e-5


def hf_chain_logits(model, ids, mask, chain):
    """The independent reference for any route: HF's own forward with ``model.model.layers``
    replaced by the chain's blocks, in order, repeats included (a repeated block is the same
    module listed twice, so HF runs it once per pass), and no cache.

    HF's loop picks each layer's mask and rotary table by ``config.layer_types[i]``, the
    position in the list (Qwen2/3, Gemma2/3), so those are replaced too, by each block's own
    type; every other family keys its masks on nothing per layer (Mistral and Phi3 have one
    window for all) and the window a layer uses is fixed in its module. With the cache off,
    ``self_attn.layer_idx`` is never read, so a replaced list is a faithful reference."""
    inner, config = model.model, model.config
    saved = inner.layers, config.num_hidden_layers, getattr(config, "layer_types", None)
    inner.layers = torch.nn.ModuleList([saved[0][i] for i in chain])
    config.num_hidden_layers = len(chain)
    if saved[2] is not None:
        config.layer_types = [saved[2][i] for i in chain]
    try:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    finally:
        inner.layers, config.num_hidden_layers = saved[0], saved[1]
        if saved[2] is not None:
            config.layer_types = saved[2]


# Blocks 0..4: skip, reorder, repeat, and reordered repeats longer than the model.
REFERENCE_CHAINS = [(0, 2, 4), (1, 0, 3, 2, 4), (4, 1), (0, 1, 1, 2, 3, 3, 3, 4), (4, 0, 0, 2, 1, 3, 3)]
# Gemma3's tiny default makes every layer sliding; mix in global layers (another rotary table).
REFERENCE_OVERRIDES = {"gemma3": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                   "sliding_attention", "full_attention"])}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3", "granite"])
def test_routes_equal_hf_with_its_layer_list_replaced_by_the_chain(family):
    """Each sample of a left-padded batch follows its own route; its real positions equal HF's
    forward along that chain (``hf_chain_logits``), within the identity test's tolerance.
    Families: plain (llama), per-layer windows (qwen2, gemma2 eager), one window (mistral),
    per-layer rotary tables (gemma3), scalings outside the layers (granite)."""
    model = tiny_model(family, **REFERENCE_OVERRIDES.get(family, {}))
    ex = RouteExecutor(model)
    lengths = [11, 6, 11, 8, 3]  # sliding windows of 5 or 6 are shorter than most prompts
    ids, mask = padded_batch(model.config.vocab_size, lengths, 11, seed=8)
    out = ex(ids, mask, [Route(c, ex.fingerprint) for c in REFERENCE_CHAINS]).logits
    identity, checked = hf_logits(model, ids, mask), 0
    for b, chain in enumerate(REFERENCE_CHAINS):
        ref, real = hf_chain_logits(model, ids, mask, chain)[b], mask[b].bool()
        assert_logits_close(out[b, real], ref[real])
        scale = max(1.0, ref[real].abs().max().item())
        assert (ref[real] - identity[b, real]).abs().max() > 1e-4 * scale  # the route matters: 10x the tolerance
        checked += 1
    assert checked == len(REFERENCE_CHAINS) == 5


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "gemma3"])
def test_mixed_routes_with_left_padding_equal_each_sample_alone(family):
    model = tiny_model(family)
    ex = RouteExecutor(model)
    routes = random_routes(ex.fingerprint, 6, random.Random(1))
    lengths = [12, 7, 12, 9, 3, 10]
    ids, mask = padded_batch(model.config.vocab_size, lengths, 12, seed=2)
    out = ex(ids, mask, routes).logits
    for b, n in enumerate(lengths):
        alone = ex(ids[b:b + 1, -n:], routes=routes[b]).logits[0]
        assert (alone - out[b, -n:]).abs().max().item() <= 1e-5, (b, routes[b].layers)


def test_routes_change_the_logits():
    """Guards the tests above: a skipped or repeated block must make a difference."""
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    ids = torch.randint(1, 90, (1, 8))
    base = ex(ids).logits
    for spec in ["skip:2", "repeat:2", "chain:1,0,2,3,4"]:
        assert (ex(ids, routes=spec).logits - base).abs().max() > 1e-2, spec


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "phi3"])
def test_cached_generation_equals_recomputation(family):
    model = tiny_model(family)
    ex = RouteExecutor(model)
    routes = random_routes(ex.fingerprint, 6, random.Random(3))
    ids, mask = padded_batch(model.config.vocab_size, [6, 4, 6, 5, 2, 6], 6, seed=4)
    kw = dict(max_new_tokens=10, output_logits=True)
    cached = ex.generate(ids, mask, routes, **kw)
    plain = ex.generate(ids, mask, routes, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert_logits_close(cached.logits, plain.logits)


def test_cache_gives_each_pass_its_own_slot_and_skips_store_nothing():
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    fp = ex.fingerprint
    ids = torch.randint(1, 90, (2, 5))
    out = ex(ids, routes=[Route((0, 1, 1, 1, 4), fp), Route((0, 1, 1, 1, 4), fp)], use_cache=True)
    assert len(out.cache.keys) == 5  # three passes of block 1 -> three slots; blocks 2, 3 none
    assert all(k.shape[-2] == 5 for k in out.cache.keys)
    mixed = ex(ids, routes=[Route((0, 1, 1), fp), Route((2,), fp)], use_cache=True).cache
    # rows only hold K/V for blocks they run
    assert sorted((s.layer, s.row_list) for s in mixed.schedule) == [(0, (0,)), (1, (0,)), (1, (0,)), (2, (1,))]
    assert [k.shape[0] for k in mixed.keys] == [1, 1, 1, 1]
    with pytest.raises(RouteError, match="other routes"):
        ex(ids[:, :1], routes="skip:0", cache=out.cache)


def test_sampling_is_reproducible_from_seed():
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    ids = torch.randint(1, 90, (2, 4))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    a = ex.generate(ids, routes="repeat:1", seed=7, **kw).sequences
    b = ex.generate(ids, routes="repeat:1", seed=7, **kw).sequences
    c = ex.generate(ids, routes="repeat:1", seed=8, **kw).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    # sampled decoding with the cache follows the same tokens as without it
    d = ex.generate(ids, routes="repeat:1", seed=7, use_cache=False, **kw).sequences
    assert torch.equal(a, d)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_per_token_mask_cached_equals_recomputation(family):
    model = tiny_model(family)
    ex = RouteExecutor(model)
    L, new = ex.num_layers, 8
    ids, mask = padded_batch(model.config.vocab_size, [6, 3, 5], 6, seed=5)
    g = torch.Generator().manual_seed(0)
    token_mask = torch.rand(3, L, 6 + new, generator=g) > 0.3
    routes = random_routes(ex.fingerprint, 3, random.Random(5))
    kw = dict(max_new_tokens=new, output_logits=True, token_mask=token_mask)
    cached = ex.generate(ids, mask, routes, **kw)
    plain = ex.generate(ids, mask, routes, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert_logits_close(cached.logits, plain.logits)
    # the mask matters: all-true equals no mask, and a sparse mask differs
    full = ex(ids, mask, routes, token_mask=torch.ones(3, L, 6, dtype=torch.bool)).logits
    assert torch.equal(full, ex(ids, mask, routes).logits)
    assert (ex(ids, mask, routes, token_mask=token_mask[..., :6]).logits - full).abs().max() > 1e-3


def test_token_mask_passes_tokens_through_unchanged():
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    ids = torch.randint(1, 90, (1, 6))
    tm = torch.zeros(1, ex.num_layers, 6, dtype=torch.bool)
    out = ex(ids, token_mask=tm, output_hidden_states=True)
    # every token skips every block: the state never leaves the embeddings
    assert all(torch.equal(h, out.hidden_states[0]) for h in out.hidden_states)


def test_prefix_state_reuse_equals_full_route():
    model = tiny_model("qwen2")
    ex = RouteExecutor(model)
    ids, mask = padded_batch(model.config.vocab_size, [9, 6], 9, seed=6)
    prefix = ex.advance(ex.begin(ids, mask), [0, 1, 1])
    suffixes = [[2, 4], [3], []]
    for suffix in suffixes:
        via_prefix = ex.finish(ex.advance(prefix, suffix))
        full = ex(ids, mask, routes=Route(tuple([0, 1, 1] + suffix), ex.fingerprint)).logits
        assert (via_prefix - full).abs().max().item() <= 1e-6
    # several nodes' states stacked into one batch and advanced per row
    stacked = type(prefix).concat([prefix, prefix])
    out = ex.finish(ex.advance(stacked, [[2, 4], [2, 4], [3], [3]]))
    assert (out[2:] - ex.finish(ex.advance(prefix, [3]))).abs().max().item() <= 1e-6
    assert (out[:1] - ex.finish(ex.advance(prefix.select([0]), [2, 4]))).abs().max().item() <= 1e-6


def test_hidden_states_follow_each_samples_chain():
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    ids = torch.randint(1, 90, (2, 5))
    fp = ex.fingerprint
    out = ex(ids, routes=[Route((0, 1, 2, 3, 4), fp), Route((4,), fp)], output_hidden_states=True)
    assert len(out.hidden_states) == 6
    single = ex(ids[1:], routes=Route((4,), fp), output_hidden_states=True).hidden_states
    assert (out.hidden_states[5][1] - single[1][0]).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_smollm2_identity_matches_hf_and_cached_generation(smollm):
    model, tok, ex = smollm
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "One, two, three,"], return_tensors="pt", padding=True)
    ref = hf_logits(model, batch.input_ids, batch.attention_mask)
    out = ex(batch.input_ids, batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert (out[real] - ref[real]).abs().max().item() <= 1e-5
    routes = random_routes(ex.fingerprint, 2, random.Random(0))
    kw = dict(max_new_tokens=6, output_logits=True)
    cached = ex.generate(batch.input_ids, batch.attention_mask, routes, **kw)
    plain = ex.generate(batch.input_ids, batch.attention_mask, routes, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert_logits_close(cached.logits, plain.logits)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_long_context_cached_generation_equals_recomputation(dtype, rel):
    """520-token prompts: fp32 rounding moves logits relative to their scale; fp64 agrees tightly."""
    model = tiny_model("llama", max_position_embeddings=1024).to(dtype)
    ex = RouteExecutor(model)
    ids, mask = padded_batch(model.config.vocab_size, [520, 400], 520, seed=7)
    kw = dict(max_new_tokens=4, output_logits=True)
    for routes in (None, ["repeat:1+skip:3", "chain:4,0,1"]):
        cached = ex.generate(ids, mask, routes, **kw)
        plain = ex.generate(ids, mask, routes, use_cache=False, **kw)
        assert torch.equal(cached.sequences, plain.sequences)
        assert_logits_close(cached.logits, plain.logits, rel=rel)


def test_self_check_runs_once_per_model():
    model = tiny_model("llama")
    first = RouteExecutor(model).check
    assert RouteExecutor(model).check is first  # cached: building executors stays cheap
    assert "passed: the identity route equals the HF forward" in first.describe()
    assert RouteExecutor(model, verify=False).check is None


def test_api_refuses_inputs_it_cannot_run():
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    ids = torch.randint(1, 90, (2, 4))
    bad_calls = [
        ("has shape \\(1, 0\\)", lambda: ex(torch.zeros(1, 0, dtype=torch.long))),
        ("has shape \\(0, 3\\)", lambda: ex(torch.zeros(0, 3, dtype=torch.long))),
        ("integer token ids", lambda: ex(ids.float())),
        ("token id 96 is outside the model's vocabulary of 96", lambda: ex(torch.full_like(ids, 96))),
        ("token id -1 is outside", lambda: ex(torch.full_like(ids, -1))),
        ("sample 1 of the batch has no tokens", lambda: ex(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))),
        ("max_new_tokens must be a positive integer, got 0",
         lambda: ex.generate(ids, max_new_tokens=0, output_logits=True)),
        ("max_new_tokens must be a positive integer, got -1", lambda: ex.generate(ids, max_new_tokens=-1)),
        ("temperature must be a positive finite number", lambda: ex.generate(ids, do_sample=True, temperature=0)),
        ("top_p must be in \\(0, 1\\]", lambda: ex.generate(ids, do_sample=True, top_p=1.5)),
        ("top_k must be a non-negative integer", lambda: ex.generate(ids, do_sample=True, top_k=-1)),
        ("has shape \\(1, 0\\)", lambda: ex.generate(torch.zeros(1, 0, dtype=torch.long))),
        ("has shape \\(1, 0\\)", lambda: ex.begin(torch.zeros(1, 0, dtype=torch.long))),
    ]
    for message, call in bad_calls:
        with pytest.raises(InputError, match=message):
            call()
    assert issubclass(InputError, LayerRouteError)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_check_in_half_precision_passes_and_still_catches_scaling(dtype, monkeypatch):
    from layerroute import NotExactError

    assert RouteExecutor(tiny_model("gemma2").to(dtype)).check.passed
    monkeypatch.setattr("layerroute.stack._scales", lambda *a: {})
    with pytest.raises(NotExactError, match="GraniteForCausalLM failed"):
        RouteExecutor(tiny_model("granite").to(dtype))
