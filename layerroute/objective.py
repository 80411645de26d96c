"""The shared objective: the reward of a route on a sample, for many (sample, route) pairs at once.

One ``Objective`` per (model, task, examples) tokenizes once. Each sample becomes one *row*
(token sequence): a letter question the prompt, a generate or loglik example prompt + gold,
a cloze question the prompt once followed by every option, *packed* (each option sees the
prompt and itself only, and sits at the positions right after the prompt; see
``RouteExecutor.begin``), which costs about a third of one row per option. Packing is checked
once per model against one row per option (``pack=False``, also the fallback). All rows
are left-padded to one width, so the states of any samples can be stacked and advanced in one
batched executor call, and a state computed after a prefix of blocks can be reused by every
route that starts with that prefix (``begin`` / ``advance`` / ``finish``).

The reward of a route on a sample (``Scores.reward``)::

    margin  (default)  choice tasks: log-likelihood of the gold option minus the best wrong
                       option's, under the task's own scoring (letter or cloze), so margin > 0
                       exactly when the answer is scored correct (ties aside);
                       generate and loglik tasks: minus the gold NLL per token
    correct            1.0 or 0.0 (choice tasks; generate tasks decode greedily)
    - lambda * blocks / L                 compute penalty
    -inf if blocks > budget               the optional hard budget

**Null labels** (``null_seed``, choice tasks only): the same objective with each sample's label
replaced by a seeded random *wrong* option (``null_option``). A search run against null labels
measures how far chance alone takes an oracle: its figure is the chance level that every oracle
figure is reported beside. ``gold_index`` always holds the real answers; ``target_index`` the
labels that margins and ``correct`` are computed against.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .budget import Budget
from .errors import LayerRouteError
from .executor import RouteExecutor, RouteState
from .route import Route
from .scoring import (encode_texts, gold_continuation, join_continuations, left_pad, pack_options, packed_logliks,
                      packed_targets, task_prompts)
from .tasks.base import LETTERS, stable_rng

REWARDS = ("margin", "correct")


class ObjectiveError(LayerRouteError, ValueError):
    """An objective setting that cannot work: unknown reward, bad lambda, no examples, ..."""


@dataclass
class Scores:
    """Per (sample, route) pair: ``margin`` and ``reward`` [N] float, ``correct`` [N] bool (False
    where unknown, see ``Objective.has_correct``), ``blocks`` [N] long."""

    margin: torch.Tensor
    correct: torch.Tensor
    blocks: torch.Tensor
    reward: torch.Tensor


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

    def nbytes(self) -> int:
        return self.state.hidden.numel() * self.state.hidden.element_size()


class Objective:
    """Rewards of routes on the examples of one task; see the module docstring."""

    def __init__(self, executor: RouteExecutor, tokenizer, task, examples=None, *, reward: str = "margin",
                 lam: float = 0.0, budget: Budget | str | float | None = None, chat: bool = True,
                 batch_rows: int = 64, pack: bool = True, null_seed: int | None = None):
        if reward not in REWARDS:
            raise ObjectiveError(f"unknown reward {reward!r}; use one of {', '.join(REWARDS)}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ObjectiveError(f"lambda must be a finite number, got {lam!r}")
        if reward == "correct" and task.kind == "loglik":
            raise ObjectiveError(f"task {task.name} is a log-likelihood task with no notion of correct; "
                                 f"use reward='margin'")
        if null_seed is not None and task.kind != "choice":
            raise ObjectiveError(f"null labels need a task with options; task {task.name} is a {task.kind} task, "
                                 f"so it has no wrong option to use as a null label")
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise ObjectiveError(f"batch_rows must be a positive integer, got {batch_rows!r}")
        self.executor, self.tokenizer, self.task = executor, tokenizer, task
        self.examples = list(task.examples if examples is None else examples)
        if not self.examples:
            raise ObjectiveError(f"task {task.name} has no examples to score")
        self.reward_kind, self.lam, self.chat, self.batch_rows = reward, float(lam), chat, batch_rows
        self.null_seed = null_seed
        self.budget = Budget.parse(budget)
        L = executor.num_layers
        self.max_blocks = self.budget.max_blocks(L) if self.budget else None
        if self.max_blocks is not None and self.max_blocks > 4 * L:
            raise ObjectiveError(f"budget {self.budget.describe()} is far beyond the model's {L} blocks")
        self.has_correct = task.kind in ("choice", "generate")
        self.cache: dict = {}  # work that searchers reuse across calls (e.g. greedy's removal order)
        self.prompts = task_prompts(tokenizer, task, self.examples, chat)
        self.packed = pack and task.kind == "choice" and task.choice_scoring == "cloze"
        self._tokenize()
        if self.packed and not _packing_is_exact(self):
            self.packed = False
            self._tokenize()

    @classmethod
    def from_task(cls, executor: RouteExecutor, tokenizer, task, split: str = "search", limit: int | None = None,
                  seed: int = 0, option: str = "--limit", **kwargs) -> Objective:
        """An objective over the first ``limit`` examples of ``task``'s ``split`` (search by default)."""
        from .evaluation import limit_examples

        examples = limit_examples(task.split(split, seed).examples, limit, option)
        if not examples:
            raise ObjectiveError(f"task {task.name} has no examples in its {split!r} split (seed {seed})")
        return cls(executor, tokenizer, task, examples, **kwargs)

    # ---- preparation ------------------------------------------------------------------------
    def _tokenize(self) -> None:
        """Rows, their continuation lengths, and the gold row of each sample, once."""
        task, tok = self.task, self.tokenizer
        seqs, cont, owner, segs = [], [], [], []
        self.letter_ids = self.segments = None
        if task.kind == "choice" and task.choice_scoring == "letter":
            letters = LETTERS[: max(len(ex.choices) for ex in self.examples)]
            self.letter_ids = torch.tensor([encode_texts(tok, [" " + x])[0][-1] for x in letters])
        for i, (ex, prompt) in enumerate(zip(self.examples, self.prompts)):
            if task.kind == "choice" and task.choice_scoring == "cloze":
                conts = [" " + opt for opt in ex.choices]
            elif self.letter_ids is not None:
                conts = [None]
            else:
                conts = [gold_continuation(task, ex)]
            if conts == [None]:
                seqs += encode_texts(tok, [prompt])
                cont.append(0)
            elif self.packed:  # one row: the prompt once, then every option (see RouteExecutor.begin)
                rows, lens = join_continuations(tok, [prompt] * len(conts), conts)
                shared = len(rows[0]) - lens[0]
                seq, seg = pack_options(rows[0][:shared], [r[shared:] for r in rows])
                seqs.append(seq)
                segs.append(seg)
                cont.append(sum(lens))
                owner.append(i)
                continue
            else:
                rows, lens = join_continuations(tok, [prompt] * len(conts), conts)
                seqs += rows
                cont += lens
            owner += [i] * len(conts)
        empty = next((self.examples[owner[r]].uid for r, q in enumerate(seqs) if len(q) == cont[r]), None)
        if empty is not None:
            raise ObjectiveError(f"example {empty} of task {task.name} renders to an empty prompt")
        self.ids, self.mask = left_pad(seqs, tok, "cpu")
        self.row_tokens = torch.tensor([len(s) for s in seqs])
        self.cont_len = torch.tensor(cont)
        self.owner = torch.tensor(owner)
        # the gold option (choice tasks: among the letters or the cloze rows), else the one row
        self.gold_index = torch.tensor([LETTERS.index(ex.answer) if task.kind == "choice" else 0
                                        for ex in self.examples])
        self.target_index = self.gold_index if self.null_seed is None else torch.tensor(
            [null_option(ex, self.null_seed) for ex in self.examples])
        self.first_row = torch.tensor([0] + torch.bincount(self.owner, minlength=len(self.examples)).cumsum(0)
                                      .tolist()[:-1])
        self.num_rows = torch.bincount(self.owner, minlength=len(self.examples))
        self.keep = int(self.cont_len.max()) + 1 if self.letter_ids is None else 1
        if self.packed:
            self.segments, self.option_pos, self.option_target, self.option_valid = packed_targets(self.ids, segs,
                                                                                                   self.keep)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_layers(self) -> int:
        return self.executor.num_layers

    def rows_of(self, samples: Sequence[int]) -> torch.Tensor:
        return torch.cat([torch.arange(int(self.first_row[i]), int(self.first_row[i] + self.num_rows[i]))
                          for i in samples])

    def tokens(self, samples: Sequence[int]) -> torch.Tensor:
        """Real tokens (all rows) of each sample: the unit that block executions multiply."""
        return torch.tensor([int(self.row_tokens[self.rows_of([i])].sum()) for i in samples])

    # ---- the walk ---------------------------------------------------------------------------
    def begin(self, samples: Sequence[int]) -> PrefixState:
        """Embedded rows of ``samples``, no block run yet."""
        samples = [self._check_sample(i) for i in samples]
        rows = self.rows_of(samples)
        dev = self.executor.device
        segments = None if self.segments is None else self.segments[rows]
        state = self.executor.begin(self.ids[rows].to(dev), self.mask[rows].to(dev), segments=segments)
        return PrefixState(samples, state, [0] * len(samples), self.num_rows[samples].tolist())

    def advance(self, prefix: PrefixState, chains: Sequence[Sequence[int]], record: list | None = None) -> PrefixState:
        """Run one chain of blocks per sample of ``prefix`` (chains may be empty). ``record``, a list
        of per-row lists, collects each row's hidden state after each of its blocks."""
        if len(chains) != len(prefix.samples):
            raise ObjectiveError(f"got {len(chains)} chains for {len(prefix.samples)} samples")
        row_chains = [tuple(c) for c, n in zip(chains, prefix.sizes) for _ in range(n)]
        state = self.executor.advance(prefix.state, row_chains, record=record)
        return PrefixState(prefix.samples, state, [b + len(c) for b, c in zip(prefix.blocks, chains)],
                           prefix.sizes)

    def finish(self, prefix: PrefixState) -> Scores:
        """Scores of the routes that end at ``prefix``."""
        logits = self.executor.finish(prefix.state, self.keep).float()  # [R, keep, V]
        rows = self.rows_of(prefix.samples)
        return self._scores(prefix.samples, rows, logits, torch.tensor(prefix.blocks))

    def _scores(self, samples, rows, logits, blocks) -> Scores:
        logp = torch.log_softmax(logits, dim=-1)
        target = self.target_index[torch.tensor(samples)].tolist()
        if self.task.kind == "choice":  # the scorer's rule: the highest log-likelihood, first on ties
            options = self._option_logliks(samples, rows, logp)
            margin = torch.stack([_margin(lp, t) for lp, t in zip(options, target)])
            correct = [int(lp.argmax()) == t for lp, t in zip(options, target)]
        else:  # minus the gold NLL per token
            margin = torch.stack([part[0] / n[0] for part, n in self._continuation_logliks(samples, rows, logp)])
            correct = [False] * len(samples)
        return self.reward_of(margin.cpu(), torch.tensor(correct, dtype=torch.bool), blocks)

    def _option_logliks(self, samples, rows, logp) -> list[torch.Tensor]:
        """Per sample of a choice task: the log-likelihood of each option under the task's scoring."""
        if self.letter_ids is not None:  # one row per sample: letters at the last position
            lp = logp[:, -1][:, self.letter_ids]  # [N, letters]
            return [lp[j, :len(self.examples[i].choices)] for j, i in enumerate(samples)]
        return [part for part, _ in self._continuation_logliks(samples, rows, logp)]

    def option_logliks(self, prefix: PrefixState) -> torch.Tensor:
        """[N, K] log-likelihood of each option of the routes that end at ``prefix`` (choice tasks;
        -inf beyond a sample's options): one forward gives the margin against any label."""
        if self.task.kind != "choice":
            raise ObjectiveError(f"task {self.task.name} is a {self.task.kind} task: it has no options")
        logits = self.executor.finish(prefix.state, self.keep).float()
        rows = self.rows_of(prefix.samples)
        options = self._option_logliks(prefix.samples, rows, torch.log_softmax(logits, dim=-1))
        out = torch.full((len(options), max(len(o) for o in options)), -math.inf)
        for j, o in enumerate(options):
            out[j, :len(o)] = o.cpu()
        return out

    def _continuation_logliks(self, samples, rows, logp) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample: the summed log-likelihood of each continuation (cloze: each option) and its tokens."""
        dev, out = logp.device, []
        if self.packed:  # one row per sample
            option_lp, lens = packed_logliks(logp, self.option_pos[rows], self.option_target[rows],
                                             self.option_valid[rows])  # [R, K]
            return [(option_lp[j, :len(self.examples[i].choices)], lens[j, :len(self.examples[i].choices)])
                    for j, i in enumerate(samples)]
        targets = self.ids[rows].to(dev)[:, -self.keep + 1:]  # [R, keep-1]
        tok_lp = logp[:, :-1].gather(-1, targets[..., None]).squeeze(-1)
        n = self.cont_len[rows].to(dev)
        in_cont = torch.arange(self.keep - 1, device=dev)[None, :] >= (self.keep - 1 - n[:, None])
        row_lp, r = (tok_lp * in_cont).sum(-1), 0
        for i in samples:
            k = int(self.num_rows[i])
            out.append((row_lp[r:r + k], n[r:r + k]))
            r += k
        return out

    def continuation_logliks(self, samples: Sequence[int], chains) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per (sample, route) pair: the summed log-likelihood of each continuation (a cloze
        question's options; else the gold) and its token count, batched as ``score`` is."""
        if self.letter_ids is not None:
            raise ObjectiveError(f"task {self.task.name} scores letters, not continuations")
        chains = [c.layers if isinstance(c, Route) else tuple(int(b) for b in c) for c in chains]
        out, j = [], 0
        for chunk in self.batches(samples):
            state = self.advance(self.begin(chunk), chains[j:j + len(chunk)])
            logits = self.executor.finish(state.state, self.keep).float()
            out += self._continuation_logliks(chunk, self.rows_of(chunk), torch.log_softmax(logits, dim=-1))
            j += len(chunk)
        return out

    def reward_of(self, margin, correct, blocks) -> Scores:
        """Scores from margins, correctness and blocks (which may be fractional): the reward formula."""
        base = correct.float() if self.reward_kind == "correct" else margin
        reward = base - self.lam * blocks.float() / self.num_layers
        if self.max_blocks is not None:
            reward = torch.where(blocks > self.max_blocks, torch.full_like(reward, -math.inf), reward)
        return Scores(margin, correct, blocks, reward)

    # ---- one call -----------------------------------------------------------------------------
    def score(self, samples: Sequence[int], chains: Sequence[Sequence[int] | Route]) -> Scores:
        """Scores of route ``chains[j]`` on sample ``samples[j]``, batched by rows."""
        if len(samples) != len(chains):
            raise ObjectiveError(f"got {len(samples)} samples but {len(chains)} routes")
        if not samples:
            raise ObjectiveError("nothing to score: no (sample, route) pairs given")
        chains = [c.layers if isinstance(c, Route) else tuple(int(b) for b in c) for c in chains]
        if self.reward_kind == "correct" and self.task.kind == "generate":
            return self._score_generated(samples, chains)
        parts, j = [], 0
        for chunk in self.batches(samples):
            prefix = self.begin(chunk)
            parts.append(self.finish(self.advance(prefix, chains[j:j + len(chunk)])))
            j += len(chunk)
        return Scores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("margin", "correct", "blocks", "reward")))

    def batches(self, samples: Sequence[int]) -> Iterator[list[int]]:
        """Consecutive chunks of ``samples`` of at most ``batch_rows`` rows (at least one sample)."""
        chunk, rows = [], 0
        for i in samples:
            n = int(self.num_rows[self._check_sample(i)])
            if chunk and rows + n > self.batch_rows:
                yield chunk
                chunk, rows = [], 0
            chunk.append(int(i))
            rows += n
        if chunk:
            yield chunk

    def _score_generated(self, samples, chains) -> Scores:
        """``correct`` on generate tasks: greedy decoding along each route, then exact match."""
        from .scoring import score_batch

        fp = self.executor.fingerprint
        margin, correct = [], []
        for j in range(0, len(samples), self.batch_rows):
            idx = samples[j:j + self.batch_rows]
            routes = [Route(c, fp) for c in chains[j:j + self.batch_rows]]
            out = score_batch(self.executor, self.tokenizer, self.task, [self.examples[i] for i in idx], routes,
                              self.chat)
            margin += [-s.gold_nll for s in out]
            correct += [bool(s.correct) for s in out]
        blocks = torch.tensor([len(c) for c in chains])
        return self.reward_of(torch.tensor(margin), torch.tensor(correct, dtype=torch.bool), blocks)

    def mean_reward(self, chain: Sequence[int] | Route, samples: Sequence[int] | None = None) -> float:
        """Mean reward of one route over ``samples`` (default: all)."""
        samples = list(range(len(self))) if samples is None else list(samples)
        return float(self.score(samples, [chain] * len(samples)).reward.mean())

    def _check_sample(self, i) -> int:
        if not 0 <= int(i) < len(self.examples):
            raise ObjectiveError(f"sample index {i} is out of range: the objective has {len(self.examples)} samples")
        return int(i)


