"""Per-sample Monte Carlo tree search over routes, the label known (an ORACLE: labels, upper bounds).

Three action spaces (``--space``):

* ``edit`` (Dr.LLM's search, the default): the root is the full route; a child is its parent's
  route with one edit: skip 1 or 2 consecutive entries at any position, or repeat one entry once.
  A node at depth d is d edits from the full route, so routes stay close to it; routes are at
  most 2L long. Selection descends by UCB minus a length penalty
  (mean + c * sqrt(ln N / n) - ``--length-penalty`` * length / L), or with probability
  ``--random-child`` to a random child; a node with untried edits expands one of them (in a
  seeded random order; edits that give the same route count once). Dr.LLM's own code
  descends to a leaf before expanding, which makes its tree a single chain of edits; here every
  node keeps expanding, so the full route's single edits are tried first. Two early stops (Dr.LLM's):
  a route beats the full route (reward ``correct``: it is correct where the full route is not;
  reward ``margin``: its margin gain exceeds ``--beat-margin`` nats), or a correct route at least
  ``--stop-shorter`` blocks shorter than the full route is found. The record's ``label`` is
  Dr.LLM's label: the shortest correct route (ties: fewer distinct blocks, then the higher reward).
* ``sequential``: one action per layer, in order: skip, execute or repeat (two passes); the
  tree has depth L. (This was called ``drllm`` before; Dr.LLM's search is ``edit``.)
* ``cola`` (CoLa): the next block to run (any block, each at most ``--max-count`` times) or
  stop; routes are at most ``--max-length`` blocks (default L + 4). ``--macros`` adds CoLa's
  macro actions at the in-order position p: skip k blocks (p += k) and repeat the last k
  blocks r more times, k, r in 1..4 (offered only where every block stays within
  ``--max-count``).

In ``sequential`` and ``cola`` every simulation selects a node by UCT (mean reward + c *
sqrt(ln N_parent / N); with probability ``--random-child`` a random existing child instead),
expands one untried action (in a seeded random order) and evaluates one route: the node's chain
of blocks completed by **executing the remaining layers in order** (from the node's in-order
position to L - 1). Under a budget (``objective.max_blocks``) actions that do not fit are not
offered, and the completion drops the remaining layers that do not fit evenly spread over the
middle layers (the first and last tenth are kept where possible, as in the ``unified``
baseline), so every evaluated route is within the budget. The ``edit`` space starts from the
full route, so it takes no hard budget below L (use ``--lambda``). The identity route is scored
before the search (its reward is -inf, stored as null, when it exceeds the budget), so the best
route is never worse.

Cost: the reward is the objective's (margin by default, minus lambda * blocks / L). A state
along a route (``objective.begin`` / ``advance``) is computed once and reused by every route
that starts with the same blocks, in an LRU cache capped at ``--cache-mb`` (peak bytes
reported); a route already scored is not scored again. In the ``edit`` space the full route's
state after every block is kept, and every scored route keeps its state every
``--checkpoint-every`` blocks, so an edit first changing position p costs about the blocks
after p. Many samples run in lockstep: each wave selects ``--leaves-per-sample`` leaves per
sample (virtual loss keeps them apart), advances all their states in one batched call (chunked
by ``--batch-rows``) and finishes them in one call. ``--naive`` re-runs every simulation's route
from the embeddings, one at a time, with no cache of states or of scored routes, for
reference: it makes the same tree decisions, so it finds the same routes (up to float noise
between batch shapes).

Each sample's tree and random stream depend only on (seed, sample uid), never on the other
samples of the call, so a sample's record is the same however the samples are grouped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from layerroute.objective import PrefixState
from layerroute.tasks.base import stable_rng

from .base import SearchConfig, SearchError, Searcher, option, register_searcher

SPACES = ("edit", "sequential", "cola")
STOP = ("stop",)


@dataclass
class MCTSConfig(SearchConfig):
    simulations: int = option(200, "simulations (evaluated routes) per sample")
    space: str = option("edit", "action space: edit (Dr.LLM: edits of the full route), sequential "
                        "(skip/execute/repeat per layer, in order) or cola (next block or stop)", choices=SPACES)
    uct: float = option(1.8, "UCT exploration constant c")
    random_child: float = option(0.1, "chance of descending to a random existing child instead of the UCT best")
    max_length: int = option(0, "cola: most blocks in a route (0: L + 4)")
    max_count: int = option(2, "cola: most passes of one block in a route")
    macros: bool = option(False, "cola: add CoLa's macro actions (skip k / repeat k blocks r times, k, r in 1..4)")
    leaves_per_sample: int = option(1, "leaves selected per sample per wave (virtual loss keeps them apart)")
    lockstep: int = option(16, "samples searched together in one batched wave")
    cache_mb: float = option(1024.0, "memory cap of the prefix-state cache (LRU), in MiB")
    top_routes: int = option(5, "best routes stored per sample")
    length_penalty: float = option(3.0, "edit: UCB minus this x route length / L (Dr.LLM: 3.0)")
    beat_margin: float = option(1.0, "edit, reward margin: stop once a route's margin gain over the full route "
                                "exceeds this many nats (a negative value: never)")
    stop_shorter: int = option(2, "edit: stop once a correct route this many blocks shorter than the full route is "
                               "found (0: never)")
    checkpoint_every: int = option(3, "edit: keep a scored route's state every N blocks for the edits below it")
    naive: bool = option(False, "reference mode: score every route from the embeddings, one at a time, no cache")

    def validate(self) -> None:
        checks = [(self.simulations >= 1, f"--simulations must be at least 1, got {self.simulations}"),
                  (self.space in SPACES, f"--space must be one of {', '.join(SPACES)}, got {self.space!r}"),
                  (math.isfinite(self.uct) and self.uct >= 0, f"--uct must be a number >= 0, got {self.uct}"),
                  (0 <= self.random_child <= 1, f"--random-child must be in [0, 1], got {self.random_child}"),
                  (self.max_length >= 0, f"--max-length must be >= 0 (0: L + 4), got {self.max_length}"),
                  (self.max_count >= 1, f"--max-count must be at least 1, got {self.max_count}"),
                  (self.leaves_per_sample >= 1, f"--leaves-per-sample must be at least 1, got {self.leaves_per_sample}"),
                  (self.lockstep >= 1, f"--lockstep must be at least 1, got {self.lockstep}"),
                  (self.cache_mb >= 0, f"--cache-mb must be >= 0, got {self.cache_mb}"),
                  (self.top_routes >= 1, f"--top-routes must be at least 1, got {self.top_routes}"),
                  (math.isfinite(self.length_penalty) and self.length_penalty >= 0,
                   f"--length-penalty must be a number >= 0, got {self.length_penalty}"),
                  (math.isfinite(self.beat_margin), f"--beat-margin must be a finite number, got {self.beat_margin}"),
                  (self.stop_shorter >= 0, f"--stop-shorter must be >= 0 (0: never), got {self.stop_shorter}"),
                  (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")]
        for ok, msg in checks:
            if not ok:
                raise SearchError(msg)


class Node:
    """A tree node: the chain of blocks run so far and the next in-order layer ``pos``."""

    __slots__ = ("chain", "pos", "terminal", "children", "untried", "n", "w")

    def __init__(self, chain: tuple[int, ...], pos: int, terminal: bool):
        self.chain, self.pos, self.terminal = chain, pos, terminal
        self.children: dict = {}
        self.untried: list | None = None  # filled on first visit
        self.n, self.w = 0, 0.0


class Tree:
    """One sample's search tree, its random stream and the routes it has scored."""

    def __init__(self, searcher: MCTS, index: int, uid: str):
        self.s, self.index, self.uid = searcher, index, uid
        self.rng = stable_rng(f"mcts:{searcher.seed}:{uid}")
        self.root = Node((), 0, False)
        self.scored: dict[tuple[int, ...], tuple[float, float, bool]] = {}  # chain -> (reward, margin, correct)
        self.done = 0  # simulations finished
        self.floor = 0.0  # the virtual-loss value: the lowest reward seen

    # ---- actions ------------------------------------------------------------------------------
    def actions(self, node: Node) -> list:
        s, chain, pos = self.s, node.chain, node.pos
        room = s.cap - len(chain)
        if s.config.space == "sequential":
            acts = [("skip",), ("execute",), ("repeat",)]
            cost = {"skip": 0, "execute": 1, "repeat": 2}
            acts = [a for a in acts if cost[a[0]] <= room]
            if not chain and pos == s.L - 1:  # a route runs at least one block
                acts = [a for a in acts if a != ("skip",)]
            return acts
        counts = [chain.count(b) for b in range(s.L)]
        acts = [("run", b) for b in range(s.L) if counts[b] < s.config.max_count and room >= 1]
        if s.config.macros:
            acts += [("skip", k) for k in range(1, 5) if pos + k < s.L]
            seg = chain[-4:]
            for k in range(1, 5):
                last = tuple(range(pos - k, pos))
                if pos - k < 0 or seg[-k:] != last:
                    continue
                for r in range(1, 5):
                    if k * r <= room and all(counts[b] + r <= s.config.max_count for b in last):
                        acts.append(("repeat", k, r))
        if chain:
            acts.append(STOP)
        return acts

    def child(self, node: Node, act) -> Node:
        s, chain, pos = self.s, node.chain, node.pos
        kind = act[0]
        if s.config.space == "sequential":
            chain = chain + (pos,) * {"skip": 0, "execute": 1, "repeat": 2}[kind]
            return Node(chain, pos + 1, pos + 1 == s.L)
        if kind == "stop":
            return Node(chain, pos, True)
        if kind == "run":
            return Node(chain + (act[1],), act[1] + 1, False)
        if kind == "skip":
            return Node(chain, pos + act[1], False)
        k, r = act[1], act[2]
        return Node(chain + tuple(range(pos - k, pos)) * r, pos, False)

    def route(self, node: Node) -> tuple[int, ...]:
        """The node's chain completed by executing the remaining layers in order (within the cap)."""
        if node.terminal:
            return node.chain
        s = self.s
        counts = [node.chain.count(b) for b in range(s.L)]
        rest = [b for b in range(node.pos, s.L) if counts[b] < s.max_count]
        drop = len(rest) - (s.cap - len(node.chain))
        if drop > 0:  # spread the dropped layers evenly over the middle (as the `unified` baseline does)
            mid = [b for b in rest if s.L // 10 <= b < s.L - s.L // 10]
            pool = mid if len(mid) >= drop else rest
            gone = {pool[int((j + 0.5) * len(pool) / drop)] for j in range(drop)}
            rest = [b for b in rest if b not in gone]
        return node.chain + tuple(rest)

    # ---- selection and backup -------------------------------------------------------------------
    def select(self) -> tuple[list[Node], tuple[int, ...], float]:
        """Walk down by UCT, expand one untried action; return the path, the route to score and the
        virtual loss put on the path (the lowest reward seen), taken back by ``backup``."""
        node, path = self.root, [self.root]
        while True:
            if node.untried is None:
                node.untried = [] if node.terminal else self.actions(node)
                self.rng.shuffle(node.untried)
            if node.untried:
                act = node.untried.pop()
                node.children[act] = self.child(node, act)
                path.append(node.children[act])
                break
            if node.terminal or not node.children:
                break
            kids = list(node.children.values())
            if self.rng.random() < self.s.config.random_child:
                node = kids[self.rng.randrange(len(kids))]
            else:
                ln = math.log(max(node.n, 1))
                node = max(kids, key=lambda c: self.ucb(c, ln) if c.n else math.inf)
            path.append(node)
        for v in path:  # virtual loss until the reward is backed up
            v.n += 1
            v.w += self.floor
        return path, self.route(path[-1]), self.floor

    def ucb(self, child: Node, ln_parent: float) -> float:
        """The UCT score of a visited ``child``: mean reward + c * sqrt(ln N_parent / N)."""
        return child.w / child.n + self.s.config.uct * math.sqrt(ln_parent / child.n)

    def backup(self, path: list[Node], reward: float, virtual: float) -> None:
        for v in path:
            v.w += reward - virtual
        self.done += 1

    def record(self, chain, reward: float, margin: float, correct: bool) -> None:
        self.floor = min(self.floor, reward) if self.scored else reward
        self.scored[chain] = (reward, margin, correct)


class EditTree(Tree):
    """One sample's tree in the ``edit`` space: a node's chain is a whole route, the root the full one."""

    def __init__(self, searcher: MCTS, index: int, uid: str):
        super().__init__(searcher, index, uid)
        self.root = Node(tuple(range(searcher.L)), 0, False)
        self.identity: tuple[float, float, bool] | None = None  # (reward, margin, correct) of the full route
        self.stopped: str | None = None  # the early stop that ended the search, if any

    def actions(self, node: Node) -> list:
        """The distinct routes one edit away: skip 1 or 2 consecutive entries, or repeat one entry once."""
        r, out = node.chain, {}
        for i in range(len(r)):
            for k in (1, 2):
                if i + k <= len(r) and len(r) - k >= 1:
                    out.setdefault(r[:i] + r[i + k:], None)
            if len(r) + 1 <= self.s.cap:
                out.setdefault(r[:i + 1] + r[i:], None)
        out.pop(r, None)
        return list(out)

    def child(self, node: Node, act) -> Node:
        return Node(act, 0, False)

    def route(self, node: Node) -> tuple[int, ...]:
        return node.chain

    def ucb(self, child: Node, ln_parent: float) -> float:
        """UCB minus Dr.LLM's length penalty: ``--length-penalty`` x route length / L."""
        return super().ucb(child, ln_parent) - self.s.config.length_penalty * len(child.chain) / self.s.L

    def record(self, chain, reward: float, margin: float, correct: bool) -> None:
        super().record(chain, reward, margin, correct)
        s = self.s
        if self.identity is None:  # the full route, scored first
            self.identity = (reward, margin, correct)
            self.root.n, self.root.w = 1, reward
            return
        has, (_, id_margin, id_correct) = s.objective.has_correct, self.identity
        if s.objective.reward_kind == "correct":
            beats = has and correct and not id_correct
        else:
            beats = s.config.beat_margin >= 0 and margin - id_margin > s.config.beat_margin
        if beats:
            self.stopped = "beats the full route"
        elif has and correct and s.config.stop_shorter and len(chain) <= s.L - s.config.stop_shorter:
            self.stopped = f"a correct route {s.L - len(chain)} blocks shorter"


@register_searcher
class MCTS(Searcher):
    """Per-sample Monte Carlo tree search over routes (Dr.LLM or CoLa space); an ORACLE: it reads labels."""

    name = "mcts"
    Config = MCTSConfig
    per_sample = True
    oracle = True

    def __init__(self, objective, config=None, seed=0):
        super().__init__(objective, config, seed)
        self.L = objective.num_layers
        c = self.config
        self.max_count = c.max_count if c.space == "cola" else 2
        length = (c.max_length or self.L + 4) if c.space == "cola" else 2 * self.L
        self.cap = min(length, objective.max_blocks) if objective.max_blocks is not None else length
        if self.cap < 1:
            raise SearchError(f"the budget allows {objective.max_blocks} blocks: no route fits")
        if c.space == "edit" and self.cap < self.L:
            raise SearchError(f"--space edit searches edits of the full route ({self.L} blocks), so a hard budget of "
                              f"{objective.max_blocks} blocks does not fit it; penalise compute with --lambda, or "
                              f"use --space sequential or cola")
        self._index = {ex.uid: i for i, ex in enumerate(objective.examples)}

    # ---- driver ---------------------------------------------------------------------------------
    def search(self, keys):
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise SearchError(f"unknown sample keys for this objective: {', '.join(missing[:3])}")
        group = 1 if self.config.naive else self.config.lockstep
        for lo in range(0, len(keys), group):
            yield from self._search_group(keys[lo:lo + group])

    def _search_group(self, keys):
        t0 = time.perf_counter()
        obj = self.objective
        edit = self.config.space == "edit"
        trees = [(EditTree if edit else Tree)(self, self._index[k], k) for k in keys]
        tokens = obj.tokens([t.index for t in trees]).tolist()
        evaluator = (_NaiveEvaluator if self.config.naive or not self._reusable() else
                     _EditEvaluator if edit else _PrefixEvaluator)
        ev = evaluator(self, dict(zip((t.index for t in trees), tokens)))
        identity = tuple(range(self.L))
        id_scores = ev.evaluate([(t, (), identity) for t in trees])
        for t, scores in zip(trees, id_scores):
            if scores[0] > -math.inf:
                t.record(identity, *scores)
        def pending(t):
            return 0 if getattr(t, "stopped", None) else self.config.simulations - t.done

        while any(pending(t) > 0 for t in trees):
            wave = []  # (tree, path, route, virtual loss)
            for t in trees:
                for _ in range(min(self.config.leaves_per_sample, pending(t))):
                    wave.append((t, *t.select()))
            todo, seen = [], set()  # routes to score (naive: all; else new ones, once): (tree, leaf chain, route)
            for t, path, route, _ in wave:
                if self.config.naive or (route not in t.scored and (t.index, route) not in seen):
                    seen.add((t.index, route))
                    todo.append((t, path[-1].chain, route))
            for (t, _, route), scores in zip(todo, ev.evaluate(todo) if todo else []):
                t.record(route, *scores)
            for t, path, route, virtual in wave:
                t.backup(path, t.scored[route][0], virtual)
        seconds = (time.perf_counter() - t0) / len(trees)
        for t, id_score in zip(trees, id_scores):
            yield self._record(t, *id_score, seconds, ev)

    def _reusable(self) -> bool:
        """Prefix reuse needs the walk; greedy decoding (reward=correct on generate tasks) does not have it."""
        obj = self.objective
        return not (obj.reward_kind == "correct" and obj.task.kind == "generate")

    def _record(self, t: Tree, r_id, m_id, c_id, seconds, ev) -> dict:
        ranked = sorted(t.scored.items(), key=lambda kv: (-kv[1][0], len(kv[0]), kv[0]))
        best, (reward, margin, correct) = ranked[0]
        correct_blocks = [len(ch) for ch, v in t.scored.items() if v[2]]
        has = self.objective.has_correct
        label = min((ch for ch, v in t.scored.items() if v[2]), default=None,
                    key=lambda ch: (len(ch), len(set(ch)), -t.scored[ch][0], ch)) if has else None
        return {
            "key": t.uid, "layers": list(best), "blocks": len(best), "reward": reward, "margin": margin,
            "correct": bool(correct) if has else None,
            "identity": {"reward": r_id if r_id > -math.inf else None, "margin": m_id,
                         "correct": bool(c_id) if has else None, "blocks": self.L},
            "shortest_correct_blocks": min(correct_blocks) if has and correct_blocks else None,
            "top": [{"layers": list(ch), "reward": v[0], "correct": bool(v[2]) if has else None}
                    for ch, v in ranked[: self.config.top_routes]],
            "label": None if label is None else {"layers": list(label), "margin": t.scored[label][1]},
            "stopped": getattr(t, "stopped", None),
            "space": self.config.space, "num_layers": self.L, "simulations": t.done, "routes_scored": len(t.scored),
            "block_executions": ev.execs[t.index], "peak_cache_bytes": ev.peak, "seconds": seconds,
        }

    def summarize(self, records):
        recs = [r for r in records if "identity" in r]
        if not recs:
            return {"oracle": True, "samples": 0}
        pairs = [(r["reward"], r["identity"]["reward"]) for r in recs if r["identity"]["reward"] is not None]
        out = {"oracle": True, "label": "ORACLE (MCTS reads each sample's label): an upper bound, not a result",
               "samples": len(recs), "mean_best_reward": sum(r["reward"] for r in recs) / len(recs),
               "mean_best_blocks": sum(r["blocks"] for r in recs) / len(recs)}
        if pairs:
            out["mean_identity_reward"] = sum(p[1] for p in pairs) / len(pairs)
            out["share_improved"] = sum(p[0] > p[1] for p in pairs) / len(pairs)
        if recs[0]["correct"] is not None:
            out["identity_accuracy"] = sum(r["identity"]["correct"] for r in recs) / len(recs)
            out["oracle_accuracy"] = sum(r["correct"] for r in recs) / len(recs)
        return out


class _NaiveEvaluator:
    """The reference: every route scored from the embeddings with ``objective.score``, one at a time."""

    peak = 0  # bytes of cached states: none

    def __init__(self, searcher: MCTS, tokens: dict[int, int]):
        self.s, self.tokens = searcher, tokens  # real tokens of each sample's rows
        self.execs = dict.fromkeys(tokens, 0)  # block executions (blocks x tokens) per sample

    def evaluate(self, items):
        """(reward, margin, correct) of each (tree, leaf chain, route) of ``items``."""
        out = []
        for t, _, route in items:
            sc = self.s.objective.score([t.index], [route])
            self.execs[t.index] += len(route) * self.tokens[t.index]
            out.append((float(sc.reward[0]), float(sc.margin[0]), bool(sc.correct[0])))
        return out


class _PrefixEvaluator(_NaiveEvaluator):
    """Batched scoring with prefix reuse: the objective's prefix cache (``Objective.prefixes``), keyed by
    (sample, chain), emptied and capped at ``--cache-mb`` for this search; each sample's embedded rows
    are pinned there and give every cached state of that sample its context."""

    def __init__(self, searcher: MCTS, tokens: dict[int, int]):
        super().__init__(searcher, tokens)
        self.obj = searcher.objective
        self.cache = self.obj.prefixes.clear().limit(int(searcher.config.cache_mb * 2 ** 20))

    @property
    def peak(self) -> int:
        return self.cache.peak

    def _state(self, i: int, chain: tuple[int, ...]) -> tuple[PrefixState, int]:
        """The deepest cached state along ``chain`` and how many of its blocks it has run."""
        base = self.cache.pin((i,), lambda: self.obj.begin([i]))
        state, k = self.cache.deepest((i,), chain)
        return (state, k) if state is not None else (base, 0)

    def _put(self, i: int, chain: tuple[int, ...], hidden: torch.Tensor) -> None:
        self.cache.put((i,), chain, self.cache.pinned[(i,)].with_hidden(hidden, len(chain)))

    def evaluate(self, items):
        """(reward, margin, correct) of each (tree, leaf chain, route) of ``items``: advance the deepest
        cached state to the leaf (cached in turn), then along the rest of the route, and finish; one
        batched call each per chunk of ``batch_rows`` rows."""
        obj, out = self.obj, []
        for chunk in _chunks(items, obj):
            starts, done = zip(*(self._state(t.index, leaf) for t, leaf, _ in chunk))
            state = obj.advance(PrefixState.concat(starts), [leaf[k:] for (_, leaf, _), k in zip(chunk, done)])
            lo = 0
            for (t, leaf, route), k, n in zip(chunk, done, state.sizes):
                self._put(t.index, leaf, state.state.hidden[lo:lo + n].clone())
                self.execs[t.index] += (len(route) - k) * self.tokens[t.index]
                lo += n
            state = obj.advance(state, [route[len(leaf):] for _, leaf, route in chunk])
            sc = obj.finish(state)
            out += [(float(r), float(m), bool(c)) for r, m, c in zip(sc.reward, sc.margin, sc.correct)]
        return out


class _EditEvaluator(_PrefixEvaluator):
    """Prefix reuse for the ``edit`` space: each route starts from the deepest cached state along it;
    the full route keeps its state after every block, every other scored route every
    ``--checkpoint-every`` blocks, so the edits below a node start where they first change it."""

    def evaluate(self, items):
        obj, out, step = self.obj, [], self.s.config.checkpoint_every
        identity = tuple(range(self.s.L))
        for chunk in _chunks(items, obj):
            starts, done = zip(*(self._state(t.index, route) for t, _, route in chunk))
            record = [[] for _ in range(sum(p.sizes[0] for p in starts))]
            state = obj.advance(PrefixState.concat(starts), [route[k:] for (_, _, route), k in zip(chunk, done)],
                                record=record)
            lo = 0
            for (t, _, route), k, n in zip(chunk, done, state.sizes):
                every = 1 if route == identity else step
                for q in range(k + 1, len(route)):
                    if q % every == 0:
                        self._put(t.index, route[:q], torch.stack([record[r][q - k - 1] for r in range(lo, lo + n)]))
                self.execs[t.index] += (len(route) - k) * self.tokens[t.index]
                lo += n
            del record
            sc = obj.finish(state)
            out += [(float(r), float(m), bool(c)) for r, m, c in zip(sc.reward, sc.margin, sc.correct)]
        return out


def _chunks(items, obj):
    """Consecutive items of at most ``batch_rows`` rows (at least one item), as ``Objective.batches`` cuts them."""
    start = 0
    for chunk in obj.batches([item[0].index for item in items]):
        yield items[start:start + len(chunk)]
        start += len(chunk)
