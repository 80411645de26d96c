"""Harder generated cloze tasks (``gen[:<subtask>]``), sized so SmolLM2-135M lands between 30% and 80%.

Each sub-task draws its questions from a ``random.Random`` seeded by ``(seed, subtask)`` until it
has ``size`` distinct ones (default 2000), so the examples, their order and their options are a
pure function of ``seed``, and a smaller ``size`` gives a prefix of a larger one. Like the suite,
every example is a ``choice`` task scored by cloze: four one-word options (the gold and three
near misses, stored without a leading space) after a per-example answer prefix. ``gen`` mixes all
sub-tasks round-robin, so the first N examples of any split hold every sub-task alike.

Sub-tasks, with SmolLM2-135M-Instruct's full-depth accuracy on 400 test examples (seed 0;
``experiments/results/generated_tasks.md``): ``add2`` two-digit addition (47.5%), ``mul`` a
one-digit times a two- or three-digit number (46.0%), ``compare`` the largest or smallest of four
three-digit numbers (34.5%), ``numwords`` a 4-6 digit number written in words, to digits (46.5%).
"""

from __future__ import annotations

import random
from itertools import chain, zip_longest
from typing import Callable, NamedTuple

from .base import Task, TaskError, cloze_example, stable_rng

DEFAULT_SIZE = 2000


class Item(NamedTuple):
    key: str  # unique within the sub-task; the uid is gen/<subtask>/<key>
    question: str
    gold: str
    pool: tuple[str, ...]  # distractor candidates (the gold among them is ignored)
    prefix: str


def _near(gold: int, offsets, lo: int = 0) -> tuple[str, ...]:
    return tuple(str(gold + d) for d in offsets if gold + d >= lo)


def _add2(rng: random.Random) -> Item:
    """Two 2-digit numbers; distractors off by one or by ten (a dropped or extra carry)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Item(f"{a}+{b}", f"What is {a} + {b}?", str(a + b), _near(a + b, (-10, -1, 1, 10)), "The answer is")


def _compare(rng: random.Random) -> Item:
    """The largest or smallest of four 3-digit numbers; the options are the four numbers."""
    nums = rng.sample(range(100, 1000), 4)
    word = rng.choice(("largest", "smallest"))
    gold = max(nums) if word == "largest" else min(nums)
    listed = ", ".join(map(str, nums))
    return Item(f"{word}:{'-'.join(map(str, nums))}", f"Which number is the {word}: {listed}?", str(gold),
                tuple(str(n) for n in nums), f"The {word} number is")


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """``n`` (0 <= n < 10**6) in English words: 4321 -> "four thousand three hundred twenty-one"."""
    if n >= 1000:
        return f"{number_words(n // 1000)} thousand" + (f" {number_words(n % 1000)}" if n % 1000 else "")
    parts = [f"{_ONES[n // 100]} hundred"] if n >= 100 else []
    rest = n % 100
    if rest or not parts:
        parts.append(_ONES[rest] if rest < 20 else _TENS[rest // 10] + (f"-{_ONES[rest % 10]}" if rest % 10 else ""))
    return " ".join(parts)


def _numwords(rng: random.Random) -> Item:
    """A 4-6 digit number rich in zeros; distractors of the same length move a zero or swap two digits."""
    s = str(rng.randint(1, 9)) + "".join(rng.choice("0000000000123456789") for _ in range(rng.randint(3, 5)))
    moved = {(t := s[:i] + s[i + 1:])[:j] + "0" + t[j:] for i, d in enumerate(s) if d == "0" for j in range(1, len(s))}
    swapped = {s[:i] + s[i + 1] + s[i] + s[i + 2:] for i in range(1, len(s) - 1)}
    pool = (moved | swapped) - {s}
    if len(pool) < 3:
        return _numwords(rng)
    return Item(s, f"Write the number {number_words(int(s))} in digits.", s, tuple(sorted(pool)), "In digits it is")


def _mul(rng: random.Random) -> Item:
    """A 1-digit times a 2-3 digit number (either order); distractors off by 1, by 10, or one group too few."""
    small, big = rng.randint(2, 9), rng.randint(11, 199)
    a, b = (small, big) if rng.random() < 0.5 else (big, small)
    return Item(f"{a}x{b}", f"What is {a} × {b}?", str(a * b), _near(a * b, (-10, -1, 1, 10, -small)),
                "The answer is")


# name -> (draw, the most distinct examples one may ask for)
GENERATORS: dict[str, tuple[Callable[[random.Random], Item], int]] = {
    "add2": (_add2, 90 * 90),
    "mul": (_mul, 8 * 189 * 2),
    "compare": (_compare, 10 ** 6),
    "numwords": (_numwords, 10 ** 5),
}
SUBTASKS = tuple(GENERATORS)


def _subtask(sub: str, seed: int, size: int) -> list:
    draw, capacity = GENERATORS[sub]
    if size > capacity:
        raise TaskError(f"gen:{sub} has only {capacity} distinct examples; ask for size <= {capacity}")
    rng, items = stable_rng(f"gen:{seed}:{sub}"), {}
    for _ in range(50 * size + 10_000):  # a bound, in case ``capacity`` overstates what ``draw`` can make
        item = draw(rng)
        items.setdefault(item.key, item)
        if len(items) == size:
            break
    else:
        raise TaskError(f"gen:{sub} could not draw {size} distinct examples")
    out = []
    for it in items.values():
        uid = f"gen/{sub}/{it.key}"
        out.append(cloze_example(uid, it.question, it.gold, it.pool, stable_rng(f"gen:{seed}:{uid}"),
                                 answer_prefix=it.prefix))
    return out


def load_generated(subtask: str | None = None, seed: int = 0, size: int = DEFAULT_SIZE) -> Task:
    """All sub-tasks mixed, or one of them (see ``SUBTASKS``), each with ``size`` examples."""
    if subtask is not None and subtask not in GENERATORS:
        raise TaskError(f"unknown gen sub-task {subtask!r}; use one of {', '.join(SUBTASKS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TaskError(f"size must be a positive whole number of examples per sub-task, not {size!r}")
    subs = SUBTASKS if subtask is None else (subtask,)
    lists = [_subtask(sub, seed, size) for sub in subs]
    examples = [ex for ex in chain.from_iterable(zip_longest(*lists)) if ex is not None]
    return Task("gen" if subtask is None else f"gen:{subtask}", "choice", tuple(examples), choice_scoring="cloze",
                answer_prefix="The answer is", source=f"layerroute.tasks.generated (seed={seed}, size={size})")
