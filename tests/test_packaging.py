"""A non-editable install puts every folder under the one layerroute namespace."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["envs", "routers", "search", "policies", "experiments", "tests", "tasks"]


def test_non_editable_install_imports_every_subpackage(tmp_path):
    if not (ROOT / "pyproject.toml").is_file():  # running from an installed copy
        import pytest

        pytest.skip("needs the source tree")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, timeout=600)
    assert not (target / "search").exists(), "a top-level 'search' package would land in site-packages"
    code = "import layerroute, importlib;" + "".join(
        f"m = importlib.import_module('layerroute.{p}'); assert m.__file__.startswith({str(target)!r}), m.__file__;"
        for p in SUBPACKAGES)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(target)},
                   timeout=120)
    assert (target / "bin" / "layerroute").exists()
