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
  it; cached and uncached runs agree under that rule. It changes what is computed, not
  how much: the dense block runs on every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import RouteError
from .models import DecoderStack, decoder_stack
from .route import Route, resolve_route

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

    @property
    def seq_length(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def slot(self, index: int) -> _SlotView:
        return _SlotView(self, index)


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


def _build_mask(attn: torch.Tensor, past: int, q: int, window: int | None, impl: str, dtype, allow_none=True):
    """[B, 1, q, past+q] attention mask (bool for sdpa, additive float for eager), or None
    where sdpa's own causal path is exact (no padding, no active window)."""
    kv = attn.shape[1]
    if allow_none and impl == "sdpa" and (past == 0 or q == 1) and (window is None or kv <= window) \
            and bool(attn.all()):
        return None
    q_idx = torch.arange(past, past + q, device=attn.device)[:, None]
    k_idx = torch.arange(kv, device=attn.device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    allowed = (allowed[None, None] & attn[:, None, None, :]) | (k_idx == q_idx)  # pad rows see themselves
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

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.stack: DecoderStack = decoder_stack(model)
        self.fingerprint = self.stack.fingerprint

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
              position_ids: torch.Tensor | None = None, past: int = 0) -> RouteState:
        """Embed ``input_ids`` [B, T] and build the masks and rotary embeddings once.

        ``attention_mask`` covers ``past + T`` columns (1 = token, 0 = padding). Positions
        default to the count of real tokens before each one, as ``generate`` assigns them.
        """
        if input_ids.dim() != 2:
            raise RouteError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        batch, q = input_ids.shape
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + q, dtype=torch.bool, device=device)
        attention_mask = attention_mask.to(device).bool()
        if attention_mask.shape != (batch, past + q):
            raise RouteError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, past + q)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            position_ids = position_ids.masked_fill(~attention_mask[:, past:], 1)
        position_ids = position_ids.to(device).expand(batch, q)
        hidden = self.stack.embed(input_ids)  # [B, T, H]
        st = self.stack
        if st.rotary_takes_layer_type:
            pe = {t: st.rotary(hidden, position_ids, t) for t in set(st.layer_types)}
        else:
            pe = {"*": st.rotary(hidden, position_ids)}
        masks = {w: _build_mask(attention_mask, past, q, w, st.attn_implementation, hidden.dtype)
                 for w in set(st.windows)}
        return RouteState(hidden, attention_mask, position_ids, past, pe, masks)

    @torch.no_grad()
    def advance(self, state: RouteState, chains, *, token_mask: torch.Tensor | None = None,
                cache: RouteKVCache | None = None, record: list | None = None) -> RouteState:
        """Run ``chains`` (one chain of block indices for all rows, or one per row; a chain
        may be empty) from ``state`` and return the new state.

        With ``cache``, each schedule step reads and extends its own KV slot. ``record``, a
        list of per-row lists, collects each row's state after each of its blocks.
        """
        chains = self._chains(chains, state.hidden.shape[0], allow_empty=True)
        schedule = cache.schedule if cache is not None else plan_schedule(chains, self.device)
        hidden, q, st = state.hidden, state.hidden.shape[1], self.stack
        tm = self._token_mask(token_mask, hidden.shape[0], state.past + q)
        for s, step in enumerate(schedule):
            layer, rows = step.layer, step.rows
            window, rtype = st.windows[layer], st.layer_types[layer]
            pe = state.position_embeddings.get(rtype, state.position_embeddings.get("*"))
            mask = state.masks[window]
            h, pos = hidden, state.position_ids
            if rows is not None:
                h, pos = h.index_select(0, rows), pos.index_select(0, rows)
                pe = tuple(t.index_select(0, rows) if t.shape[0] > 1 else t for t in pe)
                mask = None if mask is None else mask.index_select(0, rows)
            out = st.layers[layer](
                h, attention_mask=mask, position_ids=pos, position_embeddings=pe,
                cache=None if cache is None else cache.slot(s), use_cache=cache is not None,
            )
            out = out[0] if isinstance(out, tuple) else out
            if tm is not None:
                keep = tm[:, layer, state.past:state.past + q, None]  # [B, T, 1]
                out = torch.where(keep if rows is None else keep.index_select(0, rows), out, h)
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
        logits = self.stack.head(self.stack.norm(hidden))
        cap = self.stack.logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- one call ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, routes=None, *,
                position_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                cache: RouteKVCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, logits_to_keep: int = 0) -> RoutedOutput:
        """Logits for a padded batch where each sample may follow its own route.

        ``routes``: None (identity), one Route/spec for all, or one per sample. With a
        ``cache`` (or ``use_cache=True`` to start one), ``input_ids`` are the new tokens and
        ``attention_mask`` covers past and new tokens, as in Hugging Face models.
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
        state = self.advance(state, chains, token_mask=token_mask, cache=cache, record=record)
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
                 output_logits: bool = False) -> Generation:
        """Greedy or sampled decoding; each sample keeps its route for every new token.

        ``use_cache=False`` recomputes the whole sequence at each step (the reference that
        cached decoding must equal). With ``token_mask``, it must cover prompt and new tokens.
        """
        from transformers.generation.logits_process import (
            LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        batch = input_ids.shape[0]
        routes = self._routes(routes, batch)
        ids = input_ids.to(self.device)
        mask = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(self.device).bool())
        if token_mask is not None and token_mask.shape[-1] < ids.shape[1] + max_new_tokens:
            raise RouteError(f"token_mask covers {token_mask.shape[-1]} tokens but prompt plus new tokens "
                             f"need {ids.shape[1] + max_new_tokens}")
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                           device=self.device, dtype=torch.long)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        cache, step_logits, fed = None, [], ids
        for _ in range(max_new_tokens):
            if use_cache:
                out = self.forward(fed, mask, routes, token_mask=token_mask, cache=cache, use_cache=True,
                                   logits_to_keep=1)
                cache = out.cache
            else:
                out = self.forward(ids, mask, routes, token_mask=token_mask, logits_to_keep=1)
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
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool, device=self.device)], dim=1)
            fed = nxt[:, None]
            if bool(finished.all()):
                break
        return Generation(ids, torch.stack(step_logits, dim=1) if output_logits else None)

    # ---- input checks -----------------------------------------------------------------------
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
        if token_mask is None:
            return None
        tm = token_mask.to(self.device).bool()
        if tm.dim() == 2:
            tm = tm.unsqueeze(0).expand(batch, *tm.shape)
        if tm.dim() != 3 or tm.shape[0] != batch or tm.shape[1] != self.num_layers or tm.shape[2] < columns:
            raise RouteError(f"token_mask must be [batch={batch}, layers={self.num_layers}, tokens>={columns}] "
                             f"(or without the batch dim), got {tuple(token_mask.shape)}")
        return tm
