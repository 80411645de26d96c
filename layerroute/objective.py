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

Prefix states (``PrefixState``) continue any route that shares their blocks; the objective owns the
one cache of them (``prefixes``: an LRU of states by (samples, chain) under a byte cap) that MCTS,
Optuna, greedy and the env use. Work computed once per objective (the last-token states, a
searcher's order, an env's projection) goes through named methods and ``memoised`` functions.
Token rows and the reading of logits (letter margins, continuation log-likelihoods) are
``layerroute.scoring``'s, shared with ``evaluate``.

**Null labels** (``null_seed``, choice tasks only): the same objective with each sample's label
replaced by a seeded random *wrong* option (``null_option``). A search run against null labels
measures how far chance alone takes an oracle: its figure is the chance level that every oracle
figure is reported beside. ``gold_index`` always holds the real answers; ``target_index`` the
labels that margins and ``correct`` are computed against.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .budget import Budget
from .evaluation import limit_examples
from .executor import RouteExecutor
from .prefix import DEFAULT_CACHE_BYTES, PrefixCache, PrefixState
from .route import Route
from .scoring import (ScoringError, continuation_logliks, encode_texts, left_pad, margin, option_logliks, score_batch,
                      scoring_rows, task_prompts)
from .tasks.base import LETTERS, stable_rng

REWARDS = ("margin", "correct")
__all__ = ["Objective", "ObjectiveError", "PrefixCache", "PrefixState", "REWARDS", "Scores", "memoised",
           "null_option"]


class ObjectiveError(ScoringError):
    """An objective setting that cannot work: unknown reward, bad lambda, no examples, ..."""


@dataclass
class Scores:
    """Per (sample, route) pair: ``margin`` and ``reward`` [N] float, ``correct`` [N] bool (False
    where unknown, see ``Objective.has_correct``), ``blocks`` [N] long."""

    margin: torch.Tensor
    correct: torch.Tensor
    blocks: torch.Tensor
    reward: torch.Tensor


def memoised(fn):
    """``fn(objective, *args)`` computed once per objective and (hashable) arguments, and kept on the
    objective: the named work that searchers and envs share (a projection, a removal order, ...).
    ``fn.remember(objective, value, *args)`` sets what a call would return (a resumed run)."""
    signature = inspect.signature(fn)

    def key(obj, args) -> tuple:
        bound = signature.bind(obj, *args)
        bound.apply_defaults()
        return (fn.__module__, fn.__qualname__, tuple(bound.arguments.values())[1:])

    @functools.wraps(fn)
    def wrapper(obj, *args):
        k = key(obj, args)
        if k not in obj._memo:
            obj._memo[k] = fn(obj, *args)
        return obj._memo[k]

    wrapper.remember = lambda obj, value, *args: obj._memo.__setitem__(key(obj, args), value)
    return wrapper


