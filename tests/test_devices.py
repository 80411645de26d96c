"""Any device: --device takes cpu, cuda, cuda:N and mps, checked against what torch sees; Ray actors
pin one GPU each."""

import pytest
import torch

from layerroute import InputError
from layerroute.models import check_device


def test_device_names_and_availability():
    check_device("cpu")
    for bad in ("tpu", "cuda:x", "cuda:-1", "mps:0", "cpu:0", ""):
        with pytest.raises(InputError, match=f"unknown device {bad!r}; use cpu, cuda, cuda:N or mps"):
            check_device(bad)
    n = torch.cuda.device_count()
    with pytest.raises(InputError, match=f"device 'cuda:{n}' was asked for but torch sees"):
        check_device(f"cuda:{n}")
    if n:
        check_device(f"cuda:{n - 1}")


@pytest.mark.parametrize("device, pinned", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:3", "cuda")])
def test_a_ray_actor_uses_the_one_gpu_ray_gives_it(monkeypatch, device, pinned):
    """Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, so inside the actor that GPU is cuda (cuda:N is not there)."""
    from layerroute.search.distributed import SearchSpec, _Worker

    built = []

    class Searcher:
        def units(self):
            return []

        def search(self, keys):
            return iter(())

    monkeypatch.setattr(SearchSpec, "build", lambda spec, task=None: built.append(spec.device) or Searcher())
    assert _Worker(SearchSpec(searcher="random", task="suite", device=device), threads=1).run([]) == []
    assert built == [pinned]
