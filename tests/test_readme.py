"""The README as a tested contract (issue 25): every ```bash and ```python block of README.md runs, in
order, in one empty temporary folder, at small sizes. ``LAYERROUTE_README_SMALL=1`` caps the size
options of each command (``layerroute.args.SMALL``: --limit, --simulations, --trials, --timesteps,
...); no command is skipped. ``layerroute`` lines run in this process through ``layerroute.cli.main``,
so the model loads once, not once per line; a line starting with ``make`` runs the checkout's
Makefile from the temporary folder (``make -f CHECKOUT/Makefile``: its outputs land there, and
``make test`` runs a small part of the suite), any other shell line in bash; each Python block runs in
a fresh namespace. A failing line
does not stop the check (later lines may still pass); every failure is reported at the end. The time
of each line and the total are printed (``pytest -s``)."""

import inspect
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every ```bash and ```python block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S)]


def shell_lines(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.fixture
def cached_models(monkeypatch):
    """``load_model`` that loads each (model, options) once for the whole check."""
    import layerroute
    import layerroute.models as models

    real, cache = models.load_model, {}
    signature = inspect.signature(real)

    def load_model(*a, **kw):
        bound = signature.bind(*a, **kw)
        bound.apply_defaults()  # the same model however it was asked for
        key = repr(sorted(bound.arguments.items()))
        if key not in cache:
            cache[key] = real(*a, **kw)
        return cache[key]

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(layerroute, "load_model", load_model, raising=False)


def test_readme_blocks_parse():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 10 and {lang for lang, _ in blocks} == {"bash", "python"}
    assert shell_lines("a \\\n  b # c\n# only a comment\n\nd") == ["a b # c", "d"]


@pytest.mark.slow
@pytest.mark.readme
def test_readme_runs_as_written(tmp_path, monkeypatch, cached_models):
    from layerroute.cli import main

    monkeypatch.setenv("LAYERROUTE_README_SMALL", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    start, times, failed = time.perf_counter(), [], []
    for n, (lang, code) in enumerate(readme_blocks(README.read_text()), 1):
        for line in shell_lines(code) if lang == "bash" else [code]:
            t = time.perf_counter()
            try:
                status = run_line(lang, code if lang == "python" else line, n, tmp_path, main)
            except Exception as exc:  # noqa: BLE001  (reported with the line, below)
                status = f"{type(exc).__name__}: {exc}"
            shown = line.splitlines()[0][:100]
            times.append(time.perf_counter() - t)
            print(f"[{times[-1]:6.1f} s] {shown}" + ("" if status == 0 else f"  FAILED: {status}"), flush=True)
            if status != 0:
                failed.append(f"block {n}: {shown}: {status}")
    print(f"README check: {len(times)} commands and snippets in {time.perf_counter() - start:.0f} s")
    assert not failed, "\n".join(failed)


def run_line(lang: str, code: str, n: int, folder: Path, main) -> int | str:
    """Run one README command (or Python block); 0, or what went wrong."""
    if lang == "python":
        exec(compile(code, f"README.md python block {n}", "exec"), {"__name__": "__readme__"})
        return 0
    argv = shlex.split(code, comments=True)
    if argv[0] == "layerroute":
        return main(argv[1:]) or 0
    if argv[0] == "make":
        code = f"make -f {shlex.quote(str(ROOT / 'Makefile'))} {code[len('make'):].strip()}"
    return subprocess.run(["bash", "-c", code], cwd=folder).returncode
