"""A newcomer's first hour (issue 25) and the thin CLI (issue 21): no silent surprises, light imports,
help that explains itself, runs that can be listed."""

import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from layerroute import InputError, RouteExecutor
from layerroute.cli import build_parser, main

from .conftest import tiny_model

PLUGINS = ("layerroute.search", "layerroute.routers", "layerroute.envs", "layerroute.policies")


def _modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}; import sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_core_imports_no_plugin():
    loaded = _modules_after("import layerroute, layerroute.objective, layerroute.executor")
    assert not [m for m in loaded if m.startswith(PLUGINS)]


def test_help_and_argument_errors_import_no_torch():
    for argv in (["--help"], ["eval", "--task", "suite", "--batch-size", "0"], ["run", "--help"]):
        loaded = _modules_after(f"from layerroute.cli import main; main({argv!r})")
        assert "torch" not in loaded and "transformers" not in loaded, argv
        # the plug-in packages (light: their names load on first use) and their commands.py only
        assert not [m for m in loaded if m.startswith(PLUGINS) and m not in PLUGINS and not m.endswith(".commands")]


def test_every_plugin_registers_its_commands():
    from layerroute.cli import commands

    assert {"info", "run", "eval", "tasks", "runs", "lm-eval", "search", "baselines", "analyze", "signal", "demo",
            "train-router", "pipeline", "train-ppo"} <= {c.name for c in commands()}


def test_help_shows_defaults_and_real_files(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: test)" in text and "(default: smollm2-135m)" in text and "results.jsonl" in text
    assert "results.json " not in text
    assert main(["search", "optuna", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: )" not in text and "(default: 40)" in text


def test_cli_constants_match_the_library():
    from layerroute.args import DEFAULT_MODEL
    from layerroute.models import DEFAULT_MODEL as MODELS_DEFAULT
    from layerroute.search import baselines
    from layerroute.search.commands import CALIB_LIMIT, VAL_LIMIT

    assert DEFAULT_MODEL == MODELS_DEFAULT
    assert (CALIB_LIMIT, VAL_LIMIT) == (baselines.CALIB_LIMIT, baselines.VAL_LIMIT)
    assert build_parser(["eval"]).parse_args(["eval", "--task", "x"]).calib_limit == baselines.CALIB_LIMIT


@pytest.mark.parametrize("command, config, required", [
    ("pipeline", "layerroute.routers.pipeline:PipelineConfig", []),
    ("train-router", "layerroute.routers.training:TrainRouterConfig", ["--labels", "x", "--output", "y"])])
def test_config_dataclasses_have_the_parser_defaults(command, config, required):
    import importlib

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    args = build_parser([command]).parse_args([command, *required])
    for f in fields(cls):
        if hasattr(args, f.name) and f.name not in ("labels", "output"):
            assert getattr(args, f.name) == f.default, f.name


# ---- silent surprises -------------------------------------------------------------------------

def test_right_padding_is_refused_by_the_executor_and_the_routed_model():
    from layerroute.routers import RoutedModel, RouterConfig, RouterNetwork
    from layerroute.models import model_fingerprint, weights_digest

    model = tiny_model("llama")
    ex = RouteExecutor(model)
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(InputError, match=r"padded on the right \(sample 0 ends in padding\).*padding_side='left'"):
        ex.generate(ids, right, max_new_tokens=2)
    fp = model_fingerprint(model)
    net = RouterNetwork(RouterConfig(num_layers=fp.num_layers, hidden_size=fp.hidden_size, model=fp.to_dict(),
                                     weights_digest=weights_digest(model)))
    routed = RoutedModel(model, net)
    with pytest.raises(InputError, match="padded on the right"):
        routed.generate(ids, right, max_new_tokens=2)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert routed.generate(ids.roll(1, dims=1) * left, left, max_new_tokens=2).shape == (2, 6)


@pytest.fixture
def qa(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} plus 1?", "a": str(i + 1)}) + "\n" for i in range(10)))
    return ["--task", f"jsonl:{data}", "--fields", "question=q,answer=a"]


def test_flags_that_would_be_ignored_are_refused(tiny_dir, qa, tmp_path, capsys, monkeypatch):
    def load_model(*a, **kw):
        raise AssertionError("refused only after the model loaded")

    monkeypatch.setattr("layerroute.models.load_model", load_model)
    m = ["--model", str(tiny_dir)]
    route = tmp_path / "r.json"
    cases = [
        (["run", *m, "--prompt", "hi", "--temperature", "0.5"], r"--temperature applies to sampling only: add --sample"),
        (["run", *m, "--prompt", "hi", "--seed", "3"], r"--seed seeds sampling only"),
        (["run", *m, "--prompt", "hi", "--tau", "0.5"], r"--tau is the routers' confidence threshold: it needs --router"),
        (["run", *m, "--prompt", "hi", "--route", "skip:1", "--router", str(route)], r"not allowed with argument"),
        (["eval", *m, *qa, "--tau", "0.5"], r"--tau is the routers' confidence threshold; give --router DIR"),
        (["eval", *m, *qa, "--calib-limit", "8"], r"--calib-limit sets the samples a --baseline is fitted on"),
        (["eval", *m, *qa, "--scoring", "cloze"], r"--scoring applies to choice tasks; .* is a generate task"),
        (["eval", *m, "--task", "suite:capitals", "--extract", "first_word"], r"--extract: for data-file and hf: tasks"),
        (["train-ppo", *m, "--task", "suite:capitals", "--timesteps", "8", "--max-edits", "2"],
         r"--max-edits applies to --mode edit only"),
        (["run", *m, "--prompt", "hi", "--router", str(tmp_path)], r"holds no saved routers: router_config.json is missing"),
    ]
    route.write_text("{}")
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert re.search(message, err), (argv, err)


def test_eval_names_the_split_and_warns_about_a_degenerate_policy(tiny_dir, qa, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_dir), *qa, "--batch-size", "4"]
    assert main(base + ["--limit", "2"]) == 0
    out = capsys.readouterr()
    split = sum(1 for _ in out.out.splitlines() if _.startswith("split: test (seed 0): 2 scored of "))
    assert split == 1 and "in the split, 10 in the task" in out.out and "warning" not in out.err
    RouteExecutor(tiny_model("llama")).route("skip:1-4").save(tmp_path / "one.json")  # 1 of 5 blocks per sample
    assert main(base + ["--split", "all", "--policy", str(tmp_path / "one.json")]) == 0
    out = capsys.readouterr()
    assert "split: all (seed 0): 10 scored of 10 in the split, 10 in the task" in out.out
    assert "warning: degenerate policy: 10 of 10 samples (100%) run at most 1 of 5 blocks" in out.err


