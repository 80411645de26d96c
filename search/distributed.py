"""Searches on Ray: the pending units of any searcher spread over actors that each load the model once.

The driver (``run_search_distributed``) builds the same searcher as a local run (it needs it for
``units()`` and ``summarize()``, and the CLI for the store header and ``route.json``: the model is
loaded on the driver too, the simple choice, since ``units`` and ``summarize`` may need the
objective). It then

1. drops the units already in the store (a rerun resumes), splits the rest into chunks;
2. starts ``workers`` actors (``_Worker``); each builds the objective and searcher from the
   picklable ``SearchSpec`` on its first chunk and keeps them, with one torch thread on CPU
   (``threads``) or one GPU when the spec's device is ``cuda`` or ``cuda:N`` (the one Ray assigns it);
3. hands each idle actor the next chunk and appends the records of each finished chunk to the
   store (``ray.wait``): only the driver writes the store;
4. retries the chunk of an actor that died on a new actor (``max_retries`` times per chunk,
   then ``DistributedError``); an error raised by the searcher itself is not retried;
5. summarizes every record, in ``units()`` order, as ``run_search`` does.

Searchers must be deterministic per unit (seeded by ``(seed, key)``), so a Ray run gives the
same records as a local run with the same seed. ``--workers N`` starts a local Ray;
``--ray-address HOST:PORT`` joins a cluster whose reachability is checked first
(``check_ray_address``), since ``ray.init`` at a dead address retries for minutes.
"""

from __future__ import annotations

import importlib
import math
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerroute.errors import LayerRouteError
from layerroute.store import ResultsStore

from .base import Searcher, get_searcher


class DistributedError(LayerRouteError, RuntimeError):
    """A Ray setting that cannot work (bad worker count, unreachable address) or units that kept failing."""


def check_ray_address(address: str, timeout: float = 5.0) -> tuple[str, int]:
    """``(host, port)`` of a Ray address after a TCP connect answered within ``timeout`` seconds.

    Accepts ``HOST:PORT`` and ``ray://HOST:PORT``; ``"auto"`` and ``"local"`` are returned as they are
    (Ray resolves them). Raises ``DistributedError`` when nothing answers.
    """
    if address in ("auto", "local"):
        return address, 0
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, the head "
                               f"node's GCS address that `ray start --head` prints)")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise DistributedError(f"no Ray cluster answers at {address} ({reason}; a TCP connect with a {timeout:g} s "
                               f"timeout); start one with `ray start --head` or check the address") from None
    return host, int(port)


