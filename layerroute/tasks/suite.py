"""A generated suite of very easy cloze questions, sized for SmolLM2-135M-Instruct.

Four sub-tasks (capitals, opposites, arithmetic, comparison), each a ``choice`` task scored by
cloze: four one-word options (gold plus three distractors from the same sub-task's answers),
stored without a leading space and scored as the continuation ``" " + option`` after the
answer prefix. Each sub-task has its own prefix ("The capital is", ...), set per example so that
an example reads the same in ``suite`` and in its sub-task: on SmolLM2-135M at full depth they
beat a generic "The answer is" (95% vs 79% over the suite). The examples (uids, questions) are fixed; ``seed`` only
picks the distractors and their order, per example, from a hash of ``(seed, uid)``.
"""

from __future__ import annotations

from .base import Example, Task, TaskError, cloze_example, stable_rng

SUBTASKS = ("capitals", "opposites", "arithmetic", "comparison")
PREFIXES = {"capitals": "The capital is", "opposites": "The opposite is", "arithmetic": "The answer is",
            "comparison": "The larger number is"}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "the Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Tunisia": "Tunis",
    "Algeria": "Algiers", "Senegal": "Dakar", "Uganda": "Kampala", "Japan": "Tokyo", "China": "Beijing",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Australia": "Canberra", "New Zealand": "Wellington",
    "Canada": "Ottawa", "the United States": "Washington", "Cuba": "Havana", "Jamaica": "Kingston",
    "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Venezuela": "Caracas", "Brazil": "Brasilia",
    "Ecuador": "Quito", "Uruguay": "Montevideo",
}

# Question words and answers are disjoint, and no answer is a synonym of another (so no distractor is right).
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad",
    "open": "closed", "young": "old", "tall": "short", "light": "dark", "wet": "dry", "full": "empty",
    "early": "late", "hard": "soft", "rich": "poor", "strong": "weak", "thick": "thin", "loud": "quiet",
    "win": "lose", "in": "out", "push": "pull", "left": "right", "buy": "sell", "clean": "dirty",
    "good": "bad", "true": "false", "first": "last", "front": "back", "give": "take", "love": "hate",
    "always": "never", "north": "south", "east": "west", "boy": "girl", "man": "woman", "king": "queen",
    "asleep": "awake", "alive": "dead", "pretty": "ugly", "smooth": "rough", "sweet": "sour",
    "cheap": "expensive", "deep": "shallow", "friend": "enemy", "question": "answer", "remember": "forget",
    "laugh": "cry", "high": "low", "near": "far", "safe": "dangerous", "come": "go", "black": "white",
    "before": "after", "top": "bottom", "polite": "rude", "accept": "refuse", "add": "subtract",
    "entrance": "exit", "future": "past", "maximum": "minimum", "wild": "tame", "sick": "healthy",
    "war": "peace",
}


def _items(sub: str) -> list[tuple[str, str, str, list[str]]]:
    """(uid key, question, gold, distractor pool) of every example of sub-task ``sub``."""
    if sub == "capitals":
        pool = list(CAPITALS.values())
        return [(c.removeprefix("the "), f"What is the capital of {c}?", cap, pool) for c, cap in CAPITALS.items()]
    if sub == "opposites":
        pool = list(OPPOSITES.values())
        return [(w, f'What is the opposite of "{w}"?', o, pool) for w, o in OPPOSITES.items()]
    if sub == "arithmetic":
        pool = [str(s) for s in range(2, 19)]
        return [(f"{a}+{b}", f"What is {a} + {b}?", str(a + b), pool) for a in range(1, 10) for b in range(1, 10)]
    if sub == "comparison":  # the smaller number is always one of the distractors
        return [(f"{a}vs{b}", f"Which number is larger: {a} or {b}?", str(max(a, b)),
                 [str(d) for d in range(10) if d not in (a, b)]) for a in range(10) for b in range(10) if a != b]
    raise TaskError(f"unknown suite sub-task {sub!r}; use one of {', '.join(SUBTASKS)}")


def _examples(sub: str, seed: int) -> list[Example]:
    out = []
    for key, question, gold, pool in _items(sub):
        uid = f"suite/{sub}/{key}"
        must = [str(min(map(int, key.split("vs"))))] if sub == "comparison" else []
        out.append(cloze_example(uid, question, gold, pool, stable_rng(f"suite:{seed}:{uid}"), must, PREFIXES[sub]))
    return out


def load_suite(subtask: str | None = None, seed: int = 0) -> Task:
    """The whole suite, or one sub-task (``capitals``, ``opposites``, ``arithmetic``, ``comparison``)."""
    subs = SUBTASKS if subtask is None else (subtask,)
    examples = [ex for sub in subs for ex in _examples(sub, seed)]
    name = "suite" if subtask is None else f"suite:{subtask}"
    return Task(name, "choice", tuple(examples), choice_scoring="cloze", answer_prefix="The answer is",
                source=f"layerroute.tasks.suite (generated, seed={seed})")
