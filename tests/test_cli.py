"""The command line, end to end on the embedded default."""

import subprocess
import sys

import pytest

from layerroute.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "layerroute.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_info_and_run_on_embedded_default(smollm):
    info = run_cli("info")
    assert info.returncode == 0, info.stderr
    assert "layers:     30 decoder blocks" in info.stdout and "supported:  yes" in info.stdout
    run = run_cli("run", "--prompt", "What is the capital of France?", "--max-new-tokens", "10")
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    skipped = run_cli("run", "--route", "skip:2-27", "--prompt", "What is the capital of France?",
                      "--max-new-tokens", "10")
    assert skipped.returncode == 0 and "4 block executions of 30" in skipped.stderr


def test_run_reports_bad_route_clearly(capsys, tmp_path):
    from .conftest import tiny_model
    import transformers as tf
    from tokenizers import Tokenizer, models

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tf.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "m")
    assert main(["run", "--model", str(tmp_path / "m"), "--route", "skip:9", "--prompt", "hi"]) == 2
    assert "layer index 9 in 'skip:9' is out of range" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_writes_a_resumable_run_and_refuses_other_settings(tiny_dir, tmp_path, capsys):
    from layerroute.store import read_store

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(f'{{"q": "What is {i} plus 1?", "a": "{i + 1}"}}\n' for i in range(10)))
    args = ["eval", "--model", str(tiny_dir), "--task", f"jsonl:{data}", "--fields", "question=q,answer=a",
            "--split", "all", "--batch-size", "4", "--route", "skip:1-2", "--output", str(tmp_path / "run")]
    assert main(args + ["--limit", "6"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "blocks/sample   mean 3.00" in out and "tokens/s" in out
    header, records = read_store(tmp_path / "run")
    assert header["kind"] == "eval" and header["settings"]["route"] == "skip:1-2" and header["settings"]["limit"] == 6
    assert header["model"]["num_layers"] == 5 and "torch" in header["info"]
    samples = [r for r in records if r["type"] == "sample"]
    assert len(samples) == 6 and all(r["blocks"] == 3 for r in samples)
    assert records[-1]["type"] == "summary" and records[-1]["route"]["layers"] == [0, 3, 4]
    assert records[-1]["metrics"]["n"] == 6
    # a rerun with the same settings resumes: nothing is scored again
    assert main(args + ["--limit", "6"]) == 0
    assert len([r for r in read_store(tmp_path / "run")[1] if r["type"] == "sample"]) == 6
    assert main(args) == 2
    assert "other settings (settings.limit: 6 there, None now)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="larger than the 10 examples"):
        assert main(args + ["--limit", "100", "--overwrite", "--kind", "generate"]) == 0
    assert len([r for r in read_store(tmp_path / "run")[1] if r["type"] == "sample"]) == 10


def test_eval_and_baselines_report_bad_tasks(tiny_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "1"}\n{"q": "b", "a": "2"}\n{oops\n')
    assert main(["eval", "--model", str(tiny_dir), "--task", f"jsonl:{bad}", "--fields", "question=q,answer=a"]) == 2
    assert "line 3" in capsys.readouterr().err


def test_baselines_command_writes_table_and_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["baselines", "--model", str(tiny_dir), "--task", "suite:capitals", "--budgets", "1.0,0.8,0.6",
                 "--baselines", "drop_last,unified,random", "--calib-limit", "4", "--val-limit", "4",
                 "--limit", "8", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| drop_last | 0.60 | 3 |" in table and "| full | 1.00 | 5 |" in table
    from layerroute.store import read_store

    rows = read_store(out)[1]
    assert [r["blocks"] for r in rows] == [5, 4, 4, 4, 4, 3, 3, 3, 3]  # each budget ends with its best row
    assert [r["calib_n"] for r in rows[1:4]] == [4, 4, 4] and "| best (" in table
    assert [r["key"] for r in rows][:3] == ["full@1", "drop_last@0.8", "unified@0.8"]
    assert (out / "baselines.png").stat().st_size > 10_000 and (out / "table.md").is_file()


def test_info_reports_an_unsupported_model(tmp_path, capsys):
    import transformers as tf

    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tf.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "supported:  no" in out and "GPT2LMHeadModel is not supported" in out


def test_info_remembers_its_report_per_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):
    """A second `info` prints the remembered report without loading; --recheck, other weights, another
    dtype or a damaged memo load and check again."""
    import os

    import layerroute.info as info

    monkeypatch.setenv("LAYERROUTE_CACHE", str(tmp_path / "cache"))
    loads = []
    real = info.model_report
    monkeypatch.setattr(info, "model_report", lambda args: loads.append(args.dtype) or real(args))

    def info_out(*extra):
        assert main(["info", "--model", str(tiny_dir), *extra]) == 0
        return capsys.readouterr().out

    first = info_out()
    assert "supported:  yes" in first and "remembered:" not in first and len(loads) == 1
    second = info_out()
    assert second.startswith(first) and "remembered: checked" in second and len(loads) == 1
    assert "remembered:" not in info_out("--recheck") and len(loads) == 2
    assert "remembered:" not in info_out("--dtype", "bfloat16") and len(loads) == 3
    config = tiny_dir / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    assert "remembered:" not in info_out() and len(loads) == 4
    for memo in (tmp_path / "cache" / "info").iterdir():
        memo.write_text("{not json")
    assert "remembered:" not in info_out() and len(loads) == 5
    assert "remembered:" in info_out() and len(loads) == 5
