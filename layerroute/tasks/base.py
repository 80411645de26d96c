"""The data model: an ``Example`` is one question with its gold answer, a ``Task`` a named set of them.

Splits are a pure function of ``(seed, uid)`` (a SHA-256 hash), so they are disjoint, identical
across runs and processes, and an example keeps its split when others are added or removed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

from ..errors import TaskError
from .extract import EXTRACTORS


KINDS = ("choice", "generate", "loglik")
CHOICE_SCORINGS = ("letter", "cloze")
SPLITS = ("search", "validation", "test")
SPLIT_FRACTIONS = {"search": 0.5, "validation": 0.2, "test": 0.3}
LETTERS = "ABCDEFGHIJ"  # at most 10 options, as the scorer supports


def answer_letter(i: int) -> str:
    """The letter of option ``i``: 0 -> "A", 1 -> "B", ..."""
    if not 0 <= i < len(LETTERS):
        raise TaskError(f"option index {i} is out of range: a task has at most {len(LETTERS)} options (A-J)")
    return LETTERS[i]


def letter_index(letter: str) -> int:
    """The option index of ``letter``: "A" -> 0, "B" -> 1, ..."""
    if len(letter) != 1 or letter not in LETTERS:
        raise TaskError(f"{letter!r} is not an option letter (one of {', '.join(LETTERS)})")
    return LETTERS.index(letter)


def format_choices(question: str, choices, instruction: str = "") -> str:
    """``question``, then one "A. text" line per option, then ``instruction`` (if any)."""
    lines = [question.strip(), *(f"{answer_letter(i)}. {c}" for i, c in enumerate(choices))]
    return "\n".join(lines + ([instruction] if instruction else []))


def stable_unit(key: str) -> float:
    """A number in [0, 1) that depends only on ``key`` (never on Python's hash seed)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def stable_rng(key: str) -> random.Random:
    """A ``random.Random`` seeded from ``key`` alone (no global state, no hash seed)."""
    return random.Random(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big"))


def cloze_example(uid: str, question: str, gold: str, pool, rng: random.Random, must=(),
                  answer_prefix: str | None = None, n_options: int = 4) -> Example:
    """A choice example whose options are ``gold``, the ``must`` distractors and the rest drawn by
    ``rng`` from ``pool`` (never ``gold``, never twice), in an order shuffled by ``rng``."""
    others = sorted({p for p in pool if p != gold and p not in must})
    need = n_options - 1 - len(must)
    if need < 0 or len(others) < need or gold in must:
        raise TaskError(f"example {uid}: cannot make {n_options} distinct options from gold {gold!r}, "
                        f"{len(must)} fixed and {len(others)} other distractors")
    options = [gold, *must, *rng.sample(others, need)]
    rng.shuffle(options)
    return Example(uid, question, answer_letter(options.index(gold)), tuple(options), answer_prefix)


def split_of(uid: str, seed: int = 0) -> str:
    """The split (``search``, ``validation`` or ``test``) that ``uid`` falls in under ``seed``."""
    u, edge = stable_unit(f"{seed}:{uid}"), 0.0
    for name in SPLITS:
        edge += SPLIT_FRACTIONS[name]
        if u < edge:
            return name
    return SPLITS[-1]


@dataclass(frozen=True)
class Example:
    """One question. ``answer`` is the gold: a letter for ``choice`` tasks (indexing ``choices``),
    the canonical extracted answer for ``generate`` tasks, the gold continuation for ``loglik``."""

    uid: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    answer_prefix: str | None = None  # overrides the task's prefix for this example


@dataclass(frozen=True)
class Task:
    """A named, validated set of examples and how to score them.

    ``choice`` + ``letter``: score `` A``.. after ``answer_prefix``; ``choice`` + ``cloze``: score
    each option as the continuation ``" " + choice`` (choices are stored without a leading space).
    ``generate``: decode up to ``max_new_tokens``, apply extractor ``extract``, compare to ``answer``.
    """

    name: str
    kind: str
    examples: tuple[Example, ...]
    choice_scoring: str = "letter"
    answer_prefix: str = ""
    max_new_tokens: int = 16
    extract: str = ""
    source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "examples", tuple(self.examples))
        if self.kind not in KINDS:
            raise TaskError(f"task {self.name}: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.choice_scoring not in CHOICE_SCORINGS:
            raise TaskError(f"task {self.name}: unknown choice_scoring {self.choice_scoring!r}; "
                            f"use one of {', '.join(CHOICE_SCORINGS)}")
        if self.kind == "generate":
            if self.extract not in EXTRACTORS:
                raise TaskError(f"task {self.name}: unknown extractor {self.extract!r}; "
                                f"available: {', '.join(EXTRACTORS)}")
        seen: set[str] = set()
        for ex in self.examples:
            if ex.uid in seen:
                raise TaskError(f"task {self.name}: duplicate example uid {ex.uid!r}")
            seen.add(ex.uid)
            if self.kind == "choice":
                if not 2 <= len(ex.choices) <= len(LETTERS):
                    raise TaskError(f"task {self.name}, example {ex.uid}: {len(ex.choices)} choices; "
                                    f"a choice example needs 2 to {len(LETTERS)}")
                if ex.answer not in LETTERS[:len(ex.choices)]:
                    raise TaskError(f"task {self.name}, example {ex.uid}: answer {ex.answer!r} is not one of the "
                                    f"option letters {', '.join(LETTERS[:len(ex.choices)])}")

    def __len__(self) -> int:
        return len(self.examples)

    def prefix_for(self, example: Example) -> str:
        """The text that starts the assistant turn for ``example``."""
        return self.answer_prefix if example.answer_prefix is None else example.answer_prefix

    def split(self, which: str, seed: int = 0) -> Task:
        """The examples of split ``which`` (``search`` 50%, ``validation`` 20%, ``test`` 30%, or
        ``all``) under ``seed``, in their original order."""
        if which == "all":
            return self
        if which not in SPLITS:
            raise TaskError(f"unknown split {which!r}; use one of {', '.join(SPLITS)} or all")
        return replace(self, examples=tuple(ex for ex in self.examples if split_of(ex.uid, seed) == which))
