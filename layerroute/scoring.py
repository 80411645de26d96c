"""Scoring: the one place where a route's logits become option log-likelihoods, margins and NLLs.

Three kinds of scoring (see ``layerroute.tasks.Task.kind``):

* ``choice``: multiple choice, by the answer letter (the next-token log-prob of `` A``..
  `` D`` after the answer prefix) or by cloze (the summed log-likelihood of each option's
  text as a continuation, options prefixed by one space).
* ``generate``: greedy decoding, then the task's extractor pulls the answer for exact match.
* ``loglik``: the NLL per token of the gold continuation (the dense signal for search and RL).

Both ``Objective`` (many routes on one task's examples, with prefix states) and ``score_batch``
(``evaluate``'s padded batches) build their token rows with ``build_rows`` / ``task_rows`` and read
their logits with ``option_logliks`` / ``continuation_logliks`` and ``margin``: one scoring path.

A cloze question is one row: the prompt once, then every option, *packed* (each option sees the
prompt and itself only, and sits at the positions right after the prompt; see
``RouteExecutor.begin``). ``packing_is_exact`` checks that once per executor against one row per
option, the fallback.

Every sample also gets ``gold_nll``, the NLL per token of its gold continuation, so that
search and calibration have a dense signal whatever the task kind.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import LayerRouteError
from .executor import RouteExecutor
from .route import Route
from .tasks.base import LETTERS
from .tasks.extract import extract_answer
from .tasks.prompts import render_prompt


class ScoringError(LayerRouteError, ValueError):
    """Examples that cannot be scored (an example that renders to an empty prompt, ...)."""


@dataclass
class SampleScore:
    uid: str
    correct: bool | None
    prediction: str
    gold: str
    gold_nll: float  # NLL per token of the gold continuation
    blocks: int
    tokens: int  # prompt + continuation/generated tokens processed
    output: str = ""  # the generated text (generate tasks)


def gold_continuation(task, ex) -> str:
    """The text whose likelihood measures how well a route answers ``ex``."""
    if task.kind == "choice":
        i = LETTERS.index(ex.answer)
        return " " + (ex.answer if task.choice_scoring == "letter" else ex.choices[i])
    return (" " + ex.answer) if task.kind == "generate" else ex.answer


def task_prompts(tokenizer, task, examples, chat: bool = True) -> list[str]:
    """Each example's rendered prompt, ending with its answer prefix."""
    return [render_prompt(tokenizer, ex.question, chat=chat, answer_prefix=task.prefix_for(ex)) for ex in examples]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def left_pad(seqs: list[list[int]], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] token ids left-padded with the tokenizer's pad id (0 if it has none), and the mask."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def join_continuations(tokenizer, prompts: list[str], continuations: list[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt + continuation, and how many of them are the continuation's.

    The pair is tokenized as one text; where BPE merges across the boundary (the prompt's
    tokens are no longer a prefix), the continuation is tokenized on its own instead.
    """
    p_ids = encode_texts(tokenizer, prompts)
    c_ids = encode_texts(tokenizer, [p + c for p, c in zip(prompts, continuations)])
    seqs, cont_lens = [], []
    for p, full, c in zip(p_ids, c_ids, continuations):
        if len(full) > len(p) and full[: len(p)] == p:
            seqs.append(full)
            cont_lens.append(len(full) - len(p))
        else:
            cont = encode_texts(tokenizer, [c])[0]
            seqs.append(p + cont)
            cont_lens.append(len(cont))
    return seqs, cont_lens


def pack_options(prefix: list[int], options: list[list[int]]) -> tuple[list[int], list[int]]:
    """One row holding ``prefix`` once, then every option's tokens, and its segment ids (0 for the
    prefix, k for option k): each option sees the prefix and itself only (``RouteExecutor.begin``)."""
    return (list(prefix) + [t for o in options for t in o],
            [0] * len(prefix) + [k + 1 for k, o in enumerate(options) for _ in o])


def packed_targets(ids: torch.Tensor, segs: list[list[int]], keep: int):
    """For left-padded packed rows ``ids`` [R, W] and their segment ids (``pack_options``):
    ``segments`` [R, W], and for option k of row r the logit positions of its tokens (within the
    last ``keep`` columns), their target ids and their validity, each [R, K, M]."""
    R, W = ids.shape
    segments = torch.zeros(R, W, dtype=torch.long)
    K = max(max(s) for s in segs)
    M = max(s.count(k) for s in segs for k in range(1, K + 1))
    pos = torch.zeros(R, K, M, dtype=torch.long)
    tgt = torch.zeros(R, K, M, dtype=torch.long)
    valid = torch.zeros(R, K, M, dtype=torch.bool)
    off = W - keep
    for r, seg in enumerate(segs):
        start = W - len(seg)
        segments[r, start:] = torch.tensor(seg)
        last_prompt = start + seg.count(0) - 1
        for k in range(1, K + 1):
            cols = [start + c for c, g in enumerate(seg) if g == k]
            for m, col in enumerate(cols):
                pos[r, k - 1, m] = (last_prompt if m == 0 else cols[m - 1]) - off
                tgt[r, k - 1, m] = ids[r, col]
                valid[r, k - 1, m] = True
    return segments, pos, tgt, valid


def packed_logliks(logp: torch.Tensor, pos: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor):
    """From log-probs [R, keep, V] of packed rows (``packed_targets``): each option's summed
    log-likelihood and its token count, each [R, K]."""
    dev = logp.device
    pos, tgt, valid = pos.to(dev), tgt.to(dev), valid.to(dev)
    lp = logp[torch.arange(len(pos), device=dev)[:, None, None], pos, tgt]
    return (lp * valid).sum(-1), valid.sum(-1)


def packed_greedy(logp: torch.Tensor, pos: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[R, K]: whether every token of each packed option is the argmax of its position."""
    dev = logp.device
    pos, tgt, valid = pos.to(dev), tgt.to(dev), valid.to(dev)
    top = logp.argmax(-1)[torch.arange(len(pos), device=dev)[:, None, None], pos]
    return ((top == tgt) | ~valid).all(-1)


