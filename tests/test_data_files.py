"""Users' own files: MMLU-schema JSONL, CSV and Parquet, choices over several columns, bad rows."""

import csv
import json
import sys

import pytest

from layerroute.cli import main
from layerroute.tasks import TaskError, get_task

MMLU_FIELDS = {"question": "question", "choices": "answer_a|answer_b|answer_c|answer_d", "answer": "correct_answer"}
ROWS = [
    {"question": "What is 2 + 2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6",
     "correct_answer": "B", "topic": "math"},
    {"question": "Which is a colour?", "answer_a": "red", "answer_b": "dog", "answer_c": "car", "answer_d": "sun",
     "correct_answer": "A", "topic": "misc"},
    {"question": "The opposite of hot?", "answer_a": "warm", "answer_b": "big", "answer_c": "cold", "answer_d": "wet",
     "correct_answer": "C", "topic": "words"},
]


def write(path, rows):
    """``rows`` as JSONL, CSV (header from the first row) or Parquet, by the file's suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(path, **options):
    return get_task(f"{path.suffix.lstrip('.')}:{path}", fields=MMLU_FIELDS, **options)


def test_mmlu_schema_jsonl_csv_and_parquet_load_the_same_examples(tmp_path):
    pytest.importorskip("pyarrow")
    tasks = [load(write(tmp_path / f"mmlu.{ext}", ROWS)) for ext in ("jsonl", "csv", "parquet")]
    assert [t.kind for t in tasks] == ["choice"] * 3  # mapping choices makes it a choice task
    assert tasks[0].examples == tasks[1].examples == tasks[2].examples
    ex = tasks[0].examples[0]
    assert (ex.uid, ex.answer, ex.choices) == ("1", "B", ("3", "4", "5", "6"))
    assert tasks[0].split("test").examples == tasks[2].split("test").examples  # the same uids, the same splits


def test_answers_as_a_letter_an_index_or_the_text(tmp_path):
    pytest.importorskip("pyarrow")
    rows = [dict(r) for r in ROWS]
    rows[0]["correct_answer"], rows[1]["correct_answer"], rows[2]["correct_answer"] = "b", "0", "cold"
    for ext in ("jsonl", "csv"):
        assert [e.answer for e in load(write(tmp_path / f"a.{ext}", rows)).examples] == ["B", "A", "C"]
    ints = [dict(r, correct_answer=i) for r, i in zip(ROWS, (1, 0, 2))]  # integer column in Parquet and JSON
    for ext in ("jsonl", "parquet"):
        assert [e.answer for e in load(write(tmp_path / f"i.{ext}", ints)).examples] == ["B", "A", "C"]


def test_a_row_with_fewer_options_than_columns(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2].update(answer_c="", answer_d="", correct_answer="A")  # two options: trailing empty cells dropped
    task = load(write(tmp_path / "short.csv", rows))
    assert task.examples[2].choices == ("warm", "big")


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_each_bad_row_gets_its_error(tmp_path, ext):
    if ext == "parquet":
        pytest.importorskip("pyarrow")
    line = {"jsonl": "line 2", "csv": "line 3", "parquet": "row 2"}[ext]  # the CSV header is line 1
    cases = [
        (dict(ROWS[1], question=None), rf"{line}: field 'question' \(mapped to 'question'\) is empty"),
        (dict(ROWS[1], correct_answer="E"), rf"{line}: answer 'E' is neither a letter A-D, a 0-based index below "
                                            rf"4, nor one of the options .* \(field 'correct_answer'\)"),
        (dict(ROWS[1], answer_b="", answer_c="", answer_d=""),
         rf"{line}: fields answer_a\|answer_b\|answer_c\|answer_d give 1 choice\(s\); a choice example needs 2"),
        (dict(ROWS[1], answer_b=""), rf"{line}: field 'answer_b' \(mapped to 'choices'\) is empty"),
    ]
    if ext == "jsonl":  # a key absent from one row (CSV and Parquet rows all have every column)
        row = dict(ROWS[1])
        del row["correct_answer"]
        cases.append((row, rf"{line}: missing field 'correct_answer' \(mapped to 'answer'\); the row has keys"))
    for k, (bad, message) in enumerate(cases):
        path = write(tmp_path / f"bad{k}.{ext}", [ROWS[0], bad, ROWS[2]])
        with pytest.raises(TaskError, match=message) as err:
            load(path)
        assert str(path) in str(err.value)
        with pytest.warns(UserWarning, match=rf"skipped 1 bad row\(s\) \(--skip-bad-rows\); the first: .*{line}"):
            task = load(path, skip_bad_rows=True)
        assert [e.uid for e in task.examples] == ["1", "3"]


def test_missing_column_in_csv(tmp_path):
    path = write(tmp_path / "nocol.csv", [{k: v for k, v in r.items() if k != "answer_d"} for r in ROWS])
    with pytest.raises(TaskError, match=r"nocol.csv line 2: missing field 'answer_d' \(mapped to 'choices'\)"):
        load(path)


def test_unknown_or_mislabelled_data_file_format(tmp_path):
    sheet = tmp_path / "data.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    with pytest.raises(TaskError, match=r"names a data file without its format; read it as jsonl:PATH, csv:PATH or "
                                        r"parquet:PATH; .xlsx files are not read"):
        get_task(str(sheet))
    with pytest.raises(TaskError, match="names a data file without its format"):
        get_task(f"xlsx:{sheet}")
    csv_file = write(tmp_path / "rows.csv", ROWS)
    with pytest.raises(TaskError, match=rf"\(here csv:{csv_file}\)"):
        get_task(str(csv_file))
    with pytest.raises(TaskError, match=rf"looks like a CSV file \(by its name\), not JSONL; name it csv:{csv_file}"):
        get_task(f"jsonl:{csv_file}")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    pytest.importorskip("pyarrow")
    with pytest.raises(TaskError, match="junk.parquet: not a readable Parquet file"):
        get_task(f"parquet:{junk}", fields=MMLU_FIELDS)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(TaskError, match="x.parquet needs the pyarrow package: pip install pyarrow"):
        get_task(f"parquet:{tmp_path / 'x.parquet'}")


def test_cli_fields_with_several_columns_and_bad_rows(tmp_path, capsys):
    bad = write(tmp_path / "bad.csv", [ROWS[0], dict(ROWS[1], correct_answer="Z")])
    fields = "question=question,choices=answer_a|answer_b|answer_c|answer_d,answer=correct_answer"
    assert main(["eval", "--task", f"csv:{bad}", "--fields", fields]) == 2  # the task is read before the model
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"{bad} line 3: answer 'Z' is neither" in err and "(field 'correct_answer')" in err
    sheet = tmp_path / "data.xlsx"
    sheet.write_bytes(b"PK")
    assert main(["eval", "--task", str(sheet)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "names a data file without its format" in err
