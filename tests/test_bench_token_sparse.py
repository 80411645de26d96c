"""The token-sparse benchmark's FLOP count and masks, and a smoke run on a tiny model."""

import json

import torch

from layerroute.experiments.bench_token_sparse import Shape, agreed_mask, main, row_share_mask, token_share_mask, walk_flops


def test_share_masks_are_exact_and_flops_follow_the_rules():
    g = torch.Generator().manual_seed(0)
    tm = token_share_mask(3, 4, 20, 0.25, g)
    assert (tm.sum(-1) == 5).all()
    rm = row_share_mask(8, 4, 6, 0.5, g)
    assert (rm.sum(0) == 4).all()
    am = agreed_mask(8, 4, 6, 0.5, g)
    assert (am.sum(1) == 2).all() and (am == am[:1]).all()  # half the blocks per step, the same for every row
    s = Shape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    ones = [torch.ones(1, 4, dtype=torch.bool)] * 2
    dense, _ = walk_flops(s, ones, None)
    per_token = 2 * 8 * 2 * 4 + 2 * 8 * 1 * 4 + 3 * 8 * 16
    attention = 2 * 2 * 4 * (1 + 2 + 3 + 4)
    assert dense == 2 * (2 * (4 * per_token + attention) + 8 * 10)
    half = [torch.tensor([[True, False, True, False]])] * 2
    kv, _ = walk_flops(s, half, "kv-kept")
    absent, _ = walk_flops(s, half, "absent")
    assert absent < kv < dense
    assert kv - absent == 2 * 2 * (2 * 2 * 8 * 1 * 4 + 2 * 2 * 4 * ((1 + 3) - (1 + 2)))  # skipped K/V and keys


def test_benchmark_smoke_run_writes_md_and_json(tiny_dir, tmp_path):
    name = str(tmp_path / "bench")
    main(["--model", str(tiny_dir), "--prefill-batch", "2", "--prefill-tokens", "16", "--decode-batch", "4",
          "--decode-prompt", "8", "--decode-new", "3", "--repeats", "1", "--threads", "1", "--name", name])
    md = (tmp_path / "bench.md").read_text()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert md.startswith("# Token-sparse blocks") and "`OMP_NUM_THREADS=1 python -m layerroute.experiments.bench_token_sparse" in md
    assert "Run 20" in md and set(data["parts"]) == {"prefill", "decode"}
    variants = [r["variant"] for r in data["parts"]["prefill"]["rows"]]
    assert variants[0] == "dense (no mask)" and "kv-kept, 50%" in variants and "absent, 25%" in variants
    assert all(r["ideal"] >= 1.0 for r in data["parts"]["decode"]["rows"])
    assert "absent, 50%, rows agree" in [r["variant"] for r in data["parts"]["decode"]["rows"]]
    assert "Noise: the dense token_mask variant" in md
    # a run of one part keeps the other part of the last run, with that run's command
    main(["--model", str(tiny_dir), "--parts", "decode", "--decode-batch", "4", "--decode-prompt", "8",
          "--decode-new", "2", "--repeats", "1", "--threads", "1", "--name", name])
    again = json.loads((tmp_path / "bench.json").read_text())
    assert again["parts"]["prefill"]["rows"] == data["parts"]["prefill"]["rows"]
    assert again["parts"]["prefill"]["command"] == data["command"] and "--parts decode" in again["command"]
    assert "From an earlier run" in (tmp_path / "bench.md").read_text()
