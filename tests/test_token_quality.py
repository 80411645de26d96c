"""The per-token quality comparison (experiments/token_quality.py): a smoke run on a tiny model."""

import json

from layerroute.experiments.token_quality import main


def test_token_quality_smoke_run_writes_table_plot_and_resumes(tiny_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_dir), "--lambdas", "0.5", "--steps", "2", "--batch-size", "2", "--max-length", "16",
            "--val-windows", "2", "--ppl-windows", "4", "--gen-limit", "4", "--suite-limit", "3", "--batch", "4",
            "--headline", str(tmp_path / "missing.json"), "--out", str(tmp_path)]
    main(argv)
    md = (tmp_path / "token_quality.md").read_text()
    data = json.loads((tmp_path / "token_quality.json").read_text())
    assert md.startswith("# Per-token routers") and "OMP_NUM_THREADS=1 python -m layerroute.experiments.token_quality" in md
    assert (tmp_path / "token_quality.png").stat().st_size > 0
    kinds = {(r["data"], r["kind"]) for r in data["rows"]}
    assert kinds == {(d, k) for d in ("ppl", "gen", "suite") for k in ("full", "per-token", "static")}
    token = [r for r in data["rows"] if r["kind"] == "per-token"]
    assert all(0 <= r["blocks"] <= 5 and r["compute"] >= r["blocks"] and "vs drop_last" in r["versus"] for r in token)
    assert "per-sample routers' point is missing" in md and "Where per-token routing beats" in md
    assert (tmp_path / "token_quality_routers" / "lam-0.5" / "token_routers.safetensors").is_file()
    capsys.readouterr()
    main(argv)  # a rerun reuses every row and the trained routers
    assert "reusing 9 finished rows" in capsys.readouterr().out
