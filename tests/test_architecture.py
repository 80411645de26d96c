"""ARCHITECTURE.md's plug-in examples run as written (one fresh process, a tiny model)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "ARCHITECTURE.md"
PREAMBLE = """
from transformers import AutoTokenizer
from layerroute import RouteExecutor
from layerroute.models import resolve_model_path
from layerroute.tests.conftest import tiny_model
tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
executor = RouteExecutor(tiny_model("llama", vocab_size=len(tok)))
"""
CHECKS = """
from layerroute.evaluation import evaluate
from layerroute.objective import Objective
from layerroute.policies.base import POLICIES
from layerroute.search.base import SEARCHERS
assert task.name == "colours" and len(task.examples) == 4
searcher = FirstBlocks(Objective(executor, tok, task, budget=3))
summary = searcher.summarize(list(searcher.search(searcher.units())))
assert summary["route"]["layers"] == [0, 1, 2] and "first_blocks" in SEARCHERS
for policy in (SkipLastOnShort(), NormRouter()):
    result = evaluate(executor, tok, task, policy, progress=False)
    assert result.n == 4 and 1 <= result.mean_blocks <= executor.num_layers
assert "skip_last_on_short" in POLICIES
print("ok")
"""


@pytest.mark.skipif(not DOC.is_file(), reason="ARCHITECTURE.md is not in this checkout (an installed package)")
def test_the_plugin_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4  # a task, a searcher, a routing policy, a router
    code = PREAMBLE + "\n".join(blocks) + CHECKS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