# ---- rows: the token layout both scoring paths share ----------------------------------------------
@dataclass
class Rows:
    """The token rows of some samples, left-padded to one width (see the module docstring).

    A sample is one row (a letter question: its prompt; a continuation: prompt + continuation; a
    packed cloze question: the prompt and every option), or one row per option (cloze, unpacked).
    ``ids`` / ``mask`` [R, W]; per row ``row_tokens``, ``cont_len`` (0 for a letter row) and
    ``owner`` (its sample); per sample ``first_row``, ``num_rows`` and ``choices`` (its options, 1
    for a plain continuation); ``keep`` the logit columns scoring reads; packed rows add
    ``segments`` and the option targets of ``packed_targets``."""

    ids: torch.Tensor
    mask: torch.Tensor
    row_tokens: torch.Tensor
    cont_len: torch.Tensor
    owner: torch.Tensor
    first_row: torch.Tensor
    num_rows: torch.Tensor
    choices: list[int]
    keep: int
    letter_ids: torch.Tensor | None = None
    packed: bool = False
    segments: torch.Tensor | None = None
    option_pos: torch.Tensor | None = None
    option_target: torch.Tensor | None = None
    option_valid: torch.Tensor | None = None

    def rows_of(self, samples: Sequence[int]) -> torch.Tensor:
        """Row indices of ``samples``, in order."""
        return torch.cat([torch.arange(int(self.first_row[i]), int(self.first_row[i] + self.num_rows[i]))
                          for i in samples])

    def tokens(self, samples: Sequence[int]) -> torch.Tensor:
        """Real tokens (all rows) of each sample: the unit that block executions multiply."""
        return torch.tensor([int(self.row_tokens[self.rows_of([i])].sum()) for i in samples])

    def empty_sample(self) -> int | None:
        """The first sample with a row of no prompt tokens (nothing to condition on), if any."""
        return next((int(self.owner[r]) for r in range(len(self.ids))
                     if int(self.row_tokens[r]) == int(self.cont_len[r])), None)


