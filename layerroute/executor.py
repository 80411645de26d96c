"""Run a frozen causal LM along per-sample routes: embed, walk the route, norm, head.

The executor calls the model's own decoder layers (the transformers 5.x layer interface) and
never copies its code. What it adds:

* **Per-sample routes in one batch.** Each sample's chain of blocks is merged into one
  schedule of steps; a step runs one block on the rows whose next block it is. Samples that
  share a route run as one full-batch call per block, so the identity route costs what the
  plain HF forward costs.
* **A KV cache with one slot per schedule step** (``RouteKVCache``). A repeated block writes
  a fresh slot on each pass, a skipped block stores nothing, and the route is fixed at
  prefill, so cached decoding equals recomputation.
* **Prefix reuse.** ``begin`` / ``advance`` / ``finish`` expose the walk: a state computed
  after a prefix of blocks can be advanced along many different suffixes.
* **Per-token routing.** ``token_mask[b, layer, t]`` False lets token ``t`` pass block
  ``layer`` unchanged (every pass, if the block repeats). The block still computes the
  token's K/V from its incoming, passed-through state, so later tokens keep attending to
  it; cached and uncached runs agree under that rule. With the default ``token_rule="dense"``
  it changes what is computed, not how much: the block runs on every token (the reference).
  ``token_rule="kv-kept"`` computes the same on the executed tokens only, and ``"absent"``
  removes skipped tokens from the block (Mixture-of-Depths); see ``layerroute.sparse``.
* **A self-check before any use.** ``RouteExecutor(model)`` runs the identity route against
  the model's own forward on a small left-padded probe, prefill and one cached step
  (``self_check``), once per model, and refuses a model that does not match (``NotExactError``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InputError, LayerRouteError, NotExactError, RouteError
from .route import Route, resolve_route
from .sparse import ABSENT, DENSE, bool_mask, check_rule, check_token_mask, sparse_block
from .stack import DecoderStack, _first_line, decoder_stack

Chains = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Step:
    """One schedule step: run ``layer`` on ``rows`` (None: every row)."""

    layer: int
    rows: torch.Tensor | None
    row_list: tuple[int, ...]


def plan_schedule(chains: Chains, device: torch.device | str = "cpu") -> list[Step]:
    """Merge per-sample chains into steps, each running one block on a subset of rows.

    At every step the block with the smallest index among the samples' next blocks runs, on
    all samples waiting for it. In-order routes therefore run layer by layer, and any
    schedule respects each sample's own order, so reordered chains are exact too.
    """
    batch = len(chains)
    if len(set(chains)) == 1:
        return [Step(layer, None, tuple(range(batch))) for layer in chains[0]]
    ptr = [0] * batch
    steps = []
    while True:
        waiting = {b: chains[b][ptr[b]] for b in range(batch) if ptr[b] < len(chains[b])}
        if not waiting:
            return steps
        layer = min(waiting.values())
        rows = tuple(b for b, nxt in waiting.items() if nxt == layer)
        for b in rows:
            ptr[b] += 1
        idx = None if len(rows) == batch else torch.tensor(rows, dtype=torch.long, device=device)
        steps.append(Step(layer, idx, rows))


class RouteKVCache:
    """Keys and values of one routed sequence batch: one slot per schedule step.

    Slot ``s`` holds K/V only for the rows that step ``s`` runs, so skipped blocks cost no
    memory and each pass of a repeated block has its own entry. The cache also keeps the
    routes it was filled with and the 2D attention mask so far.
    """

    def __init__(self, chains: Chains, schedule: list[Step]):
        self.chains = chains
        self.schedule = schedule
        self.keys: list[torch.Tensor | None] = [None] * len(schedule)
        self.values: list[torch.Tensor | None] = [None] * len(schedule)
        self.attention_mask: torch.Tensor | None = None  # [B, seq_length] bool
        self.growing = False
        # Token-sparse walks (``layerroute.sparse``): the rule the cache was filled under, and per slot
        # the sequence column of each stored key under the absent rule ([B, S], -1: padding).
        self.token_rule: str | None = None
        self.columns: list[torch.Tensor | None] = [None] * len(schedule)

    @property
    def seq_length(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def slot(self, index: int) -> _SlotView:
        return _SlotView(self, index)

    @classmethod
    def open(cls, batch: int) -> RouteKVCache:
        """An empty cache that a block-by-block walk fills (``advance(..., cache=c, grow=True)``)
        before the routes are known; ``close`` then fixes its routes."""
        cache = cls(((),) * batch, [])
        cache.growing = True
        return cache

    def grow(self, schedule: list[Step], attention_mask: torch.Tensor) -> int:
        """Append empty slots for ``schedule``'s steps to a growing cache and return the first's index."""
        first = len(self.schedule)
        self.schedule += schedule
        self.keys += [None] * len(schedule)
        self.values += [None] * len(schedule)
        self.columns += [None] * len(schedule)
        self.attention_mask = attention_mask
        return first

    def close(self, chains: Chains) -> RouteKVCache:
        """Fix the routes of a walked cache; its steps must be the ones ``plan_schedule`` gives for
        ``chains``, so that decoding continues exactly as after a one-call prefill."""
        planned = plan_schedule(chains)
        if [(s.layer, s.row_list) for s in planned] != [(s.layer, s.row_list) for s in self.schedule]:
            raise RouteError("the walked cache's steps differ from the schedule of its routes; "
                             "prefill along the routes instead")
        self.chains, self.growing = chains, False
        return self


class _SlotView:
    """What a layer's attention sees as its cache: ``update`` writes the step's own slot."""

    def __init__(self, cache: RouteKVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, key_states, value_states, layer_idx=None, kwargs=None, **_):
        c, i = self.cache, self.index
        if c.keys[i] is not None:
            key_states = torch.cat([c.keys[i], key_states], dim=-2)
            value_states = torch.cat([c.values[i], value_states], dim=-2)
        c.keys[i], c.values[i] = key_states, value_states
        return key_states, value_states


@dataclass
class RouteState:
    """Hidden states part-way along a route, with the context every block needs.

    ``hidden`` is [B, T, H] for the T tokens of this call; ``attention_mask`` is [B, past + T]
    (bool). Produced by ``RouteExecutor.begin`` and ``advance``; states never change in place.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    past: int
    position_embeddings: dict = field(repr=False)
    masks: dict = field(repr=False)

    def select(self, rows: Sequence[int] | torch.Tensor) -> RouteState:
        """The state of a subset of rows (for example one MCTS node of a batch)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        return RouteState(
            self.hidden.index_select(0, idx), self.attention_mask.index_select(0, idx),
            self.position_ids.index_select(0, idx), self.past,
            {k: tuple(t.index_select(0, idx) for t in v) for k, v in self.position_embeddings.items()},
            {k: None if m is None else m.index_select(0, idx) for k, m in self.masks.items()},
        )

    @staticmethod
    def concat(states: Sequence[RouteState]) -> RouteState:
        """Stack states of the same length along the batch (to advance them in one call)."""
        first = states[0]
        if any(s.hidden.shape[1] != first.hidden.shape[1] or s.past != first.past for s in states):
            raise RouteError("states to concatenate must cover the same tokens")
        masks = {}
        for k in first.masks:
            parts = [s.masks[k] for s in states]
            masks[k] = None if all(m is None for m in parts) else torch.cat(
                [m if m is not None else _expand_none_mask(s, k) for m, s in zip(parts, states)])
        return RouteState(
            torch.cat([s.hidden for s in states]), torch.cat([s.attention_mask for s in states]),
            torch.cat([s.position_ids for s in states]), first.past,
            {k: tuple(torch.cat([s.position_embeddings[k][j] for s in states]) for j in range(2))
             for k in first.position_embeddings},
            masks,
        )


def _expand_none_mask(state: RouteState, window) -> torch.Tensor:
    return _build_mask(state.attention_mask, state.past, state.hidden.shape[1], window, "sdpa",
                       state.hidden.dtype, allow_none=False)


def _segment_positions(attn: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Positions of packed rows: the prefix (segment 0) counts from 0, each other segment from
    the end of the prefix; padding gets 1, as ``begin`` gives it."""
    shared = attn & (segments == 0)
    pos = shared.long().cumsum(-1) - 1
    start = shared.sum(-1, keepdim=True)
    for k in segments[attn & (segments > 0)].unique().tolist():
        mine = attn & (segments == k)
        pos = torch.where(mine, start + mine.long().cumsum(-1) - 1, pos)
    return pos.masked_fill(~attn, 1)