def _packing_is_exact(obj: Objective, samples: int = 4) -> bool:
    """Whether packed rows score as separate rows do on this model (identity route, first
    ``samples`` samples), checked once per executor; a model that places or masks tokens
    its own way (not by position ids and the 4D mask) gets separate rows, with a warning."""
    ex = obj.executor
    if not hasattr(ex, "_packing_exact"):
        import warnings

        n = min(samples, len(obj))
        plain = Objective(ex, obj.tokenizer, obj.task, obj.examples[:n], chat=obj.chat, pack=False,
                          null_seed=obj.null_seed)
        identity = [tuple(range(obj.num_layers))] * n
        a, b = obj.score(range(n), identity).margin, plain.score(range(n), identity).margin
        tol = 2e-3 if next(ex.model.parameters()).dtype in (torch.float32, torch.float64) else 2e-1
        ex._packing_exact = bool(torch.allclose(a, b, atol=tol, rtol=0, equal_nan=True))
        if not ex._packing_exact:
            warnings.warn(f"{type(ex.model).__name__}: options packed behind one shared prompt do not score as "
                          f"separate rows (margins {a.tolist()} against {b.tolist()}); scoring each option in its "
                          f"own row instead (slower)", stacklevel=3)
    return ex._packing_exact


def null_option(example, seed: int) -> int:
    """A seeded random wrong option of a choice ``example`` (never its answer): its null label."""
    gold = LETTERS.index(example.answer)
    wrong = [k for k in range(len(example.choices)) if k != gold]
    return wrong[stable_rng(f"null:{seed}:{example.uid}").randrange(len(wrong))]


def _margin(lp: torch.Tensor, gold: int) -> torch.Tensor:
    """Gold log-likelihood minus the best wrong option's."""
    others = torch.cat([lp[:gold], lp[gold + 1:]])
    return lp[gold] - others.max()