class Objective:
    """Rewards of routes on the examples of one task; see the module docstring."""

    def __init__(self, executor: RouteExecutor, tokenizer, task, examples=None, *, reward: str = "margin",
                 lam: float = 0.0, budget: Budget | str | float | None = None, chat: bool = True,
                 batch_rows: int = 64, pack: bool = True, null_seed: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
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
        self.prefixes = PrefixCache(cache_bytes)  # the one prefix-state cache (MCTS, Optuna, greedy, the env)
        self._memo: dict = {}  # what ``memoised`` functions computed on this objective
        self.prompts = task_prompts(tokenizer, task, self.examples, chat)
        self._tokenize(pack)

    @classmethod
    def from_task(cls, executor: RouteExecutor, tokenizer, task, split: str = "search", limit: int | None = None,
                  seed: int = 0, option: str = "--limit", **kwargs) -> Objective:
        """An objective over the first ``limit`` examples of ``task``'s ``split`` (search by default)."""
        examples = limit_examples(task.split(split, seed).examples, limit, option)
        if not examples:
            raise ObjectiveError(f"task {task.name} has no examples in its {split!r} split (seed {seed})")
        return cls(executor, tokenizer, task, examples, **kwargs)

    # ---- preparation ------------------------------------------------------------------------
    def _tokenize(self, pack: bool) -> None:
        """Rows (``scoring.Rows``: one per sample, or per option), and the gold row of each sample, once."""
        self.rows = rows = scoring_rows(self.executor, self.tokenizer, self.task, self.examples, self.prompts, pack)
        empty = rows.empty_sample()
        if empty is not None:
            raise ObjectiveError(f"example {self.examples[empty].uid} of task {self.task.name} renders to an "
                                 f"empty prompt")
        self.ids, self.mask, self.row_tokens, self.cont_len = rows.ids, rows.mask, rows.row_tokens, rows.cont_len
        self.owner, self.first_row, self.num_rows, self.keep = rows.owner, rows.first_row, rows.num_rows, rows.keep
        self.letter_ids, self.packed, self.segments = rows.letter_ids, rows.packed, rows.segments
        # the gold option (choice tasks: among the letters or the cloze rows), else the one row
        self.gold_index = torch.tensor([LETTERS.index(ex.answer) if self.task.kind == "choice" else 0
                                        for ex in self.examples])
        self.target_index = self.gold_index if self.null_seed is None else torch.tensor(
            [null_option(ex, self.null_seed) for ex in self.examples])

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_layers(self) -> int:
        return self.executor.num_layers

    def rows_of(self, samples: Sequence[int]) -> torch.Tensor:
        return self.rows.rows_of(samples)

    def tokens(self, samples: Sequence[int]) -> torch.Tensor:
        """Real tokens (all rows) of each sample: the unit that block executions multiply."""
        return self.rows.tokens(samples)

    # ---- memoised views of the examples -------------------------------------------------------
    def prompt_mask(self) -> torch.Tensor:
        """[R, W] bool: the prompt's real tokens of every row (the continuation excluded)."""
        if "prompt_mask" not in self._memo:
            width = self.ids.shape[1]
            cols = torch.arange(width)[None, :]
            self._memo["prompt_mask"] = self.mask.bool() & (cols < width - self.cont_len[:, None])
        return self._memo["prompt_mask"]

    def last_token_states(self, batch_size: int = 8) -> torch.Tensor:
        """[L+1, N, H] identity-route hidden states at each prompt's last token (computed once)."""
        if "last_token_states" not in self._memo:
            ids_all, parts = encode_texts(self.tokenizer, self.prompts), []
            for i in range(0, len(ids_all), batch_size):
                ids, mask = left_pad(ids_all[i:i + batch_size], self.tokenizer, self.executor.device)
                hs = self.executor(ids, mask, output_hidden_states=True, logits_to_keep=1).hidden_states
                parts.append(torch.stack([h[:, -1].float() for h in hs]))
            self._memo["last_token_states"] = torch.cat(parts, dim=1)
        return self._memo["last_token_states"]

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

    def _logp(self, prefix: PrefixState) -> torch.Tensor:
        """Log-probs [R, keep, V] of the routes that end at ``prefix``."""
        return torch.log_softmax(self.executor.finish(prefix.state, self.keep).float(), dim=-1)

    def finish(self, prefix: PrefixState) -> Scores:
        """Scores of the routes that end at ``prefix``."""
        samples, logp = prefix.samples, self._logp(prefix)
        rows = self.rows_of(samples)
        target = self.target_index[torch.tensor(samples)].tolist()
        if self.task.kind == "choice":  # the scorer's rule: the highest log-likelihood, first on ties
            options = option_logliks(self.rows, samples, rows, logp)
            margins = torch.stack([margin(lp, t) for lp, t in zip(options, target)])
            correct = [int(lp.argmax()) == t for lp, t in zip(options, target)]
        else:  # minus the gold NLL per token
            margins = torch.stack([part[0] / n[0] for part, n in continuation_logliks(self.rows, samples, rows, logp)])
            correct = [False] * len(samples)
        return self.reward_of(margins.cpu(), torch.tensor(correct, dtype=torch.bool), torch.tensor(prefix.blocks))

    def option_logliks(self, prefix: PrefixState) -> torch.Tensor:
        """[N, K] log-likelihood of each option of the routes that end at ``prefix`` (choice tasks;
        -inf beyond a sample's options): one forward gives the margin against any label."""
        if self.task.kind != "choice":
            raise ObjectiveError(f"task {self.task.name} is a {self.task.kind} task: it has no options")
        options = option_logliks(self.rows, prefix.samples, self.rows_of(prefix.samples), self._logp(prefix))
        out = torch.full((len(options), max(len(o) for o in options)), -math.inf)
        for j, o in enumerate(options):
            out[j, :len(o)] = o.cpu()
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
            out += continuation_logliks(self.rows, chunk, self.rows_of(chunk), self._logp(state))
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


def null_option(example, seed: int) -> int:
    """A seeded random wrong option of a choice ``example`` (never its answer): its null label."""
    gold = LETTERS.index(example.answer)
    wrong = [k for k in range(len(example.choices)) if k != gold]
    return wrong[stable_rng(f"null:{seed}:{example.uid}").randrange(len(wrong))]
