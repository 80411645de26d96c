"""Token-sparse execution (``layerroute.sparse``) against its references.

* kv-kept against the dense ``token_mask`` path (the executor's ``token_rule="dense"``):
  prefill, cached decoding and packed rows.
* absent against ``absent_reference``: each row alone, and at each block the model's own layer
  run on that row's executed tokens only (the skipped ones removed from the sequence).
* cached decoding against recomputation for both rules, with different masks per row.
* the blocks really run on executed tokens only (counted at the MLP), and bad input is refused.
"""

import random

import pytest
import torch
import transformers as tf

from layerroute import InputError, Route, RouteError, RouteExecutor
from layerroute.errors import UnsupportedModelError
from layerroute.sparse import KV_FAMILIES

from .conftest import FAMILIES, TINY, assert_logits_close, padded_batch, tiny_model
from .test_executor import REFERENCE_OVERRIDES, random_routes


def random_mask(batch, layers, tokens, seed, p=0.45):
    """Random per-row masks, with some whole (row, block) pairs skipped and some fully executed."""
    g = torch.Generator().manual_seed(seed)
    tm = torch.rand(batch, layers, tokens, generator=g) > p
    tm[0, 1] = False
    tm[-1, 2] = True
    return tm


def model_for(family):
    return tiny_model(family, **REFERENCE_OVERRIDES.get(family, {}))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_kept_equals_dense_token_mask_prefill(family):
    model = model_for(family)
    ex = RouteExecutor(model)
    lengths = [11, 6, 11, 8]
    ids, mask = padded_batch(model.config.vocab_size, lengths, 11, seed=3)
    tm = random_mask(4, ex.num_layers, 11, seed=1)
    routes = random_routes(ex.fingerprint, 4, random.Random(2))  # skips, repeats, reorders: row subsets per step
    for r in (None, routes):
        dense = ex(ids, mask, r, token_mask=tm).logits
        sparse = ex(ids, mask, r, token_mask=tm, token_rule="kv-kept").logits
        real = mask.bool()
        assert_logits_close(sparse[real], dense[real])
    # the guard: the mask changes the result, so the comparison above is not vacuous
    assert (dense[real] - ex(ids, mask, routes).logits[real]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3", "phi3", "cohere"])
def test_kv_kept_cached_decoding_equals_dense_and_recomputation(family):
    model = model_for(family)
    ex = RouteExecutor(model)
    new = 7
    ids, mask = padded_batch(model.config.vocab_size, [7, 4, 7, 2], 7, seed=4)
    tm = random_mask(4, ex.num_layers, 7 + new, seed=2)
    tm[1, 3, 7:] = False  # a row that skips a block at every decoded token
    routes = random_routes(ex.fingerprint, 4, random.Random(5))
    kw = dict(max_new_tokens=new, output_logits=True, token_mask=tm)
    dense = ex.generate(ids, mask, routes, **kw)
    cached = ex.generate(ids, mask, routes, token_rule="kv-kept", **kw)
    plain = ex.generate(ids, mask, routes, token_rule="kv-kept", use_cache=False, **kw)
    assert torch.equal(cached.sequences, dense.sequences) and torch.equal(cached.sequences, plain.sequences)
    assert_logits_close(cached.logits, dense.logits)
    assert_logits_close(cached.logits, plain.logits)


def packed_rows(vocab, seed=0):
    """Two rows, each a 4-token prefix and two continuations (segments 1, 2), left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask, seg


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_packed_rows_equal_separate_rows_for_both_rules(family):
    """kv-kept packed equals dense packed; both rules' packed rows equal each continuation in
    its own row (prefix + continuation) with the same token masks."""
    model = model_for(family)
    ex = RouteExecutor(model)
    L = ex.num_layers
    ids, mask, seg = packed_rows(model.config.vocab_size)
    tm = random_mask(2, L, 12, seed=3)
    chains = [(0, 1, 2, 3, 4), (0, 2, 2, 4)]
    for rule in ("kv-kept", "absent"):
        packed = ex.finish(ex.advance(ex.begin(ids, mask, segments=seg), chains, token_mask=tm, token_rule=rule))
        if rule == "kv-kept":
            dense = ex.finish(ex.advance(ex.begin(ids, mask, segments=seg), chains, token_mask=tm))
            real = mask.bool()
            assert_logits_close(packed[real], dense[real])
        for b in range(2):
            real = mask[b].bool()
            for k in (1, 2):
                cols = (real & ((seg[b] == 0) | (seg[b] == k))).nonzero().flatten()
                alone = ex(ids[b:b + 1, cols], routes=Route(chains[b], ex.fingerprint),
                           token_mask=tm[b:b + 1, :, cols], token_rule=rule).logits[0]
                mine = (seg[b, cols] == k)
                assert_logits_close(packed[b, cols[mine]], alone[mine])


def absent_reference(ex, ids, chain, tm):
    """One unpadded row [1, T] along ``chain``: at block l, the layer runs on the tokens with
    ``tm[l]`` True only, as a shorter sequence that keeps their positions; a window counts
    sequence columns. Independent of ``layerroute.sparse`` (no gathers of masks or caches)."""
    st = ex.stack
    T = ids.shape[1]
    h = st.embed(ids)
    if st.embed_multiplier is not None:
        h = h * st.embed_multiplier
    pos = torch.arange(T)[None]
    for layer in chain:
        keep = tm[layer, :T].nonzero().flatten()
        if not keep.numel():
            continue
        x = h[:, keep]
        p = pos[:, keep]
        pe = st.rotary(x, p, st.layer_types[layer]) if st.rotary_takes_layer_type else st.rotary(x, p)
        c = keep
        allowed = c[None, :] <= c[:, None]
        if st.windows[layer] is not None:
            allowed = allowed & (c[None, :] > c[:, None] - st.windows[layer])
        m = allowed[None, None]
        if st.attn_implementation != "sdpa":
            m = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
        out = st.layers[layer](x, attention_mask=m, position_ids=p, position_embeddings=pe, cache=None,
                               use_cache=False)
        out = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, keep] = out
    from layerroute.executor import RouteState

    return ex.finish(RouteState(h, torch.ones(1, T, dtype=torch.bool), pos, 0, {}, {}))[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "granite", "cohere"])
def test_absent_equals_the_layer_run_on_executed_tokens_only(family):
    model = model_for(family)
    ex = RouteExecutor(model)
    lengths = [11, 6, 11, 8]  # sliding windows of 5 or 6 are shorter than most prompts
    ids, mask = padded_batch(model.config.vocab_size, lengths, 11, seed=6)
    tm = random_mask(4, ex.num_layers, 11, seed=4)
    chains = [(0, 1, 2, 3, 4), (0, 2, 4), (0, 1, 1, 3, 4), (4, 1, 2)]
    out = ex(ids, mask, [Route(c, ex.fingerprint) for c in chains], token_mask=tm, token_rule="absent").logits
    kv_kept = ex(ids, mask, [Route(c, ex.fingerprint) for c in chains], token_mask=tm).logits
    for b, n in enumerate(lengths):
        ref = absent_reference(ex, ids[b:b + 1, -n:], chains[b], tm[b, :, -n:])
        assert_logits_close(out[b, -n:], ref)
        assert (ref - kv_kept[b, -n:]).abs().max() > 1e-3  # the rules differ: the reference is not kv-kept


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3", "phi3"])
def test_absent_cached_decoding_equals_recomputation(family):
    model = model_for(family)
    ex = RouteExecutor(model)
    new = 7
    ids, mask = padded_batch(model.config.vocab_size, [7, 4, 7, 2], 7, seed=7)
    tm = random_mask(4, ex.num_layers, 7 + new, seed=5)
    tm[2, 1, 7:] = False
    routes = random_routes(ex.fingerprint, 4, random.Random(6))
    kw = dict(max_new_tokens=new, output_logits=True, token_mask=tm, token_rule="absent")
    cached = ex.generate(ids, mask, routes, **kw)
    plain = ex.generate(ids, mask, routes, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert_logits_close(cached.logits, plain.logits)
    # and each row decodes as it does alone (its own reference, unpadded)
    for b, n in enumerate([7, 4, 7, 2]):
        cols = torch.cat([torch.arange(7 - n, 7), torch.arange(7, 7 + new)])
        alone = ex.generate(ids[b:b + 1, 7 - n:], routes=routes[b], max_new_tokens=new, output_logits=True,
                            token_mask=tm[b:b + 1, :, cols], token_rule="absent")
        assert_logits_close(alone.logits[0], cached.logits[b])


def test_all_true_mask_equals_no_mask_for_both_rules():
    model = tiny_model("qwen2")
    ex = RouteExecutor(model)
    ids, mask = padded_batch(model.config.vocab_size, [9, 5], 9, seed=1)
    full = torch.ones(2, ex.num_layers, 9, dtype=torch.bool)
    base = ex(ids, mask, "repeat:1").logits
    real = mask.bool()
    for rule in ("kv-kept", "absent"):
        assert_logits_close(ex(ids, mask, "repeat:1", token_mask=full, token_rule=rule).logits[real], base[real])


def test_blocks_run_on_executed_tokens_only():
    """Count the tokens each block's MLP and query projection see: the executed ones (rows are
    padded to the longest row of the block), not the whole batch."""
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    L = ex.num_layers
    seen = {"mlp": 0, "q": 0, "k": 0}
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", seen["mlp"] + i[0].shape[:-1].numel())))
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", seen["q"] + i[0].shape[:-1].numel())))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", seen["k"] + i[0].shape[:-1].numel())))
    try:
        ids = torch.randint(1, 90, (2, 8))
        tm = torch.zeros(2, L, 8, dtype=torch.bool)
        tm[:, :, ::4] = True  # 2 of 8 tokens per row and block, equal counts: no padding
        tm[1, 3] = False  # row 1 skips block 3 entirely
        executed = int(tm.sum())
        for rule, k_tokens in (("kv-kept", 2 * L * 8), ("absent", executed)):
            seen.update(mlp=0, q=0, k=0)
            ex(ids, token_mask=tm, token_rule=rule)
            assert seen["mlp"] == seen["q"] == executed
            assert seen["k"] == k_tokens  # kv-kept: every token's keys; absent: executed tokens' only
        seen.update(mlp=0, q=0, k=0)
        ex(ids, token_mask=tm)  # the dense reference runs every block on every token
        assert seen["mlp"] == 2 * L * 8
    finally:
        for h in hooks:
            h.remove()


def test_bad_token_masks_and_rules_get_one_clear_error():
    model = tiny_model("llama")
    ex = RouteExecutor(model)
    ids = torch.randint(1, 90, (2, 6))
    L = ex.num_layers
    good = torch.ones(2, L, 6, dtype=torch.bool)
    with pytest.raises(InputError, match="token_mask must be a bool tensor .* got dtype torch.float32"):
        ex(ids, token_mask=good.float() * 0.7, token_rule="kv-kept")
    with pytest.raises(InputError, match="must hold only 0 and 1"):
        ex(ids, token_mask=good.long() * 2)
    assert torch.equal(ex(ids, token_mask=good.long(), token_rule="absent").logits,
                       ex(ids, token_mask=good, token_rule="absent").logits)  # 0/1 integers are accepted
    with pytest.raises(RouteError, match="token_mask must be \\[batch=2, layers=5, tokens>=6\\]"):
        ex(ids, token_mask=good[:, :3], token_rule="kv-kept")
    with pytest.raises(InputError, match="token_rule must be one of dense, kv-kept, absent; got 'sparse'"):
        ex(ids, token_mask=good, token_rule="sparse")
    with pytest.raises(InputError, match="token_rule must be one of"):
        ex.generate(ids, max_new_tokens=2, token_rule="mod")
    with pytest.raises(InputError, match="got dtype torch.float32"):
        ex.generate(ids, max_new_tokens=2, token_mask=torch.ones(2, L, 8), token_rule="absent")
    # a cache keeps the rule's layout it was prefilled with
    pre = ex(ids, token_mask=good, token_rule="absent", use_cache=True)
    with pytest.raises(RouteError, match="filled under the 'absent' token rule and cannot continue under 'kv-kept'"):
        ex(ids[:, :1], torch.ones(2, 7), token_mask=torch.ones(2, L, 7, dtype=torch.bool), cache=pre.cache,
           token_rule="kv-kept")
    with pytest.raises(RouteError, match="filled under the 'absent' token rule"):
        ex(ids[:, :1], torch.ones(2, 7), cache=pre.cache)


def test_kv_kept_refuses_a_family_without_projections_and_absent_runs_it():
    """OLMo2 normalises after attention (no input norm) and its key norm spans all heads: the
    executor runs it, kv-kept refuses it by name, absent needs nothing of the family."""
    torch.manual_seed(0)
    model = tf.Olmo2ForCausalLM(tf.Olmo2Config(**TINY)).eval().requires_grad_(False)
    assert "olmo2" not in KV_FAMILIES
    ex = RouteExecutor(model)
    ids = torch.randint(1, 90, (1, 7))
    tm = random_mask(1, ex.num_layers, 7, seed=8)
    with pytest.raises(UnsupportedModelError, match="kv-kept token rule .* not for olmo2 \\(Olmo2DecoderLayer\\); "
                                                    "use token_rule='absent'"):
        ex(ids, token_mask=tm, token_rule="kv-kept")
    assert_logits_close(ex(ids, token_mask=tm, token_rule="absent").logits[0],
                        absent_reference(ex, ids, tuple(range(ex.num_layers)), tm[0]))


@pytest.mark.slow
def test_smollm2_sparse_rules_are_exact(smollm):
    model, tok, ex = smollm
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "One, two, three, four,", "Water boils at"], return_tensors="pt",
                padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    new = 5
    tm = random_mask(3, ex.num_layers, ids.shape[1] + new, seed=9, p=0.5)
    tm[:, :2] = True  # blocks 0 and 1 are never safe to skip on this model
    kw = dict(max_new_tokens=new, output_logits=True, token_mask=tm)
    dense = ex.generate(ids, mask, **kw)
    kv = ex.generate(ids, mask, token_rule="kv-kept", **kw)
    assert torch.equal(kv.sequences, dense.sequences)
    assert_logits_close(kv.logits, dense.logits)
    absent = ex.generate(ids, mask, token_rule="absent", **kw)
    plain = ex.generate(ids, mask, token_rule="absent", use_cache=False, **kw)
    assert torch.equal(absent.sequences, plain.sequences)
    assert_logits_close(absent.logits, plain.logits)