def build_rows(tokenizer, prompts: Sequence[str], continuations: Sequence[Sequence[str] | None], *,
               letter_ids: torch.Tensor | None = None, choices: Sequence[int] | None = None,
               packed: bool = False) -> Rows:
    """Rows of samples ``prompts[i]`` + each of ``continuations[i]`` (None: the prompt alone, scored by
    its next token among ``letter_ids``); ``packed`` puts a sample's continuations in one row."""
    seqs, cont, owner, segs = [], [], [], []
    for i, (prompt, conts) in enumerate(zip(prompts, continuations)):
        if conts is None:
            seqs += encode_texts(tokenizer, [prompt])
            cont.append(0)
            owner.append(i)
            continue
        rows, lens = join_continuations(tokenizer, [prompt] * len(conts), list(conts))
        if packed:  # one row: the prompt once, then every option (see RouteExecutor.begin)
            shared = len(rows[0]) - lens[0]
            seq, seg = pack_options(rows[0][:shared], [r[shared:] for r in rows])
            seqs.append(seq)
            segs.append(seg)
            cont.append(sum(lens))
            owner.append(i)
        else:
            seqs += rows
            cont += lens
            owner += [i] * len(conts)
    ids, mask = left_pad(seqs, tokenizer, "cpu")
    owner_t = torch.tensor(owner)
    num_rows = torch.bincount(owner_t, minlength=len(prompts))
    cont_t = torch.tensor(cont)
    keep = int(cont_t.max()) + 1 if letter_ids is None else 1
    rows = Rows(ids, mask, torch.tensor([len(s) for s in seqs]), cont_t, owner_t,
                torch.tensor([0] + num_rows.cumsum(0).tolist()[:-1]), num_rows,
                list(choices) if choices is not None else [len(c) if c is not None else 1 for c in continuations],
                keep, letter_ids, packed)
    if packed:
        rows.segments, rows.option_pos, rows.option_target, rows.option_valid = packed_targets(ids, segs, keep)
    return rows


def letter_token_ids(tokenizer, n: int) -> torch.Tensor:
    """The token ids of `` A`` .. the ``n``-th letter (the last token of each)."""
    return torch.tensor([encode_texts(tokenizer, [" " + x])[0][-1] for x in LETTERS[:n]])


def task_rows(tokenizer, task, examples, prompts: Sequence[str], packed: bool = False) -> Rows:
    """The rows that score ``examples`` of ``task`` after ``prompts``: letters, cloze options (``packed``
    behind one prompt, or one row each) or the gold continuation."""
    if task.kind == "choice" and task.choice_scoring == "letter":
        letter_ids = letter_token_ids(tokenizer, max(len(ex.choices) for ex in examples))
        return build_rows(tokenizer, prompts, [None] * len(examples), letter_ids=letter_ids,
                          choices=[len(ex.choices) for ex in examples])
    if task.kind == "choice":
        return build_rows(tokenizer, prompts, [[" " + o for o in ex.choices] for ex in examples], packed=packed)
    return build_rows(tokenizer, prompts, [[gold_continuation(task, ex)] for ex in examples])