def check_workers(workers: int | None, threads: int = 1) -> None:
    """Refuse a worker or thread count below 1 (before anything is loaded)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise DistributedError(f"--workers must be at least 1, got {workers!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DistributedError(f"threads per worker must be at least 1, got {threads!r}")


@dataclass(frozen=True)
class SearchSpec:
    """Plain, picklable values from which the driver and every actor build the same searcher."""

    searcher: str
    task: str
    config: dict = field(default_factory=dict)  # the searcher's Config fields
    task_options: dict = field(default_factory=dict)  # get_task keyword arguments (seed, fields, kind)
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str | None = None
    trust_remote_code: bool = False
    split: str = "search"
    limit: int | None = None
    seed: int = 0
    objective: dict = field(default_factory=dict)  # Objective keyword arguments: reward, lam, budget, batch_rows
    module: str | None = None  # imported first: where a searcher from outside layerroute.search registers
    workdir: str | None = None  # the store's folder (the driver sets it): a searcher's own files, e.g. its study

    def searcher_class(self) -> type[Searcher]:
        if self.module:
            importlib.import_module(self.module)
        return get_searcher(self.searcher)

    def build(self, task=None) -> Searcher:
        """Load the model and build the objective and the searcher (``task``: one already built)."""
        from layerroute.executor import RouteExecutor
        from layerroute.models import load_model
        from layerroute.objective import Objective
        from layerroute.tasks import get_task

        cls = self.searcher_class()
        config = cls.Config(**self.config)
        config.validate()
        task = task or get_task(self.task, **self.task_options)
        model, tok = load_model(self.model, device=self.device, dtype=self.dtype,
                                trust_remote_code=self.trust_remote_code)
        objective = Objective.from_task(RouteExecutor(model), tok, task, self.split, self.limit, self.seed,
                                        **self.objective)
        searcher = cls(objective, config, seed=self.seed)
        searcher.workdir = Path(self.workdir) if self.workdir else None
        return searcher


class _Worker:
    """A Ray actor: builds the searcher once (on its first chunk), then returns the records of each chunk."""

    def __init__(self, spec: SearchSpec, threads: int):
        self.spec, self.threads, self.searcher = spec, threads, None

    def run(self, keys: list[str]) -> list[dict]:
        if self.searcher is None:
            import torch

            torch.set_num_threads(self.threads)
            spec = self.spec  # on a GPU, Ray shows this actor only the one it gave it: cuda (not cuda:N) is that one
            self.searcher = (replace(spec, device="cuda") if spec.device.startswith("cuda") else spec).build()
            self.units = set(self.searcher.units())
        missing = [k for k in keys if k not in self.units]
        if missing:
            raise DistributedError(f"a Ray actor built other units than the driver (it lacks {', '.join(missing[:3])}): "
                                   f"the code, data or model changed while the run started, or differs on this node")
        return list(self.searcher.search(keys))


class RaySearch:
    """Stands in for a searcher in ``run_search``: ``search(keys)`` yields the records of chunks of
    ``keys`` as Ray actors finish them; ``units`` and ``summarize`` are the driver searcher's.

    ``summarize`` sees the records in ``units()`` order, as a fresh local run stores them, so ties
    are broken as locally.
    """

    def __init__(self, spec: SearchSpec, searcher: Searcher, workers: int | None = None, address: str | None = None,
                 *, threads: int = 1, chunk_size: int | None = None, max_retries: int = 2):
        self.spec, self.inner = spec, searcher
        self.workers, self.address, self.threads = workers, address, threads
        self.chunk_size, self.max_retries = chunk_size, max_retries
        self.name = searcher.name
        self.gpus = 1 if spec.device.startswith("cuda") else 0

    def units(self) -> list[str]:
        return self.inner.units()

    def summarize(self, records: list[dict]) -> dict:
        order = {k: i for i, k in enumerate(self.inner.units())}
        return self.inner.summarize(sorted(records, key=lambda r: order.get(r.get("key"), len(order))))

    def search(self, keys: list[str]):
        if not keys:
            return
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            if self.address:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers * (1 if self.gpus else self.threads), include_dashboard=False,
                         logging_level="ERROR", log_to_driver=False)
        try:
            yield from self._schedule(ray, keys)
        finally:
            if started:
                ray.shutdown()

    def _actors(self, ray) -> int:
        """How many actors: ``workers``, or what the cluster holds; refuse what it cannot hold."""
        total = ray.cluster_resources()
        need, unit = ("GPU", self.gpus) if self.gpus else ("CPU", self.threads)
        fits = int(total.get(need, 0) // unit)
        n = self.workers or fits
        if n < 1 or n > fits:
            raise DistributedError(f"the Ray cluster has {total.get(need, 0):g} {need}s, too few for "
                                   f"{n or 1} worker(s) of {unit} {need} each")
        return n

    def _schedule(self, ray, keys: list[str]):
        from collections import deque

        n = min(self._actors(ray), len(keys))
        size = self.chunk_size or max(1, min(16, math.ceil(len(keys) / (4 * n))))
        pending = deque(keys[i:i + size] for i in range(0, len(keys), size))
        worker = ray.remote(_Worker).options(num_cpus=1 if self.gpus else self.threads, num_gpus=self.gpus)
        spec = self.spec

        def start():
            return worker.remote(spec, self.threads)

        idle, running, failures = [start() for _ in range(n)], {}, {}
        try:
            yield from self._loop(ray, start, pending, idle, running, failures)
        finally:  # free the cluster's CPUs at once, also when a unit failed
            for actor in idle + [actor for actor, _ in running.values()]:
                ray.kill(actor)

    def _loop(self, ray, start, pending, idle, running, failures):
        while pending or running:
            while idle and pending:
                actor = idle.pop()
                chunk = pending.popleft()
                running[actor.run.remote(chunk)] = (actor, chunk)
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, chunk = running.pop(ref)
            try:
                records = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                key = chunk[0]
                failures[key] = failures.get(key, 0) + 1
                if failures[key] > self.max_retries:
                    raise DistributedError(
                        f"units {chunk[0]}..{chunk[-1]} ({len(chunk)}) were lost {failures[key]} time(s): the Ray "
                        f"actor running them died each time (last: {str(exc).splitlines()[0]}); finished units "
                        f"are in the store, so a rerun resumes") from None
                ray.kill(actor)
                idle.append(start())
                pending.appendleft(chunk)
                continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, LayerRouteError):
                    raise exc.cause from None
                raise
            idle.append(actor)
            yield from records


def _import_ray():
    try:
        import ray
    except ImportError:
        raise DistributedError("--workers and --ray-address need Ray: pip install 'ray>=2.40'") from None
    return ray


def check_ray_args(workers: int | None, address: str | None, threads: int = 1) -> None:
    """Everything about a Ray run that can be refused before a model is loaded."""
    check_workers(workers, threads)
    _import_ray()
    if address:
        check_ray_address(address)


def run_search_distributed(spec: SearchSpec, store: ResultsStore, workers: int | None = None,
                           address: str | None = None, *, searcher: Searcher | None = None, threads: int = 1,
                           chunk_size: int | None = None, max_retries: int = 2, progress: bool = True) -> dict:
    """Run the pending units of ``spec``'s searcher into ``store`` on Ray; return the summary.

    ``workers``: actors on a local Ray started here (``num_cpus = workers * threads``), or on the
    cluster at ``address`` (default there: as many as its CPUs, or GPUs, hold). A Ray already
    initialized in this process is used as it is. ``searcher``: the driver's copy, when the caller
    has built it already (else built from ``spec`` here). ``threads``: torch threads per CPU actor.
    """
    from .base import run_search

    if workers is None and not address:
        raise DistributedError("give workers (a local Ray) or address (a Ray cluster)")
    check_ray_args(workers, address, threads)
    searcher = searcher or spec.build()
    if spec.module is None:
        spec = replace(spec, module=type(searcher).__module__)
    if spec.workdir is None:
        spec = replace(spec, workdir=str(store.path.parent))
    searcher.workdir = Path(spec.workdir)
    ray_searcher = RaySearch(spec, searcher, workers, address, threads=threads, chunk_size=chunk_size,
                             max_retries=max_retries)
    return run_search(ray_searcher, store, progress=progress)
