"""Answer extractors: pure functions ``text -> answer | None``, registered by name in ``EXTRACTORS``.

A ``generate`` task's gold is already in its extractor's canonical form (loaders run the gold
through the same extractor), so scoring is ``extract_answer(task.extract, output) == example.answer``.
"""

from __future__ import annotations

import re
from typing import Callable

from ..errors import TaskError

# A number: optional minus (not right after a digit), thousands groups or plain digits, decimals.
_NUMBER = re.compile(r"(?<!\d)-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_PLAIN = re.compile(r"(-?)(\d*)(?:\.(\d*))?")
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_LETTER = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


def normalize_number(s: str) -> str | None:
    """The canonical form of a number written as ``s`` ("1,000" -> "1000", "3.50" -> "3.5",
    "3.0" -> "3", "042" -> "42", "$5." -> "5"), or None when ``s`` is not a number."""
    s = s.strip().replace("\u2212", "-").replace(",", "").removeprefix("$").rstrip(".")
    m = _PLAIN.fullmatch(s)
    if not m or not (m.group(2) or m.group(3)):
        return None
    sign, whole, frac = m.group(1), m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    out = f"{whole}.{frac}" if frac else whole
    return out if out == "0" else sign + out


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalized (GSM8K style)."""
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    return normalize_number(found[-1]) if found else None


def integer(text: str) -> str | None:
    """The last integer-valued number in ``text``, without leading zeros (AIME style)."""
    for raw in reversed(_NUMBER.findall(text.replace("\u2212", "-"))):
        n = normalize_number(raw)
        if n is not None and "." not in n:
            return n
    return None


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def boxed_or_last_number(text: str) -> str | None:
    """The last ``\\boxed{}`` contents (normalized if a number), else the last number."""
    boxed = last_boxed(text)
    if boxed:
        return normalize_number(boxed) or boxed
    return last_number(text)


def first_word(text: str) -> str | None:
    """The first word, lower-cased, without surrounding punctuation ("**Paris.**" -> "paris")."""
    m = _WORD.search(text)
    return m.group(0).lower() if m else None


def letter(text: str) -> str | None:
    """The first standalone capital letter A-D ("(B) because" -> "B")."""
    m = _LETTER.search(text)
    return m.group(1) if m else None


def first_line(text: str) -> str | None:
    """The first non-empty line, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "last_number": last_number,
    "integer": integer,
    "boxed_or_last_number": boxed_or_last_number,
    "first_word": first_word,
    "letter": letter,
    "first_line": first_line,
}


def get_extractor(name: str) -> Callable[[str], str | None]:
    """The extractor registered as ``name``."""
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise TaskError(f"unknown extractor {name!r}; available: {', '.join(EXTRACTORS)}") from None


def extract_answer(name: str, text: str) -> str | None:
    """Apply extractor ``name`` to ``text``."""
    return get_extractor(name)(text)