# ---- reading logits --------------------------------------------------------------------------------
def continuation_logliks(rows: Rows, samples: Sequence[int], row_idx: torch.Tensor,
                         logp: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: the summed log-likelihood of each continuation (cloze: each option) and its token
    count, from the log-probs [R, keep, V] of its rows ``row_idx`` (in sample order)."""
    dev = logp.device
    if rows.packed:  # one row per sample
        option_lp, lens = packed_logliks(logp, rows.option_pos[row_idx], rows.option_target[row_idx],
                                         rows.option_valid[row_idx])  # [R, K]
        return [(option_lp[j, :rows.choices[i]], lens[j, :rows.choices[i]]) for j, i in enumerate(samples)]
    keep = rows.keep
    targets = rows.ids[row_idx].to(dev)[:, -keep + 1:]  # [R, keep-1]
    tok_lp = logp[:, :-1].gather(-1, targets[..., None]).squeeze(-1)
    n = rows.cont_len[row_idx].to(dev)
    in_cont = torch.arange(keep - 1, device=dev)[None, :] >= (keep - 1 - n[:, None])
    row_lp, r, out = (tok_lp * in_cont).sum(-1), 0, []
    for i in samples:
        k = int(rows.num_rows[i])
        out.append((row_lp[r:r + k], n[r:r + k]))
        r += k
    return out


def option_logliks(rows: Rows, samples: Sequence[int], row_idx: torch.Tensor, logp: torch.Tensor) -> list[torch.Tensor]:
    """Per sample of a choice task: the log-likelihood of each of its options under the task's scoring
    (the letter as the next token, or the option's text as a continuation)."""
    if rows.letter_ids is not None:  # one row per sample: letters at the last position
        lp = logp[:, -1][:, rows.letter_ids.to(logp.device)]  # [N, letters]
        return [lp[j, :rows.choices[i]] for j, i in enumerate(samples)]
    return [part for part, _ in continuation_logliks(rows, samples, row_idx, logp)]


def margin(lp: torch.Tensor, target: int) -> torch.Tensor:
    """The target option's log-likelihood minus the best other option's (> 0 exactly when the
    highest log-likelihood, the scorer's rule, picks the target; ties aside)."""
    others = torch.cat([lp[:target], lp[target + 1:]])
    return lp[target] - others.max()


def rows_logp(executor: RouteExecutor, rows: Rows, row_idx: torch.Tensor, chains) -> torch.Tensor:
    """Log-probs [R, keep, V] of rows ``row_idx`` along one chain of blocks per row, in one walk."""
    dev = executor.device
    segments = None if rows.segments is None else rows.segments[row_idx]
    state = executor.begin(rows.ids[row_idx].to(dev), rows.mask[row_idx].to(dev), segments=segments)
    state = executor.advance(state, [tuple(c) for c in chains])
    return torch.log_softmax(executor.finish(state, rows.keep).float(), dim=-1)


def _route_rows(executor: RouteExecutor, rows: Rows, routes: Sequence[Route]) -> torch.Tensor:
    """Log-probs of every row of ``rows`` (one sample per route) along its sample's route."""
    chains = [executor.route(r).layers for r in routes]
    return rows_logp(executor, rows, torch.arange(len(rows.ids)), [chains[int(i)] for i in rows.owner])


# ---- packing, checked once per executor ------------------------------------------------------------
_PACKING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # executor -> packed rows score exactly


def packing_verdict(executor: RouteExecutor) -> bool | None:
    """Whether packed rows score exactly on ``executor``, once someone checked (None before)."""
    return _PACKING.get(executor)


def set_packing_verdict(executor: RouteExecutor, exact: bool) -> None:
    """Record a packing check's verdict for ``executor`` (every scorer of this executor then uses it)."""
    _PACKING[executor] = bool(exact)


def packing_is_exact(executor: RouteExecutor, tokenizer, task, examples, prompts: Sequence[str],
                     samples: int = 4) -> bool:
    """Whether packed cloze rows score as separate rows do on this model (identity route, the first
    ``samples`` examples), checked once per executor; a model that places or masks tokens its own
    way (not by position ids and the 4D mask) gets separate rows, with a warning."""
    if executor in _PACKING:
        return _PACKING[executor]
    n = min(samples, len(examples))
    identity = [tuple(range(executor.num_layers))] * n
    found = []
    for packed in (True, False):
        rows = task_rows(tokenizer, task, examples[:n], prompts[:n], packed)
        logp = rows_logp(executor, rows, torch.arange(len(rows.ids)), [identity[int(i)] for i in rows.owner])
        options = option_logliks(rows, range(n), torch.arange(len(rows.ids)), logp)
        found.append(torch.stack([margin(lp, LETTERS.index(ex.answer)) for lp, ex in zip(options, examples)]))
    a, b = found
    tol = 2e-3 if next(executor.model.parameters()).dtype in (torch.float32, torch.float64) else 2e-1
    exact = bool(torch.allclose(a, b, atol=tol, rtol=0, equal_nan=True))
    set_packing_verdict(executor, exact)
    if not exact:
        warnings.warn(f"{type(executor.model).__name__}: options packed behind one shared prompt do not score as "
                      f"separate rows (margins {a.tolist()} against {b.tolist()}); scoring each option in its "
                      f"own row instead (slower)", stacklevel=3)
    return exact


def scoring_rows(executor: RouteExecutor, tokenizer, task, examples, prompts: Sequence[str],
                 pack: bool = True) -> Rows:
    """``task_rows`` with cloze options packed where ``pack`` and this executor scores packed rows exactly."""
    packed = pack and task.kind == "choice" and task.choice_scoring == "cloze"
    if packed:
        packed = packing_is_exact(executor, tokenizer, task, examples, prompts)
    return task_rows(tokenizer, task, examples, prompts, packed)


# ---- evaluate's batches ----------------------------------------------------------------------------
def continuation_nll(executor: RouteExecutor, tokenizer, prompts: list[str], continuations: list[str],
                     routes: list[Route]) -> tuple[list[float], list[int], list[int]]:
    """Summed NLL of each continuation after its prompt, its token count, and total tokens."""
    rows = build_rows(tokenizer, prompts, [[c] for c in continuations])
    parts = continuation_logliks(rows, range(len(prompts)), torch.arange(len(prompts)),
                                 _route_rows(executor, rows, routes))
    return [float(-lp[0]) for lp, _ in parts], [int(n[0]) for _, n in parts], rows.row_tokens.tolist()


def gold_nll_per_token(executor, tokenizer, task, examples, prompts, routes):
    """NLL per token of each gold continuation, and the tokens that took."""
    golds = [gold_continuation(task, ex) for ex in examples]
    nll, lens, tokens = continuation_nll(executor, tokenizer, prompts, golds, routes)
    return [n / max(k, 1) for n, k in zip(nll, lens)], tokens


def _choice(executor, tokenizer, task, examples, prompts, routes):
    """The option with the highest log-likelihood (the first on ties) and the gold option's NLL (per
    token for cloze): letters at the next token, or every option as a continuation (packed)."""
    rows = scoring_rows(executor, tokenizer, task, examples, prompts)
    if rows.empty_sample() is not None:
        raise ScoringError(f"example {examples[rows.empty_sample()].uid} of task {task.name} renders to an empty "
                           f"prompt")
    everything = torch.arange(len(rows.ids))
    logp = _route_rows(executor, rows, routes)
    if rows.letter_ids is not None:
        options = option_logliks(rows, range(len(examples)), everything, logp)
        lens = [torch.ones_like(lp) for lp in options]
        tokens = (rows.row_tokens + 1).tolist()
    else:
        options, lens = zip(*continuation_logliks(rows, range(len(examples)), everything, logp))
        tokens = rows.tokens(range(len(examples))).tolist()
    gold = [LETTERS.index(ex.answer) for ex in examples]
    preds = [LETTERS[int(lp.argmax())] for lp in options]
    gold_nll = [float(-lp[g] / n[g]) for lp, n, g in zip(options, lens, gold)]
    return preds, gold_nll, tokens, [""] * len(examples)


def _generate(executor, tokenizer, task, examples, prompts, routes):
    """Greedy decoding, then the task's extractor; the gold NLL comes from a separate pass."""
    gold_nll, tokens = gold_nll_per_token(executor, tokenizer, task, examples, prompts, routes)
    ids, mask = left_pad(encode_texts(tokenizer, prompts), tokenizer, executor.device)
    out = executor.generate(ids, mask, routes, max_new_tokens=task.max_new_tokens,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out.sequences[:, ids.shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    eos = tokenizer.eos_token_id
    for b, gen in enumerate(new.tolist()):
        tokens[b] += (gen.index(eos) + 1) if eos in gen else len(gen)
    return [extract_answer(task.extract, t) or "" for t in texts], gold_nll, tokens, texts


def score_batch(executor: RouteExecutor, tokenizer, task, examples, routes: list[Route],
                chat: bool = True) -> list[SampleScore]:
    """Score ``examples`` along their ``routes`` (one per example) in one padded batch."""
    prompts = task_prompts(tokenizer, task, examples, chat)
    if task.kind == "loglik":  # no accuracy: the NLL is the score
        gold_nll, tokens = gold_nll_per_token(executor, tokenizer, task, examples, prompts, routes)
        preds, texts = [f"{x:.4f}" for x in gold_nll], [""] * len(examples)
    else:
        scorer = _generate if task.kind == "generate" else _choice
        preds, gold_nll, tokens, texts = scorer(executor, tokenizer, task, examples, prompts, routes)
    correct = [None if task.kind == "loglik" else p == ex.answer for p, ex in zip(preds, examples)]
    return [SampleScore(ex.uid, c, p, ex.answer, nll, r.cost, t, o)
            for ex, c, p, nll, r, t, o in zip(examples, correct, preds, gold_nll, routes, tokens, texts)]
