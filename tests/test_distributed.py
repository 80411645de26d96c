"""Searches on Ray: bad settings fail fast, a Ray run equals a local run, a dead actor's units are retried."""

import math
import os
import signal
import socket
import time
from dataclasses import dataclass

import pytest

from layerroute.cli import main
from layerroute.search import RandomSearch, SEARCHERS, register_searcher, run_search
from layerroute.search.base import RandomConfig, option
from layerroute.search.distributed import DistributedError, SearchSpec, check_ray_address, run_search_distributed
from layerroute.store import ResultsStore, read_store


HANG_S = 60  # seconds: far above a refusal on a loaded machine, far below Ray's minutes of retries


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_fast_and_says_so():
    address = f"127.0.0.1:{_free_port()}"
    t = time.monotonic()
    with pytest.raises(DistributedError, match=f"no Ray cluster answers at {address}"):
        check_ray_address(address, timeout=5)
    # Not a benchmark: a hang is ray.init retrying for minutes; the refused connect returns at once,
    # so even a loaded machine stays far below this bound.
    assert time.monotonic() - t < HANG_S
    with pytest.raises(DistributedError, match="is not HOST:PORT"):
        check_ray_address("localhost")
    with socket.socket() as s:  # something that answers passes
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert check_ray_address(f"ray://127.0.0.1:{s.getsockname()[1]}") == ("127.0.0.1", s.getsockname()[1])


def _search_args(tiny_dir, out, *extra):
    return ["search", "random_search", "--model", str(tiny_dir), "--task", "suite:capitals", "--limit", "6",
            "--output", str(out), *extra]


@pytest.mark.parametrize("extra,msg", [(["--workers", "0"], "--workers must be"),
                                       (["--ray-address", "127.0.0.1:{port}"], "no Ray cluster answers at")])
def test_cli_refuses_bad_ray_settings_before_loading(tiny_dir, tmp_path, capsys, extra, msg):
    extra = [e.format(port=_free_port()) for e in extra]
    t = time.monotonic()
    assert main(_search_args(tiny_dir, tmp_path / "bad", *extra)) == 2
    assert msg in capsys.readouterr().err
    assert time.monotonic() - t < HANG_S  # a hang: ray.init retrying for minutes (see above)
    assert not (tmp_path / "bad").exists()


# ---- on a local Ray ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs) for the module: it takes ~12 s to start."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _spec(tiny_dir, searcher="random_search", **config):
    return SearchSpec(searcher=searcher, task="suite:capitals", config=config, task_options={"seed": 0},
                      model=str(tiny_dir), limit=6, seed=3, objective={"reward": "margin", "lam": 0.1})


def _run(spec, path, workers=None, **kw):
    header = {"kind": "search:test", "settings": {"trials": spec.config.get("trials")}}
    with ResultsStore(path, header) as store:
        if workers is None:
            summary = run_search(spec.build(), store, progress=False)
        else:
            summary = run_search_distributed(spec, store, workers=workers, progress=False, **kw)
    records = read_store(path)[1]
    return summary, sorted((r for r in records if r.get("type") != "summary"), key=lambda r: r["key"])


def test_ray_run_equals_local_run(ray_local, tiny_dir, tmp_path):
    """Through the CLI: ``--workers 2`` (on the module's Ray) writes the same store as an in-process run."""
    stores = {}
    for name, extra in (("local", []), ("ray", ["--workers", "2"])):
        assert main(_search_args(tiny_dir, tmp_path / name, "--trials", "7", "--repeat-prob", "0.3", *extra)) == 0
        header, records = read_store(tmp_path / name)
        stores[name] = (header["settings"], sorted(records, key=lambda r: r.get("key", "~")),
                        (tmp_path / name / "route.json").read_text())
    assert stores["ray"] == stores["local"]
    settings, records, _ = stores["local"]
    trials = [r for r in records if "key" in r]
    assert len(trials) == 7 and records[-1]["reward"] == max(r["reward"] for r in trials)


def _same(a, b, path="") -> None:
    """``a == b`` up to float noise between batch shapes (MCTS batches samples in lockstep)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.skipif("mcts" not in SEARCHERS, reason="search/mcts.py not there yet")
def test_ray_mcts_equals_local_mcts(ray_local, tiny_dir, tmp_path):
    spec = _spec(tiny_dir, "mcts", simulations=8, lockstep=4)
    timing = ("seconds", "peak_cache_bytes")  # wall time and cache peaks depend on the machine and the grouping
    (s1, r1), (s2, r2) = (_run(spec, tmp_path / "ray", workers=2, chunk_size=2), _run(spec, tmp_path / "local"))
    assert len(r1) == len(r2) == 6 and all("top" in r for r in r2)  # one record per sample: all were compared
    _same(s1, s2)
    _same([{k: v for k, v in r.items() if k not in timing} for r in r1],
          [{k: v for k, v in r.items() if k not in timing} for r in r2])


@dataclass
class KillConfig(RandomConfig):
    kill_key: str = option("", "the unit whose process kills itself (default: none)")
    marker: str = option("", "kill only while this file is missing, then create it (default: kill every time)")


@register_searcher
class KillingSearch(RandomSearch):
    """Random search whose process dies on one unit: first time only (``marker``) or every time."""

    name = "test_killing_search"
    Config = KillConfig

    def search(self, keys):
        for key in keys:
            if key == self.config.kill_key and not (self.config.marker and os.path.exists(self.config.marker)):
                if self.config.marker:
                    open(self.config.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            yield from super().search([key])


def test_a_dead_actors_units_are_retried_then_resumed(ray_local, tiny_dir, tmp_path):
    local = _run(_spec(tiny_dir, trials=5), tmp_path / "local")
    spec = _spec(tiny_dir, KillingSearch.name, trials=5, kill_key="trial-3")  # dies every time
    with pytest.raises(DistributedError, match=r"units trial-2..trial-3 \(2\) were lost 1 time\(s\)"):
        _run(spec, tmp_path / "ray", workers=1, chunk_size=2, max_retries=0)
    records = read_store(tmp_path / "ray")[1]
    assert [r["key"] for r in records] == ["trial-0", "trial-1"]  # finished chunks kept, no summary
    marker = tmp_path / "killed-once"
    spec = _spec(tiny_dir, KillingSearch.name, trials=5, kill_key="trial-3", marker=str(marker))  # dies once
    assert _run(spec, tmp_path / "ray", workers=1, chunk_size=2) == local  # resumed; a new actor took over
    assert marker.exists()  # the actor did die
    keys = [r["key"] for r in read_store(tmp_path / "ray")[1] if "key" in r]
    assert keys[:2] == ["trial-0", "trial-1"] and sorted(keys) == [f"trial-{t}" for t in range(5)]  # none redone


def test_workers_below_one_are_refused(tiny_dir, tmp_path):
    for workers in (0, -2):
        with pytest.raises(DistributedError, match="--workers must be at least 1"):
            run_search_distributed(_spec(tiny_dir, trials=2), None, workers=workers)


def test_an_actor_with_other_units_than_the_driver_says_so(tiny_dir):
    from layerroute.search.distributed import _Worker

    worker = _Worker(_spec(tiny_dir, trials=2), threads=1)  # the actor's class, run in-process
    assert [r["key"] for r in worker.run(["trial-1"])] == ["trial-1"]
    with pytest.raises(DistributedError, match="built other units than the driver .*trial-9"):
        worker.run(["trial-9"])
