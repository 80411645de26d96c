"""The results store: append-only, resumable, refuses other settings, one writer, survives a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from layerroute.store import FILENAME, ResultsStore, StoreError, read_store

HEADER = {"kind": "search:test", "settings": {"a": 1}, "model": {"architecture": "llama"}, "task": "t",
          "split": "search", "seed": 0}


def test_append_read_and_resume(tmp_path):
    with ResultsStore(tmp_path, HEADER, info={"version": "x"}) as s:
        s.append({"key": "u1", "reward": 0.5})
        s.append({"key": "u2", "reward": -1.0})
    header, records = read_store(tmp_path)
    assert header["settings"] == {"a": 1} and header["info"]["version"] == "x"
    assert [r["key"] for r in records] == ["u1", "u2"]
    with ResultsStore(tmp_path / FILENAME, HEADER, info={"version": "y"}) as s:  # info is not compared
        assert s.done() == {"u1", "u2"}
        s.append({"key": "u3"})
    assert len(read_store(tmp_path)[1]) == 3


@pytest.mark.parametrize("field,value", [("settings", {"a": 2}), ("task", "other"), ("model", {"architecture": "qwen2"}),
                                         ("seed", 1), ("split", "test")])
def test_other_settings_are_refused_unless_overwrite(tmp_path, field, value):
    with ResultsStore(tmp_path, HEADER) as s:
        s.append({"key": "u1"})
    with pytest.raises(StoreError, match=f"other settings .*{field}.*--overwrite"):
        ResultsStore(tmp_path, {**HEADER, field: value})
    assert len(read_store(tmp_path)[1]) == 1  # nothing lost by the refusal
    with ResultsStore(tmp_path, {**HEADER, field: value}, overwrite=True) as s:
        assert s.done() == set()
    assert read_store(tmp_path)[0][field] == value


def test_growable_settings_keep_the_records_under_the_new_header(tmp_path):
    grown = {**HEADER, "settings": {"a": 1, "limit": 2}}
    with ResultsStore(tmp_path, grown, info={"version": "x"}) as s:
        s.append({"key": "u1"})
    more = {**HEADER, "settings": {"a": 1, "limit": 5}}
    with pytest.raises(StoreError, match="other settings"):  # only where the caller says so
        ResultsStore(tmp_path).open(more)
    with ResultsStore(tmp_path).open(more, growable=("limit",)) as s:
        assert s.done() == {"u1"}
        s.append({"key": "u2"})
    header, records = read_store(tmp_path)
    assert header["settings"]["limit"] == 5 and header["info"]["version"] == "x"
    assert [r["key"] for r in records] == ["u1", "u2"]
    with pytest.raises(StoreError, match="other settings .*settings"):  # any other difference is refused
        ResultsStore(tmp_path).open({**HEADER, "settings": {"a": 2, "limit": 5}}, growable=("limit",))
    assert len(read_store(tmp_path)[1]) == 2


def test_torn_last_line_is_dropped_and_corrupt_files_refused(tmp_path):
    with ResultsStore(tmp_path, HEADER) as s:
        s.append({"key": "u1"})
    path = tmp_path / FILENAME
    with path.open("a") as f:
        f.write('{"key": "u2", "rew')  # a kill in the middle of a write
    with pytest.warns(UserWarning, match="torn last line"), ResultsStore(tmp_path, HEADER) as s:
        assert s.done() == {"u1"}
        s.append({"key": "u2"})
    assert [r["key"] for r in read_store(tmp_path)[1]] == ["u1", "u2"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(StoreError, match="line 2 is corrupt"):
        ResultsStore(tmp_path, HEADER)
    path.write_bytes(os.urandom(64) + b"\n")
    with pytest.raises(StoreError, match="not a layerroute results store|not JSON"):
        read_store(path)
    path.write_text(json.dumps({"format": "layerroute.results", "version": "2"}) + "\n")
    with pytest.raises(StoreError, match="store version '2'"):
        ResultsStore(tmp_path, HEADER)
    with pytest.raises(StoreError, match="does not exist"):
        read_store(tmp_path / "nope")


def test_two_writers_are_never_open_at_once(tmp_path):
    with ResultsStore(tmp_path, HEADER):
        with pytest.raises(StoreError, match="being written by another process"):
            ResultsStore(tmp_path, HEADER)
    with ResultsStore(tmp_path, HEADER):  # released on close
        pass


def test_a_killed_writer_loses_no_finished_line(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from layerroute.store import ResultsStore
        with ResultsStore({str(tmp_path)!r}, {HEADER!r}) as s:
            for i in range(len(s.records), 10_000):
                s.append({{"key": f"u{{i}}", "payload": "x" * 200}})
                print(i, flush=True)
                time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    printed = [proc.stdout.readline() for _ in range(20)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    keys = [r["key"] for r in read_store(tmp_path)[1]]
    assert len(keys) >= len(printed) and keys == [f"u{i}" for i in range(len(keys))]
    with ResultsStore(tmp_path, HEADER) as s:  # the lock died with the process
        assert s.done() == set(keys)
