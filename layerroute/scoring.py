"""Score task examples along routes, in padded batches.

Three kinds of scoring (see ``layerroute.tasks.Task.kind``):

* ``choice``: multiple choice, by the answer letter (the next-token log-prob of `` A``..
  `` D`` after the answer prefix) or by cloze (the summed log-likelihood of each option's
  text as a continuation, options prefixed by one space).
* ``generate``: greedy decoding, then the task's extractor pulls the answer for exact match.
* ``loglik``: the NLL per token of the gold continuation (the dense signal for search and RL).

Every sample also gets ``gold_nll``, the NLL per token of its gold continuation, so that
search and calibration have a dense signal whatever the task kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .executor import RouteExecutor
from .route import Route
from .tasks.base import LETTERS
from .tasks.prompts import render_prompt


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


def continuation_nll(executor: RouteExecutor, tokenizer, prompts: list[str], continuations: list[str],
                     routes: list[Route]) -> tuple[list[float], list[int], list[int]]:
    """Summed NLL of each continuation after its prompt, its token count, and total tokens."""
    seqs, cont_lens = join_continuations(tokenizer, prompts, continuations)
    ids, mask = left_pad(seqs, tokenizer, executor.device)
    keep = max(cont_lens) + 1
    logits = executor(ids, mask, routes, logits_to_keep=keep).logits.float()  # [B, keep, V]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = ids[:, -keep + 1:]
    tok_lp = logp.gather(-1, targets[..., None]).squeeze(-1)  # [B, keep-1]
    nll = []
    for b, n in enumerate(cont_lens):
        nll.append(float(-tok_lp[b, -n:].sum()))
    return nll, cont_lens, [len(s) for s in seqs]


def _letter(executor, tokenizer, task, examples, prompts, routes):
    """Next-token scores of " A".." D" after the prompt; one forward gives prediction and gold NLL."""
    letters = LETTERS[: max(len(ex.choices) for ex in examples)]
    letter_ids = [encode_texts(tokenizer, [" " + x])[0][-1] for x in letters]
    seqs = encode_texts(tokenizer, prompts)
    ids, mask = left_pad(seqs, tokenizer, executor.device)
    logp = torch.log_softmax(executor(ids, mask, routes, logits_to_keep=1).logits[:, -1].float(), dim=-1)
    preds = [letters[int(i)] for i in logp[:, letter_ids].argmax(-1)]
    gold_nll = [-float(logp[b, letter_ids[LETTERS.index(ex.answer)]]) for b, ex in enumerate(examples)]
    return preds, gold_nll, [len(s) + 1 for s in seqs], [""] * len(examples)


def _cloze(executor, tokenizer, task, examples, routes, chat=True):
    """Every option as a continuation (packed behind one prompt, see ``Objective``); the lowest
    summed NLL wins (the first on ties); the gold option's NLL per token."""
    from .objective import Objective

    obj = Objective(executor, tokenizer, task, examples, chat=chat, batch_rows=sum(len(e.choices) for e in examples))
    preds, gold_nll = [], []
    for ex, (lp, n) in zip(examples, obj.continuation_logliks(range(len(examples)), routes)):
        g = LETTERS.index(ex.answer)
        preds.append(LETTERS[int((-lp).argmin())])
        gold_nll.append(float(-lp[g] / n[g]))
    return preds, gold_nll, obj.tokens(range(len(examples))).tolist(), [""] * len(examples)


def gold_nll_per_token(executor, tokenizer, task, examples, prompts, routes):
    """NLL per token of each gold continuation, and the tokens that took."""
    golds = [gold_continuation(task, ex) for ex in examples]
    nll, lens, tokens = continuation_nll(executor, tokenizer, prompts, golds, routes)
    return [n / max(k, 1) for n, k in zip(nll, lens)], tokens


def _generate(executor, tokenizer, task, examples, prompts, routes):
    """Greedy decoding, then the task's extractor; the gold NLL comes from a separate pass."""
    from .tasks.extract import extract_answer

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
    if task.kind == "choice" and task.choice_scoring == "cloze":  # the Objective renders and packs the prompts
        preds, gold_nll, tokens, texts = _cloze(executor, tokenizer, task, examples, routes, chat)
    else:
        prompts = task_prompts(tokenizer, task, examples, chat)
        if task.kind == "loglik":  # no accuracy: the NLL is the score
            gold_nll, tokens = gold_nll_per_token(executor, tokenizer, task, examples, prompts, routes)
            preds, texts = [f"{x:.4f}" for x in gold_nll], [""] * len(examples)
        else:
            scorer = _generate if task.kind == "generate" else _letter
            preds, gold_nll, tokens, texts = scorer(executor, tokenizer, task, examples, prompts, routes)
    correct = [None if task.kind == "loglik" else p == ex.answer for p, ex in zip(preds, examples)]
    return [SampleScore(ex.uid, c, p, ex.answer, nll, r.cost, t, o)
            for ex, c, p, nll, r, t, o in zip(examples, correct, preds, gold_nll, routes, tokens, texts)]
