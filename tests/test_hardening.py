"""Every bad command-line input ends in one clear line and exit status 2: no traceback, nothing written."""

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers as tf

from layerroute import LayerRouteError, Route, model_fingerprint
from layerroute.cli import main

from .conftest import tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs of every kind, and two tiny model directories (one fine, one with broken weights)."""
    from tokenizers import Tokenizer, models

    d = tmp_path_factory.mktemp("bad")
    words = models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(words))
    for name in ("model", "broken"):
        tiny_model("llama").save_pretrained(d / name)
        tok.save_pretrained(d / name)
    (d / "broken" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    (d / "noconfig").mkdir()
    (d / "junk.gguf").write_bytes(bytes(range(256)))
    (d / "empty.gguf").write_bytes(b"")
    (d / "bytes.json").write_bytes(bytes(range(256)))
    route = Route.identity(model_fingerprint(tiny_model("llama")))
    (d / "version.json").write_text(json.dumps({**route.to_dict(), "version": "1"}))
    (d / "rand.jsonl").write_bytes(bytes(range(128, 256)))
    (d / "a_file").write_text("not a directory")
    return d


def bad_inputs(d):
    """(arguments, what the one error line must say)."""
    out = ["--output", str(d / "out" / "run")]
    suite = ["eval", "--task", "suite"]
    cases = [
        (suite + ["--batch-size", "0"], r"^error: --batch-size must be at least 1, got 0$"),
        (suite + ["--limit", "-1"], r"--limit must be at least 1, got -1"),
        (["run", "--prompt", "hi", "--max-new-tokens", "-1"], r"--max-new-tokens must be at least 1"),
        (["run", "--prompt", "hi", "--max-new-tokens", "abc"], r"argument --max-new-tokens: invalid int value"),
        (suite + ["--baseline", "greedy", "--calib-limit", "0"], r"--calib-limit must be at least 1"),
        (["baselines", "--task", "suite", "--budgets", "1.5"] + out, r"--budgets must be comma-separated numbers "
                                                                     r"in \(0, 1\], like 1.0,0.9,0.8, got '1.5'"),
        (["baselines", "--task", "suite", "--budgets", "0.9,x"] + out, r"--budgets must be comma-separated numbers"),
        (["baselines", "--task", "suite", "--budgets", ""] + out, r"--budgets must be comma-separated numbers"),
        (["baselines", "--task", "suite", "--baselines", "drop_last,nope"] + out, r"unknown baseline\(s\) 'nope'"),
        (suite + ["--baseline", "nope"], r"--baseline is not valid: unknown baseline"),
        # eval's --budget is a Budget as everywhere (issue 21): a share in (0, 1] or a whole block count
        (suite + ["--baseline", "greedy", "--budget", "1.5"],
         r"--budget is not valid: budget '1.5': a block count must be a whole number"),
        (suite + ["--baseline", "greedy", "--budget", "0"], r"--budget is not valid: budget '0' must be a share"),
        (suite + ["--fields", "question"] + out, r"--fields must be key=value pairs joined by commas"),
        (suite + ["--fields", "question=q,question=x"], r"--fields names 'question' twice"),
        (suite + ["--output", str(d / "a_file" / "run")], r"--output cannot create .*: .*a_file is a file"),
        (suite + ["--output", str(d / "a_file")], r"--output .*a_file exists and is not a directory"),
        (suite + ["--dtype", "float8"], r"--dtype is not valid: unknown dtype 'float8'"),
        (["info", "--device", "tpu"], r"^error: --device is not valid: unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
        (["info", "--device", f"cuda:{torch.cuda.device_count()}"],
         r"^error: --device is not valid: device 'cuda:\d+' was asked for but torch sees"),
        (["run", "--prompt", "hi", "--sample", "--temperature", "0"], r"--temperature must be a finite number above 0"),
        (["run", "--prompt", "hi", "--temperature", "nan"], r"--temperature must be a finite number above 0"),
        (["run", "--prompt", "hi", "--top-p", "1.5"], r"--top-p must be a number in \(0, 1\]"),
        (["run", "--prompt", "hi", "--top-p", "0"], r"--top-p must be a number in \(0, 1\]"),
        (["run", "--prompt", ""], r"--prompt is empty"),
        (["run", "--prompt", "hi", "--route", ""], r"--route is not valid: empty route spec"),
        (["run", "--prompt", "hi", "--route", "skip:4-2"], r"--route is not valid: 'skip:4-2': range 4-2 is backwards"),
        (["run", "--prompt", "hi", "--route", str(d / "bytes.json")],
         r"bytes.json is not a route file: it is not UTF-8"),
        (["run", "--prompt", "hi", "--route", str(d / "version.json")],
         r"version.json: route format version must be a positive integer, got '1'"),
        (["run", "--prompt", "hi", "--route", str(d / "missing.json")], r"route file .*missing.json does not exist"),
        (["info", "--model", str(d / "junk.gguf")], r"--model is not valid: .*junk.gguf is not a GGUF file"),
        (["info", "--model", str(d / "empty.gguf")], r"--model is not valid: GGUF file .*empty.gguf is empty"),
        (["info", "--model", str(d / "missing.gguf")], r"GGUF file .*missing.gguf does not exist"),
        (["info", "--model", str(d / "noconfig")], r"noconfig is a directory without config.json"),
        (["info", "--model", str(d / "broken")], r"^error: cannot load the weights of .*broken: "),
        (["eval", "--task", f"jsonl:{d / 'rand.jsonl'}", "--fields", "question=q,answer=a"] + out,
         r"rand.jsonl line 1: not UTF-8 text"),
        (["eval", "--task", "nope"] + out, r"unknown task 'nope'"),
        (["eval", "--model", str(d / "model"), "--task", "suite", "--route", "skip:9"] + out,
         r"layer index 9 in 'skip:9' is out of range"),
        (["train-router", "--labels", str(d / "missing_store"), "--output", str(d / "out" / "run")],
         r"--labels .*missing_store does not exist"),
        (["search", "random", "--task", "suite", "--budget", "1.5"] + out,
         r"--budget is not valid: budget '1.5': a block count must be a whole number"),
        (["search", "random", "--task", "suite", "--lambda", "-1"] + out, r"--lambda must be a finite number of at "
                                                                          r"least 0, got -1.0"),
        (["search", "random", "--task", "suite", "--workers", "0"] + out, r"--workers must be at least 1"),
        (["train-ppo", "--task", "suite", "--timesteps", "0"] + out, r"--timesteps must be at least 1"),
        (["pipeline", "--search-limit", "0"] + out, r"--search-limit must be at least 1"),
    ]
    if not torch.cuda.is_available():
        cases.append((["info", "--device", "cuda"], r"--device is not valid: device 'cuda' was asked for but torch "
                                                    r"sees no CUDA GPU"))
    return cases


def test_every_bad_input_is_one_line_with_exit_status_2(files, capsys):
    for argv, message in bad_inputs(files):
        code = main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]  # (model loading may show a progress bar)
        assert code == 2, (argv, err)
        assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, (argv, err)
        assert re.search(message, errors[0]), (argv, errors[0])
        assert not (files / "out").exists(), argv  # nothing created


def test_debug_shows_the_traceback(files, capsys):
    assert main(["run", "--prompt", "hi", "--route", str(files / "bytes.json"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: --route")


def test_a_failed_run_removes_the_output_directories_it_made(files, tmp_path, monkeypatch, capsys):
    def fails_after_mkdir(args):
        (tmp_path / "new" / "run").mkdir(parents=True)
        raise LayerRouteError("something went wrong after the output was made")

    monkeypatch.setattr("layerroute.cli.cmd_eval", fails_after_mkdir)
    assert main(["eval", "--task", "suite", "--output", str(tmp_path / "new" / "run")]) == 2
    assert "something went wrong" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_info_reports_the_self_check(files, capsys):
    assert main(["info", "--model", str(files / "model")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"self-check: passed: the identity route equals the HF forward within \S+ \(logits up to", out)
    assert "supported:  yes" in out


def test_console_entry_point_has_no_traceback():
    run = subprocess.run([sys.executable, "-m", "layerroute.cli", "eval", "--task", "suite", "--batch-size", "0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and run.stderr.strip() == "error: --batch-size must be at least 1, got 0"