def _build_mask(attn: torch.Tensor, past: int, q: int, window: int | None, impl: str, dtype, allow_none=True,
                segments: torch.Tensor | None = None, positions: torch.Tensor | None = None):
    """[B, 1, q, past+q] attention mask (bool for sdpa, additive float for eager), or None
    where sdpa's own causal path is exact (no padding, no active window). With ``segments``
    (see ``RouteExecutor.begin``), a token sees the prefix and its own segment only, and the
    window counts ``positions``."""
    kv = attn.shape[1]
    if allow_none and segments is None and impl == "sdpa" and (past == 0 or q == 1) \
            and (window is None or kv <= window) and bool(attn.all()):
        return None
    q_idx = torch.arange(past, past + q, device=attn.device)[:, None]
    k_idx = torch.arange(kv, device=attn.device)[None, :]
    allowed = (k_idx <= q_idx)[None]
    if segments is not None:
        allowed = allowed & ((segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None]))
        if window is not None:
            allowed = allowed & (positions[:, None, :] > positions[:, :, None] - window)
    elif window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    allowed = (allowed[:, None] & attn[:, None, None, :]) | (k_idx == q_idx)  # pad rows see themselves
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=attn.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class RoutedOutput:
    """``logits`` [B, T or logits_to_keep, V]; ``hidden_states[j]`` [B, T, H] is each sample's
    state after its own j-th block (0: embeddings; shorter chains repeat their last state)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: RouteKVCache | None = None


@dataclass
class Generation:
    """``sequences`` [B, T + new]; ``logits`` [B, new, V] when asked for."""

    sequences: torch.Tensor
    logits: torch.Tensor | None = None


class RouteExecutor:
    """Runs a frozen HF causal LM along routes. See the module docstring."""

    def __init__(self, model: torch.nn.Module, *, verify: bool = True):
        """``verify=False`` skips the exactness self-check (``self_check``); only for a model
        already checked, since an unchecked model may run silently wrong."""
        self.model = model
        self.stack: DecoderStack = decoder_stack(model)
        self.fingerprint = self.stack.fingerprint
        self.check: SelfCheck | None = None
        if verify:
            self.check = self_check(self)
            if not self.check.passed:
                raise NotExactError(f"{type(model).__name__} failed layerroute's exactness self-check, so routes on "
                                    f"it would be silently wrong: {self.check.problem}")

    @property
    def device(self) -> torch.device:
        return self.stack.embed.weight.device

    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    def route(self, spec: str | Route | None = None) -> Route:
        """A Route for this model from a spec, a JSON path, a Route, or None (identity)."""
        return resolve_route(spec, self.fingerprint)

    # ---- the walk ---------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, past: int = 0,
              segments: torch.Tensor | None = None) -> RouteState:
        """Embed ``input_ids`` [B, T] and build the masks and rotary embeddings once.

        ``attention_mask`` covers ``past + T`` columns (1 = token, 0 = padding). Positions
        default to the count of real tokens before each one, as ``generate`` assigns them.

        ``segments`` [B, T] packs several continuations of one shared prefix into one row
        (no ``past``): tokens of segment 0 are the prefix, tokens of segment k > 0 see the prefix
        and the earlier tokens of segment k only, and are positioned right after the prefix,
        so each continuation is computed exactly as in its own row (``pack_continuations``).
        """
        if input_ids.dim() != 2:
            raise RouteError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        batch, q = input_ids.shape
        self._check_ids(input_ids)
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + q, dtype=torch.bool, device=device)
        attention_mask = attention_mask.to(device).bool()
        if attention_mask.shape != (batch, past + q):
            raise RouteError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, past + q)}")
        empty = (~attention_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise InputError(f"sample {empty[0]} of the batch has no tokens (its attention_mask row is all zeros)")
        if segments is not None:
            if past or segments.shape != (batch, q):
                raise RouteError(f"segments must be [batch, tokens] = {(batch, q)} with no past, "
                                 f"got {tuple(segments.shape)} and past {past}")
            segments = segments.to(device)
            position_ids = _segment_positions(attention_mask, segments)
        elif position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            position_ids = position_ids.masked_fill(~attention_mask[:, past:], 1)
        position_ids = position_ids.to(device).expand(batch, q)
        hidden = self.stack.embed(input_ids)  # [B, T, H]
        st = self.stack
        if st.embed_multiplier is not None:
            hidden = hidden * st.embed_multiplier
        if st.rotary_takes_layer_type:
            pe = {t: st.rotary(hidden, position_ids, t) for t in set(st.layer_types)}
        else:
            pe = {"*": st.rotary(hidden, position_ids)}
        masks = {w: _build_mask(attention_mask, past, q, w, st.attn_implementation, hidden.dtype,
                                segments=segments, positions=position_ids if segments is not None else None)
                 for w in set(st.windows)}
        return RouteState(hidden, attention_mask, position_ids, past, pe, masks)

    @torch.no_grad()
    def advance(self, state: RouteState, chains, *, token_mask: torch.Tensor | None = None,
                cache: RouteKVCache | None = None, record: list | None = None,
                token_rule: str = DENSE) -> RouteState:
        """Run ``chains`` (one chain of block indices for all rows, or one per row; a chain
        may be empty) from ``state`` and return the new state.

        With ``cache``, each schedule step reads and extends its own KV slot; a growing cache
        (``RouteKVCache.open``) gets new slots for ``chains``' steps. ``record``, a list of
        per-row lists, collects each row's state after each of its blocks.

        ``token_rule`` says how ``token_mask`` runs (``layerroute.sparse``): ``"dense"`` runs each
        block on every token and keeps the executed tokens' results; ``"kv-kept"`` computes the
        same on the executed tokens only; ``"absent"`` removes skipped tokens from the block.
        ``token_mask`` may also be a callable ``(layer, hidden [rows, T, H]) -> bool [rows, T]`` that
        decides from the state entering each block (per-token routers, ``routers/token_router.py``).
        """
        check_rule(token_rule)
        chains = self._chains(chains, state.hidden.shape[0], allow_empty=True)
        if cache is not None:
            _check_cache_rule(cache, token_rule if token_mask is not None else DENSE)
        if cache is None or cache.growing:
            schedule = plan_schedule(chains, self.device)
            first = 0 if cache is None else cache.grow(schedule, state.attention_mask)
        else:
            schedule, first = cache.schedule, 0
        hidden, q, st = state.hidden, state.hidden.shape[1], self.stack
        tm = self._token_mask(token_mask, hidden.shape[0], state.past + q)
        sparse = tm is not None and token_rule != DENSE
        full_masks: dict = {}  # window -> bool mask over all columns, for the sparse blocks
        for s, step in enumerate(schedule):
            layer, rows = step.layer, step.rows
            h, pos, pe, mask = _step_inputs(st, state, hidden, step)
            if sparse:
                full = _full_mask(full_masks, state, st.windows[layer], rows, hidden.dtype)
                keep = _keep(tm, layer, h, rows, state.past, q)
                out = sparse_block(st.layers[layer], h, keep, full, rule=token_rule,
                                   attn_implementation=st.attn_implementation, position_ids=pos,
                                   position_embeddings=pe, past=state.past, cache=cache, slot=first + s)
            else:
                out = st.layers[layer](
                    h, attention_mask=mask, position_ids=pos, position_embeddings=pe,
                    cache=None if cache is None else cache.slot(first + s), use_cache=cache is not None,
                )
                out = out[0] if isinstance(out, tuple) else out
                if tm is not None:
                    out = torch.where(_keep(tm, layer, h, rows, state.past, q)[..., None], out, h)
            hidden = out if rows is None else hidden.index_copy(0, rows, out)
            if record is not None:
                for b in step.row_list:
                    record[b].append(hidden[b])
        return RouteState(hidden, state.attention_mask, state.position_ids, state.past,
                          state.position_embeddings, state.masks)

    @torch.no_grad()
    def finish(self, state: RouteState, logits_to_keep: int = 0) -> torch.Tensor:
        """Final norm and LM head: logits [B, T or logits_to_keep, V]."""
        hidden = state.hidden if not logits_to_keep else state.hidden[:, -logits_to_keep:]
        return self.head_logits(hidden)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``finish`` on a hidden tensor, with autograd left as the caller has it (router training)."""
        logits = self.stack.head(self.stack.norm(hidden))
        if self.stack.logit_divisor is not None:
            logits = logits / self.stack.logit_divisor
        if self.stack.logit_multiplier is not None:
            logits = logits * self.stack.logit_multiplier
        cap = self.stack.logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- one call ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, routes=None, *,
                position_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                cache: RouteKVCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, logits_to_keep: int = 0,
                token_rule: str = DENSE) -> RoutedOutput:
        """Logits for a padded batch where each sample may follow its own route.

        ``routes``: None (identity), one Route/spec for all, or one per sample. With a
        ``cache`` (or ``use_cache=True`` to start one), ``input_ids`` are the new tokens and
        ``attention_mask`` covers past and new tokens, as in Hugging Face models.
        ``token_mask`` [B, layers, past + T] (bool) with ``token_rule``: per-token routing (``advance``).
        """
        batch = input_ids.shape[0]
        chains = self._chains(self._routes(routes, batch), batch)
        if cache is None and use_cache:
            cache = RouteKVCache(chains, plan_schedule(chains, self.device))
        past = 0
        if cache is not None:
            if cache.chains != chains:
                raise RouteError("this cache was filled along other routes; a sequence keeps the routes it was "
                                 "prefilled with")
            past = cache.seq_length
            if attention_mask is None:
                attention_mask = torch.ones(batch, past + input_ids.shape[1], dtype=torch.bool, device=self.device)
        state = self.begin(input_ids, attention_mask, position_ids, past)
        record = [[state.hidden[b]] for b in range(batch)] if output_hidden_states else None
        state = self.advance(state, chains, token_mask=token_mask, cache=cache, record=record,
                             token_rule=token_rule)
        if cache is not None:
            cache.attention_mask = state.attention_mask
        hidden_states = None
        if record is not None:
            depth = max(len(r) for r in record)
            hidden_states = tuple(torch.stack([r[min(j, len(r) - 1)] for r in record]) for j in range(depth))
        return RoutedOutput(self.finish(state, logits_to_keep), hidden_states, cache)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, routes=None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 token_mask: torch.Tensor | None = None, use_cache: bool = True,
                 output_logits: bool = False, prefill: RoutedOutput | None = None,
                 stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 token_rule: str = DENSE) -> Generation:
        """Greedy or sampled decoding; each sample keeps its route for every new token.

        ``use_cache=False`` recomputes the whole sequence at each step (the reference that
        cached decoding must equal). With ``token_mask``, it must cover prompt and new tokens, and
        ``token_rule`` says how it runs (``advance``).
        ``prefill``: the prompt already run along ``routes`` (last-position logits and its cache,
        e.g. from a routing walk), so the prompt is not run again. ``stop``: called after each new
        token with the sequences so far [B, T + n]; rows where it returns True finish as on EOS.
        """
        _check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
        check_rule(token_rule)
        ids, mask, routes = self._generation_inputs(input_ids, attention_mask, routes, token_mask, max_new_tokens)
        batch = ids.shape[0]
        warpers = _warpers(do_sample, temperature, top_k, top_p)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        eos, pad = self._eos_and_pad(eos_token_id, pad_token_id)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        cache, step_logits, fed = None, [], ids
        if prefill is not None:
            self._check_prefill(prefill, routes, ids, use_cache, token_mask)
        for step in range(max_new_tokens):
            if step == 0 and prefill is not None:
                out = prefill
            elif use_cache:
                out = self.forward(fed, mask, routes, token_mask=token_mask, cache=cache, use_cache=True,
                                   logits_to_keep=1, token_rule=token_rule)
            else:
                out = self.forward(ids, mask, routes, token_mask=token_mask, logits_to_keep=1, token_rule=token_rule)
            cache = out.cache  # None when decoding uncached
            logits = out.logits[:, -1].float()
            if output_logits:
                step_logits.append(logits)
            if do_sample:
                probs = torch.softmax(warpers(ids, logits), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= torch.isin(nxt, eos)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if stop is not None:
                finished |= stop(ids).to(self.device)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool, device=self.device)], dim=1)
            fed = nxt[:, None]
            if bool(finished.all()):
                break
        return Generation(ids, torch.stack(step_logits, dim=1) if output_logits else None)

    def _generation_inputs(self, input_ids, attention_mask, routes, token_mask, max_new_tokens: int):
        """``generate``'s prompts on the device, their bool mask (left padding only) and one route per
        sample; a token mask tensor must cover prompt and new tokens."""
        self._check_ids(input_ids)
        batch = input_ids.shape[0]
        routes = self._routes(routes, batch)
        ids = input_ids.to(self.device)
        mask = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(self.device).bool())
        check_left_padded(mask)
        if token_mask is not None and not callable(token_mask):
            check_token_mask(token_mask)
        if token_mask is not None and not callable(token_mask) and token_mask.shape[-1] < ids.shape[1] + max_new_tokens:
            raise RouteError(f"token_mask covers {token_mask.shape[-1]} tokens but prompt plus new tokens "
                             f"need {ids.shape[1] + max_new_tokens}")
        return ids, mask, routes

    def _eos_and_pad(self, eos_token_id, pad_token_id) -> tuple[torch.Tensor, int]:
        """The end-of-sequence ids as a tensor (possibly empty) and the id that pads finished rows
        (``pad_token_id``, else the first EOS id, else 0)."""
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                           device=self.device, dtype=torch.long)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        return eos, pad

    def _check_prefill(self, prefill: RoutedOutput, routes, ids: torch.Tensor, use_cache: bool, token_mask) -> None:
        """A prefill must carry the cache of exactly these prompts along these routes, for cached
        decoding without a token mask."""
        if not use_cache or token_mask is not None:
            raise RouteError("a prefill is reused only by cached decoding without a token mask")
        if prefill.cache is None or prefill.cache.chains != self._chains(routes, ids.shape[0]) \
                or prefill.cache.seq_length != ids.shape[1]:
            raise RouteError("the prefill was not made for these prompts along these routes")

    # ---- input checks -----------------------------------------------------------------------
    def _check_ids(self, input_ids) -> None:
        """Token ids must be an integer [batch >= 1, tokens >= 1] tensor within the vocabulary."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a [batch, tokens] tensor, got {got}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise InputError(f"input_ids has shape {tuple(input_ids.shape)}: a batch needs at least one sample "
                             f"with at least one token")
        vocab = self.stack.embed.num_embeddings
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise InputError(f"token id {low if low < 0 else high} is outside the model's vocabulary of {vocab}")

    def _routes(self, routes, batch: int) -> list[Route]:
        if routes is None or isinstance(routes, (str, Route)):
            return [self.route(routes)] * batch
        routes = [self.route(r) for r in routes]
        if len(routes) != batch:
            raise RouteError(f"got {len(routes)} routes for a batch of {batch}; give one route or one per sample")
        return routes

    def _chains(self, chains, batch: int, allow_empty: bool = False) -> Chains:
        if chains and isinstance(chains[0], Route):
            chains = [r.layers for r in chains]
        elif not chains or isinstance(chains[0], int):
            chains = [chains] * batch
        chains = tuple(tuple(int(i) for i in c) for c in chains)
        if len(chains) != batch:
            raise RouteError(f"got {len(chains)} chains for a batch of {batch}")
        n = self.num_layers
        for c in chains:
            if not c and not allow_empty:
                raise RouteError("empty route: a route must execute at least one block")
            if any(not 0 <= i < n for i in c):
                raise RouteError(f"layer index out of range in {c}: the model has blocks 0..{n - 1}")
        return chains

    def _token_mask(self, token_mask, batch: int, columns: int):
        if token_mask is None or callable(token_mask):
            return token_mask
        check_token_mask(token_mask)
        tm = token_mask.to(self.device).bool()
        if tm.dim() == 2:
            tm = tm.unsqueeze(0).expand(batch, *tm.shape)
        if tm.dim() != 3 or tm.shape[0] != batch or tm.shape[1] != self.num_layers or tm.shape[2] < columns:
            raise RouteError(f"token_mask must be [batch={batch}, layers={self.num_layers}, tokens>={columns}] "
                             f"(or without the batch dim), got {tuple(token_mask.shape)}")
        return tm


def _keep(tm, layer: int, h: torch.Tensor, rows, past: int, q: int) -> torch.Tensor:
    """Which tokens of the step's rows execute ``layer``: [rows, q] bool, from the mask tensor or from a
    decision callable ``tm(layer, hidden)`` that reads the state entering the block (per-token routers)."""
    if callable(tm):
        keep = tm(layer, h)
        if keep.shape != h.shape[:2] or keep.dtype != torch.bool:
            raise RouteError(f"a token_mask callable must return a bool [rows, tokens] = {tuple(h.shape[:2])} "
                             f"tensor, got {keep.dtype} {tuple(keep.shape)}")
        return keep
    keep = tm[:, layer, past:past + q]
    return keep if rows is None else keep.index_select(0, rows)


def _step_inputs(st: DecoderStack, state: RouteState, hidden: torch.Tensor, step: Step):
    """The inputs of ``step``'s block on its rows: hidden [rows, T, H], positions, rotary tables
    for the block's layer type, and the attention mask for its window (None: sdpa's causal path)."""
    window, rtype = st.windows[step.layer], st.layer_types[step.layer]
    pe = state.position_embeddings.get(rtype, state.position_embeddings.get("*"))
    mask = state.masks[window]
    h, pos, rows = hidden, state.position_ids, step.rows
    if rows is not None:
        h, pos = h.index_select(0, rows), pos.index_select(0, rows)
        pe = tuple(t.index_select(0, rows) if t.shape[0] > 1 else t for t in pe)
        mask = None if mask is None else mask.index_select(0, rows)
    return h, pos, pe, mask


def _full_mask(full_masks: dict, state: RouteState, window, rows, dtype) -> torch.Tensor:
    """The bool mask over all columns for ``window`` on ``rows`` (None: all), which a token-sparse
    block gathers from; built once per window and remembered in ``full_masks``."""
    if window not in full_masks:
        full_masks[window] = bool_mask(state.masks[window], lambda: _build_mask(
            state.attention_mask, state.past, state.hidden.shape[1], window, "sdpa", dtype, allow_none=False))
    return full_masks[window] if rows is None else full_masks[window].index_select(0, rows)


def _check_cache_rule(cache: RouteKVCache, rule: str) -> None:
    """A cache filled under the absent rule stores only executed tokens' K/V; the dense and kv-kept
    rules store every token's. A sequence keeps the layout it was prefilled with."""
    if cache.token_rule is None:
        cache.token_rule = rule
    elif (cache.token_rule == ABSENT) != (rule == ABSENT):
        raise RouteError(f"this cache was filled under the {cache.token_rule!r} token rule and cannot continue under "
                         f"{rule!r}: a sequence keeps the rule it was prefilled with")


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Generation appends new tokens after the last column, so every prompt must end there: refuse
    right padding (the tokenizer's default), which would decode after the padding."""
    rows = (~attention_mask[:, -1].bool()).nonzero().flatten().tolist() if attention_mask.numel() else []
    if rows:
        raise InputError(f"attention_mask is padded on the right (sample {rows[0]} ends in padding); generation "
                         f"needs left padding: tokenize with padding_side='left' (tokenizer(..., padding=True, "
                         f"padding_side='left'))")


def _warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
    """The logits warpers of sampled decoding (none for greedy decoding), as transformers applies them."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList()
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not do_sample:
        return
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise InputError(f"temperature must be a positive finite number, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise InputError(f"top_k must be a non-negative integer (0: off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")


# ---- exactness self-check -------------------------------------------------------------------
# Relative tolerance per dtype: |executor - HF| <= tolerance x max(1, max |HF logit|). Half
# precision leaves room for kernel rounding (SmolLM2 measures 2.1% in bf16, 0.33% in fp16);
# scalings outside the layers miss by far more (Granite's logits / 8: 88%, Cohere's: 94%).
SELF_CHECK_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(dtype, device, attn): SelfCheck}


@dataclass(frozen=True)
class SelfCheck:
    """The identity route against the model's own Hugging Face forward on a left-padded probe."""

    passed: bool
    max_diff: float  # largest |executor - HF| logit over the real positions, prefill and cached step
    scale: float  # max(1, largest |HF| logit): the tolerance is relative to it
    tolerance: float  # relative tolerance for the dtype (SELF_CHECK_TOLERANCE)
    dtype: str
    seconds: float
    problem: str = ""  # why it failed

    def describe(self) -> str:
        if not self.passed:
            return f"failed: {self.problem}"
        return (f"passed: the identity route equals the HF forward within {self.max_diff:.1e} (logits up to "
                f"{self.scale:.3g}; tolerance {self.tolerance * self.scale:.1e} for {self.dtype}) on a left-padded "
                f"probe, prefill and one cached step ({1000 * self.seconds:.0f} ms)")


@torch.no_grad()
def self_check(executor: RouteExecutor, *, refresh: bool = False) -> SelfCheck:
    """Prove that ``executor`` reproduces its model: the identity route against the model's own
    forward on a left-padded batch of 2 x 8 random tokens (masks and positions exercised),
    prefill of 7 tokens plus one cached step. Cached per model, dtype, device and attention
    implementation; it costs about two forwards of 16 tokens."""
    model, st = executor.model, executor.stack
    dtype = st.embed.weight.dtype
    key = (str(dtype), str(executor.device), st.attn_implementation)
    done = _CHECKED.setdefault(model, {})
    if key in done and not refresh:
        return done[key]
    tol = SELF_CHECK_TOLERANCE.get(dtype, 1e-2)
    start = time.perf_counter()
    ids = torch.randint(1, st.embed.num_embeddings, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # the second sample is left-padded
    ids, mask = ids.masked_fill(mask == 0, 0).to(executor.device), mask.to(executor.device)

    def result(diff=float("nan"), scale=1.0, problem=""):
        return SelfCheck(not problem, diff, scale, tol, str(dtype).removeprefix("torch."),
                         time.perf_counter() - start, problem)

    try:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
    except Exception as exc:  # the model's own forward fails: nothing to compare with
        check = result(problem=f"its own forward fails on {_hf_failure(model, ids[:1])} ({_first_line(exc)})")
    else:
        try:
            pre = executor.forward(ids[:, :-1], mask[:, :-1], use_cache=True)
            step = executor.forward(ids[:, -1:], mask, cache=pre.cache).logits[:, -1].float()
        except LayerRouteError:
            raise
        except Exception as exc:  # its layers do not run under the executor (another layer interface)
            check = result(problem=f"the executor cannot run its decoder layers ({_first_line(exc)})")
        else:
            check = _compare(pre.logits.float(), step, ref, mask.bool(), tol, result)
    done[key] = check
    return check


def _hf_failure(model, ids) -> str:
    """Which input the model's own forward fails on: padding only, or any batch."""
    try:
        model(input_ids=ids, use_cache=False)
    except Exception:
        return "a plain batch of 8 tokens (its weights or config may be broken)"
    return "a left-padded batch (with an attention mask and positions), though not on a plain one"


def _compare(pre, step, ref, real, tol, result) -> SelfCheck:
    """Prefill logits ``pre`` [B, T-1, V] and the cached step's ``step`` [B, V] against ``ref``."""
    ref_pre, got_pre = ref[:, :-1][real[:, :-1]], pre[real[:, :-1]]  # [N, V] real positions only
    if not torch.isfinite(ref_pre).all():
        return result(problem="its own forward gives NaN or infinite logits on the probe, so exactness cannot be "
                              "shown (weights that are not finite, or float16 overflow: try bfloat16 or float32)")
    scale = max(1.0, ref[real].abs().max().item())
    d_pre = (got_pre - ref_pre).abs().max().item()
    d_step = (step - ref[:, -1]).abs().max().item()
    diff = max(d_pre, d_step)
    if diff <= tol * scale:  # NaN fails here too
        return result(diff, scale)
    where = (f"logits differ from the HF forward by {diff:.3g} (logits up to {scale:.3g}; tolerance "
             f"{tol * scale:.1e})")
    if d_pre <= tol * scale:
        return result(diff, scale, f"prefill matches but the cached decoding step differs by {d_step:.3g}: its "
                                   f"layers do not use the KV cache the way softmax attention does")
    ratio = (got_pre * ref_pre).sum().item() / max((ref_pre * ref_pre).sum().item(), 1e-30)
    if abs(ratio - 1) > 10 * tol and (got_pre - ratio * ref_pre).abs().max().item() <= 10 * tol * scale:
        return result(diff, scale, f"{where}; the executor's logits are {ratio:.4g} times the model's: the model "
                                   f"scales its logits outside its decoder layers")
    return result(diff, scale, f"{where}: the model computes something outside its decoder layers (a scale on "
                               f"the embeddings or logits, an extra norm or projection) that the executor does not "
                               f"reproduce")


def verify_model(model: torch.nn.Module) -> SelfCheck:
    """The structure check and the exactness self-check; raises ``UnsupportedModelError``
    (``NotExactError`` for a failed self-check) when the executor cannot run ``model`` exactly."""
    return RouteExecutor(model).check

