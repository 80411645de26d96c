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
