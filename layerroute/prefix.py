"""Prefix states and the one cache of them that every searcher and the env share.

A ``PrefixState`` holds the rows of some samples part-way along their routes (``Objective.begin``
/ ``advance``). Any route that starts with the same blocks can continue from it, so the
objective keeps one ``PrefixCache`` (``Objective.prefixes``): an LRU of states keyed by
``(samples, chain)`` (the sample indices, in order, and the blocks run), capped in bytes.
MCTS keeps each node's state there, Optuna its trials' states every few blocks, the env the
full route's states at its edit points, greedy its embedded chunks. Entries count the bytes of
their hidden states (the masks and rotary embeddings are shared with the embedded rows);
*pinned* states (``pin``: the embedded rows that other entries share) count all their tensors
and are never evicted.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from .executor import RouteState

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB


class PrefixState:
    """The rows of some samples part-way along their routes (see ``Objective.begin``).

    ``samples`` are objective sample indices, ``blocks`` the blocks run so far per sample,
    ``sizes`` the rows per sample (a cloze sample has one row per option).
    """

    def __init__(self, samples, state: RouteState, blocks, sizes):
        self.samples, self.state = tuple(samples), state
        self.blocks, self.sizes = tuple(blocks), tuple(sizes)

    def select(self, j: int) -> PrefixState:
        """The state of the ``j``-th sample alone."""
        lo = sum(self.sizes[:j])
        return PrefixState((self.samples[j],), self.state.select(range(lo, lo + self.sizes[j])), (self.blocks[j],),
                           (self.sizes[j],))

    @staticmethod
    def concat(states: Sequence[PrefixState]) -> PrefixState:
        """Stack states (for example MCTS nodes of many samples) to advance them in one call."""
        if len(states) == 1:
            return states[0]
        return PrefixState([s for p in states for s in p.samples], RouteState.concat([p.state for p in states]),
                           [b for p in states for b in p.blocks], [n for p in states for n in p.sizes])

    def with_hidden(self, hidden: torch.Tensor, blocks: int) -> PrefixState:
        """This state's context (masks, positions) with other hidden states, ``blocks`` blocks in (one sample)."""
        return PrefixState(self.samples, dataclasses.replace(self.state, hidden=hidden), (blocks,), self.sizes)

    def nbytes(self) -> int:
        """Bytes of the hidden states (what a cached state adds to the context it shares)."""
        return self.state.hidden.numel() * self.state.hidden.element_size()

    def total_bytes(self) -> int:
        """Bytes of every tensor of the state: hidden states, masks, positions, rotary embeddings."""
        st = self.state
        ts = [st.hidden, st.attention_mask, st.position_ids, *(m for m in st.masks.values() if m is not None),
              *(x for v in st.position_embeddings.values() for x in v)]
        return sum(x.numel() * x.element_size() for x in ts)


class PrefixCache:
    """An LRU of prefix states by ``(samples, chain)``, at most ``cap_bytes`` (see the module docstring).

    ``deepest`` finds the longest cached prefix of a chain, ``put`` adds one (evicting the least
    recently used entries beyond the cap), ``pin`` memoises a state that is never evicted.
    ``bytes`` is what the cache holds now, ``peak`` the most it has held since ``clear``.
    """

    def __init__(self, cap_bytes: int = DEFAULT_CACHE_BYTES):
        self.cap_bytes = int(cap_bytes)
        self.lru: OrderedDict = OrderedDict()
        self.pinned: dict = {}
        self.bytes = self.peak = 0

    def __len__(self) -> int:
        return len(self.lru)

    def limit(self, cap_bytes: int) -> PrefixCache:
        """Set the cap (evicting at once what no longer fits)."""
        self.cap_bytes = int(cap_bytes)
        self._evict()
        return self

    def clear(self) -> PrefixCache:
        """Drop every state, pinned ones too, and restart the peak."""
        self.lru.clear()
        self.pinned.clear()
        self.bytes = self.peak = 0
        return self

    def deepest(self, samples: Sequence[int], chain: Sequence[int]) -> tuple[PrefixState | None, int]:
        """The cached state of ``samples`` along the longest prefix of ``chain`` (marked as used) and its
        length; ``(None, 0)`` when no prefix is cached."""
        samples, chain = tuple(samples), tuple(chain)
        for k in range(len(chain), 0, -1):
            state = self.lru.get((samples, chain[:k]))
            if state is not None:
                self.lru.move_to_end((samples, chain[:k]))
                return state, k
        return None, 0

    def put(self, samples: Sequence[int], chain: Sequence[int], state: PrefixState) -> None:
        """Keep ``state`` as the state of ``samples`` after ``chain`` (an empty chain or a key already
        held is left as it is)."""
        key = (tuple(samples), tuple(chain))
        if not key[1] or key in self.lru:
            return
        self.lru[key] = state
        self.bytes += state.nbytes()
        self.peak = max(self.peak, self.bytes)
        self._evict()

    def pin(self, samples: Sequence[int], make: Callable[[], PrefixState]) -> PrefixState:
        """The state ``make()`` of ``samples`` (for example their embedded rows), made once and never evicted."""
        key = tuple(samples)
        if key not in self.pinned:
            self.pinned[key] = make()
            self.bytes += self.pinned[key].total_bytes()
            self.peak = max(self.peak, self.bytes)
        return self.pinned[key]

    def _evict(self) -> None:
        while self.bytes > self.cap_bytes and self.lru:
            _, old = self.lru.popitem(last=False)
            self.bytes -= old.nbytes()