def test_degenerate_warning_thresholds():
    from layerroute.evaluation import degenerate_warning

    assert degenerate_warning([1] * 6 + [30] * 4, 30) is not None  # 60% at <= 3 of 30 blocks
    assert degenerate_warning([3] * 5 + [30] * 5, 30) is None  # half is not most
    assert degenerate_warning([24] * 10, 30) is None and degenerate_warning([], 30) is None


def test_cloze_and_extractor_from_the_command_line(tiny_dir, tmp_path, capsys):
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"q": f"Capital {i}?", "a": "Paris"}) + "\n" for i in range(4)))
    argv = ["eval", "--model", str(tiny_dir), "--task", f"jsonl:{words}", "--fields", "question=q,answer=a",
            "--split", "all"]
    assert main(argv) == 2 and "finds no answer in the gold 'Paris'" in capsys.readouterr().err
    assert main(argv + ["--extract", "first_word"]) == 0
    assert "4 scored of 4" in capsys.readouterr().out
    opts = tmp_path / "opts.jsonl"
    opts.write_text("".join(json.dumps({"q": f"Q{i}", "o": ["yes", "no"], "a": "yes"}) + "\n" for i in range(4)))
    for scoring in ("letter", "cloze"):
        assert main(["eval", "--model", str(tiny_dir), "--task", f"jsonl:{opts}", "--fields",
                     "question=q,answer=a,choices=o", "--split", "all", "--scoring", scoring]) == 0
        assert "4 scored of 4" in capsys.readouterr().out


def test_runs_lists_stores_and_runs_leave_no_lock(tiny_dir, qa, tmp_path, capsys):
    out = tmp_path / "runs" / "eval-qa"
    assert main(["eval", "--model", str(tiny_dir), *qa, "--split", "all", "--limit", "3", "--output", str(out)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]  # no results.jsonl.lock left behind
    assert main(["runs", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "| eval |" in text and "(llama, 5 blocks)" in text and "accuracy" in text and "n=3" in text
    assert main(["runs", str(tmp_path / "nothing")]) == 2


def test_readme_small_caps_sizes(monkeypatch):
    from layerroute.args import shrink

    args = build_parser(["eval"]).parse_args(["eval", "--task", "suite", "--limit", "100"])
    assert shrink(args) == ["--limit 4", "--calib-limit 4"] and args.limit == 4
    args = build_parser(["signal"]).parse_args(["signal", "--task", "gen"])
    assert "--limit 20" in shrink(args, {"limit": 20})


def test_eval_reads_the_task_a_policy_was_trained_on(tiny_dir, tmp_path, capsys):
    from layerroute.args import restore_task, task_record

    argv = ["eval", "--task", "jsonl:x.jsonl", "--fields", "question=q,answer=a,choices=o", "--scoring", "cloze",
            "--seed", "3", "--skip-bad-rows"]
    given = build_parser(argv).parse_args(argv)
    record = json.loads(json.dumps(task_record(given)))  # as a policy's JSON keeps it
    fresh = build_parser(["eval"]).parse_args(["eval"])
    fresh.given = set()
    restore_task(fresh, record)
    assert task_record(fresh) == task_record(given) and fresh.scoring == "cloze" and fresh.seed == 3
    fresh.given, fresh.seed = {"seed"}, 5
    restore_task(fresh, record)
    assert fresh.seed == 5  # a --seed the user gives wins
    RouteExecutor(tiny_model("llama")).route("skip:1-4").save(tmp_path / "one.json")
    for extra, message in (([], "--task is required (only a --policy or --router folder can supply it)"),
                           (["--policy", str(tmp_path / "one.json")], "one.json does not record the task it was "
                                                                      "trained on; give --task")):
        assert main(["eval", "--model", str(tiny_dir), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and err.endswith(message) and len(err.splitlines()) == 1
