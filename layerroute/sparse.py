"""Token-sparse blocks: a decoder layer runs on the tokens that execute it, and only on those.

``token_mask[b, layer, t]`` False means token ``t`` of row ``b`` skips block ``layer``. Two
rules say what a skipped token still is at that block (``TOKEN_RULES``):

* ``kv-kept`` (FlexiDepth): the token passes the block unchanged, but its keys and values at
  the block are computed from its incoming state, cached, and attended by the other tokens.
  Its query, attention output, residual and MLP are not computed. The executor's dense
  ``token_mask`` path (``token_rule="dense"``) computes the same result by running the block on
  every token and discarding the skipped ones; it is the reference this rule is tested against.
  A skipped (token, block) pair costs the input norm and the K/V projections.
* ``absent`` (Mixture-of-Depths): the token is not in the block at all. It has no keys or
  values there, and no token attends to it at that block. A skipped pair costs nothing.

How a block runs (``sparse_block``): the executed tokens of each row are gathered (rows with
none are left out, ragged rows are padded to the longest), with their positions, rotary
tables and rows of the attention mask, and the model's own decoder layer runs on them. Its
attention writes K/V through the cache interface; ``_GatheredSlot`` puts them where they
belong: kv-kept merges them with the skipped tokens' K/V (computed here, per family, by
``kv_projector``) in sequence order, so the slot looks exactly like a dense one; absent stores
only executed tokens, with the column each came from (``RouteKVCache.columns``, -1 for
padding), and masks keys by those columns. The outputs are scattered back. Masks always count
columns of the original sequence, so causality, padding, sliding windows and packed segments
mean what they mean in the dense walk.

kv-kept needs each family's K/V projections (``KV_FAMILIES``); any other family is refused with
its name. absent works on every family the executor runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError, UnsupportedModelError

DENSE, KV_KEPT, ABSENT = "dense", "kv-kept", "absent"
TOKEN_RULES = (DENSE, KV_KEPT, ABSENT)
# Families whose skipped-token K/V ``kv_projector`` computes (the transformers module name).
KV_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite", "cohere",
               "olmo", "starcoder2", "helium", "ministral", "arcee")


def check_rule(rule) -> str:
    """The rule name, or ``InputError`` naming the rules."""
    if rule not in TOKEN_RULES:
        raise InputError(f"token_rule must be one of {', '.join(TOKEN_RULES)}; got {rule!r}")
    return rule


def layer_family(layer: torch.nn.Module) -> str:
    """The transformers family of a decoder layer (``llama`` for ``transformers.models.llama``)."""
    return type(layer).__module__.rsplit(".", 1)[-1].removeprefix("modeling_")


def check_token_mask(token_mask) -> None:
    """A token mask must be a bool tensor (or integer 0/1); anything else is one ``InputError``."""
    if not isinstance(token_mask, torch.Tensor):
        raise InputError(f"token_mask must be a bool tensor [batch, layers, tokens], got {type(token_mask).__name__}")
    if token_mask.dtype == torch.bool:
        return
    if token_mask.dtype.is_floating_point or token_mask.dtype.is_complex:
        raise InputError(f"token_mask must be a bool tensor (True: the token executes the block), got dtype "
                         f"{token_mask.dtype}; threshold probabilities first (probs > 0.5)")
    if token_mask.numel() and not bool(((token_mask == 0) | (token_mask == 1)).all()):
        raise InputError(f"token_mask of dtype {token_mask.dtype} must hold only 0 and 1")


def kv_projector(layer: torch.nn.Module):
    """``f(x [N, H], cos [N, r], sin [N, r]) -> (k, v)``, each [N, kv_heads, head_dim]: the keys
    (after the family's key norm and rotary) and values that ``layer``'s attention computes for
    tokens with incoming states ``x``. Raises ``UnsupportedModelError`` for other families."""
    family = layer_family(layer)
    if family not in KV_FAMILIES:
        raise UnsupportedModelError(
            f"the kv-kept token rule needs the attention projections of each family and layerroute has them for "
            f"{', '.join(KV_FAMILIES)}, not for {family} ({type(layer).__name__}); use token_rule='absent' "
            f"(any family) or 'dense'")
    attn = layer.self_attn
    d = attn.head_dim
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    k_norm = getattr(attn, "k_norm", None) if getattr(attn, "use_qk_norm", True) else None
    fused = getattr(attn, "qkv_proj", None)  # phi3: one projection, rows q | k | v
    if fused is not None:
        nq = attn.config.num_attention_heads * d
        weight = fused.weight[nq:]
        bias = None if fused.bias is None else fused.bias[nq:]
    clip = getattr(attn.config, "clip_qkv", None)  # olmo

    def project(x, cos, sin):
        xn = layer.input_layernorm(x)
        if fused is not None:
            k, v = F.linear(xn, weight, bias).chunk(2, dim=-1)
        else:
            k, v = attn.k_proj(xn), attn.v_proj(xn)
        if clip is not None:
            k, v = k.clamp(-clip, clip), v.clamp(-clip, clip)
        k, v = k.reshape(x.shape[0], -1, d), v.reshape(x.shape[0], -1, d)  # [N, kvh, d]
        if k_norm is not None:
            k = k_norm(k)
        k, _ = rope(k, k[:, :1], cos, sin, unsqueeze_dim=1)
        return k, v

    return project


def bool_mask(mask: torch.Tensor | None, build) -> torch.Tensor:
    """The [B, 1, q, past + q] mask as bool (True: may attend); ``build()`` makes it where the
    walk keeps None (sdpa's own causal path)."""
    if mask is None:
        return build()
    return mask if mask.dtype == torch.bool else mask == 0


class _GatheredSlot:
    """The cache the layer's attention sees while it runs on gathered tokens: ``update`` gets
    the executed tokens' K/V [A, kvh, n, d] and returns every key of the active rows."""

    def __init__(self, merge):
        self.merge = merge

    def update(self, key_states, value_states, layer_idx=None, kwargs=None, **_):
        return self.merge(key_states, value_states)


@torch.no_grad()
def sparse_block(layer: torch.nn.Module, hidden: torch.Tensor, execute: torch.Tensor, full_mask: torch.Tensor, *,
                 rule: str, attn_implementation: str, position_ids: torch.Tensor, position_embeddings,
                 past: int, cache=None, slot: int | None = None) -> torch.Tensor:
    """Run ``layer`` on the executed tokens of ``hidden`` [B, q, H] and return the new [B, q, H].

    ``execute`` [B, q] bool; ``full_mask`` [B, 1, q, past + q] bool over the sequence's columns;
    ``position_embeddings`` (cos, sin) [B or 1, q, r]. With ``cache`` (a ``RouteKVCache``),
    slot ``slot`` is read and extended under ``rule``.
    """
    B, q, H = hidden.shape
    kv = kv_projector(layer) if rule == KV_KEPT else None
    cos, sin = (t.expand(B, q, t.shape[-1]) for t in position_embeddings)
    flat_h = hidden.reshape(B * q, H)
    skipped = None
    if rule == KV_KEPT and not bool(execute.all()):
        skipped = _skipped_kv(kv, execute, flat_h, cos, sin)
    plan = _Gather.of(execute, past, hidden.device)

    def chunk(k_exec, v_exec):
        """This call's K/V for every row of the slot, [B, kvh, w, d], and their columns (absent)."""
        if rule == KV_KEPT:
            return _kv_kept_chunk(hidden, skipped, plan, k_exec, v_exec)
        return plan.absent_chunk(k_exec, v_exec)

    if plan is None:  # no token executes the block: kv-kept still writes every token's K/V
        if rule == KV_KEPT:
            _extend_slot(cache, slot, *chunk(None, None))
        return hidden
    m = _gathered_mask(plan, full_mask, rule, cache, slot, attn_implementation, hidden.dtype)

    def merge(k_exec, v_exec):
        k, v, _ = _extend_slot(cache, slot, *chunk(k_exec, v_exec))
        return plan.rows(k), plan.rows(v)

    out = layer(plan.tokens(hidden), attention_mask=m, position_ids=plan.tokens(position_ids),
                position_embeddings=(plan.tokens(cos), plan.tokens(sin)),
                cache=_GatheredSlot(merge), use_cache=True)
    out = out[0] if isinstance(out, tuple) else out
    out = out.reshape(-1, H)
    if plan.exec_sel is not None:
        out = out.index_select(0, plan.exec_sel)
    return flat_h.index_copy(0, plan.flat_exec, out).view(B, q, H)


def _skipped_kv(kv, execute: torch.Tensor, flat_h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """kv-kept: the skipped tokens' flat indices in [B * q] and their K/V [N, kvh, d], all rows
    flattened (no padding, no waste)."""
    skip_idx = (~execute).reshape(-1).nonzero().flatten()
    r = cos.shape[-1]
    k_skip, v_skip = kv(flat_h.index_select(0, skip_idx), cos.reshape(-1, r).index_select(0, skip_idx),
                        sin.reshape(-1, r).index_select(0, skip_idx))
    return skip_idx, k_skip, v_skip


@dataclass(frozen=True)
class _Gather:
    """Where a block's gathered tokens come from: the active rows (rows with an executed token;
    None: all ``B``), ``idx`` [A, n] the columns of each row's executed tokens first in sequence
    order (ragged rows padded to ``width`` = n), ``valid`` [A, n] (None: no padding),
    ``flat_exec`` their positions in the flattened [B * q] (``exec_sel`` picks the valid ones
    of [A * n]), and ``new_cols`` [A, n] the key columns they add under absent (-1: padding)."""

    B: int
    q: int
    width: int
    active: torch.Tensor | None
    idx: torch.Tensor
    valid: torch.Tensor | None
    flat_exec: torch.Tensor
    exec_sel: torch.Tensor | None
    new_cols: torch.Tensor
    device: torch.device

    @classmethod
    def of(cls, execute: torch.Tensor, past: int, dev: torch.device) -> _Gather | None:
        """The gather plan of ``execute`` [B, q] on ``dev``; None when no token executes the block."""
        B, q = execute.shape
        counts = execute.sum(1)  # [B]
        width = int(counts.max())
        if not width:
            return None
        active = None if bool((counts > 0).all()) else (counts > 0).nonzero().flatten()
        ex_a = execute if active is None else execute.index_select(0, active)
        A = ex_a.shape[0]
        if width == q and bool(ex_a.all()):
            idx, valid = torch.arange(q, device=dev).expand(A, q), None
        else:
            idx = torch.sort((~ex_a).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # [A, n]
            counts_a = counts if active is None else counts.index_select(0, active)
            valid = torch.arange(width, device=dev)[None] < counts_a[:, None]
            if bool(valid.all()):
                valid = None
        base = (torch.arange(B, device=dev) if active is None else active)[:, None] * q
        flat_exec = (base + idx).reshape(-1)  # [A * n] positions in the flattened [B * q]
        exec_sel = None if valid is None else valid.reshape(-1).nonzero().flatten()
        if exec_sel is not None:
            flat_exec = flat_exec.index_select(0, exec_sel)
        new_cols = past + idx if valid is None else torch.where(valid, past + idx, -1)
        return cls(B, q, width, active, idx, valid, flat_exec, exec_sel, new_cols, dev)

    @property
    def A(self) -> int:
        return self.idx.shape[0]

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The active rows of a [B, ...] tensor."""
        return t if self.active is None else t.index_select(0, self.active)

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The gathered tokens of a [B, q, ...] tensor: [A, n, ...]."""
        t = self.rows(t)
        if t.dim() == 2:
            return t.gather(1, self.idx)
        return t.gather(1, self.idx[..., None].expand(self.A, self.width, t.shape[-1]))

    def absent_chunk(self, k_exec: torch.Tensor, v_exec: torch.Tensor):
        """absent: the executed tokens' K/V [B, kvh, n, d] and key columns [B, n], inactive rows
        as padding (zeros, column -1)."""
        cols = self.new_cols
        if self.active is not None:
            k_exec = k_exec.new_zeros(self.B, *k_exec.shape[1:]).index_copy_(0, self.active, k_exec)
            v_exec = v_exec.new_zeros(self.B, *v_exec.shape[1:]).index_copy_(0, self.active, v_exec)
            cols = cols.new_full((self.B, self.width), -1).index_copy_(0, self.active, cols)
        return k_exec, v_exec, cols


def _kv_kept_chunk(hidden: torch.Tensor, skipped, plan: _Gather | None, k_exec, v_exec):
    """kv-kept: every token's K/V [B, kvh, q, d] in sequence order, the skipped tokens' (``skipped``
    from ``_skipped_kv``, or None) merged with the executed ones' (None when none executes)."""
    B, q = hidden.shape[:2]
    skip_idx, k_skip, v_skip = skipped if skipped is not None else (None, None, None)
    kvh, d = (k_exec.shape[1], k_exec.shape[3]) if k_exec is not None else k_skip.shape[1:]
    ks, vs = hidden.new_empty(B * q, kvh, d), hidden.new_empty(B * q, kvh, d)
    if k_skip is not None:
        ks.index_copy_(0, skip_idx, k_skip)
        vs.index_copy_(0, skip_idx, v_skip)
    if k_exec is not None:
        ke, ve = (t.transpose(1, 2).reshape(-1, kvh, d) for t in (k_exec, v_exec))
        if plan.exec_sel is not None:
            ke, ve = ke.index_select(0, plan.exec_sel), ve.index_select(0, plan.exec_sel)
        ks.index_copy_(0, plan.flat_exec, ke)
        vs.index_copy_(0, plan.flat_exec, ve)
    return ks.view(B, q, kvh, d).transpose(1, 2), vs.view(B, q, kvh, d).transpose(1, 2), None


def _extend_slot(cache, slot: int | None, ck: torch.Tensor, cv: torch.Tensor, ccols: torch.Tensor | None):
    """Extend the cache's slot with this call's K/V (and columns) and return the slot's whole
    K/V and columns; without a cache, this call's K/V are the whole."""
    if cache is None:
        return ck, cv, ccols
    old_k, old_v, old_c = cache.keys[slot], cache.values[slot], cache.columns[slot]
    if old_k is not None:
        ck, cv = torch.cat([old_k, ck], dim=-2), torch.cat([old_v, cv], dim=-2)
        if ccols is not None:
            ccols = torch.cat([old_c, ccols], dim=1)
    cache.keys[slot], cache.values[slot], cache.columns[slot] = ck, cv, ccols
    return ck, cv, ccols


def _gathered_mask(plan: _Gather, full_mask: torch.Tensor, rule: str, cache, slot: int | None,
                   attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask rows of the gathered queries, [A, 1, n, past + q]; absent also selects its keys by
    column, [A, 1, n, S]. Bool for sdpa, additive float otherwise."""
    A, width, idx, dev = plan.A, plan.width, plan.idx, plan.device
    m = plan.rows(full_mask)
    K = m.shape[-1]
    m = m.gather(2, idx[:, None, :, None].expand(A, 1, width, K))  # [A, 1, n, past + q]
    if rule == ABSENT:
        old = None if cache is None else cache.columns[slot]
        cols = plan.new_cols if old is None else torch.cat([plan.rows(old), plan.new_cols], dim=1)  # [A, S]
        S = cols.shape[1]
        m = m.gather(3, cols.clamp(min=0)[:, None, None, :].expand(A, 1, width, S)) & (cols >= 0)[:, None, None, :]
        if plan.valid is not None:  # a padding query sees itself, so that no row of the softmax is empty
            own = torch.zeros(A, 1, width, S, dtype=torch.bool, device=dev)
            own[..., S - width:] = torch.eye(width, dtype=torch.bool, device=dev) & ~plan.valid[:, None, :, None]
            m = m | own
    if attn_implementation != "sdpa":
        m = torch.zeros(m.shape, dtype=dtype, device=dev).masked_fill(~m, torch.finfo(dtype).min)
    return m
