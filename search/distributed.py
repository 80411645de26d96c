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
``--ray-address HOST:PORT`` joins a cluster that is checked first, before the model loads and
the store is made (``check_ray_head``: a TCP connect and a gRPC call to the head's GCS, 3 s each,
then ``ray.init`` in a subprocess), since ``ray.init`` at a dead address retries for minutes and
at something that is not a Ray head fails after 30 s or hangs. A head on this machine joined at ``127.0.0.1:PORT`` works
whether it runs on the node's IP (Ray's default, which Ray's join goes through) or on loopback only.
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


_JOIN = """
import sys
import ray
from ray._private import ray_constants
if sys.argv[2] == "loopback":
    ray_constants.ENABLE_RAY_CLUSTER = False  # what _join does: stay on 127.0.0.1, as the head does
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(ray.cluster_resources().get("CPU", 0))
"""
_JOINED: dict[str, bool] = {}  # address -> join on loopback: set by check_ray_head, taken by the next _join


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_only(address: str, host: str, port: int) -> bool:
    """Whether to join on loopback. Ray joins ``127.0.0.1:PORT`` through this node's IP; a head
    that runs on loopback only (its node IP is 127.0.0.1: its GCS listens there alone) is not
    reachable that way, and is joined on 127.0.0.1 instead."""
    if address.startswith("ray://") or not _is_loopback(host):
        return False
    from ray._private.services import get_node_ip_address

    node_ip = get_node_ip_address()
    try:
        socket.create_connection((node_ip, port), timeout=1).close()
    except OSError:
        return not _is_loopback(node_ip)
    return False


def _token_auth() -> bool:
    """Whether to join with Ray's token authentication. Ray enables it on a new head when a token
    exists (``~/.ray/auth_token``, which any local ``ray.init`` writes), but a driver joining an
    explicit address sends its token only with ``RAY_AUTH_MODE=token``; so send it whenever a
    token is available and ``RAY_AUTH_MODE`` is unset (a head without authentication ignores it)."""
    import os

    return os.environ.get("RAY_AUTH_MODE") is None and _token_available()


def _token_available() -> bool:
    """Whether Ray finds an auth token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return False
    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


def _not_a_gcs(address: str, timeout: float) -> str | None:
    """None when a Ray head's GCS answers at ``address`` (a gRPC call for its cluster id: the id, or
    a request for the auth token); else what answers there instead."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId", request_serializer=bytes,
                                   response_deserializer=bytes)
        try:
            call(b"", timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED and not _token_available():
                raise DistributedError(f"the Ray head at {address} requires token authentication, and no token is "
                                       f"set here: put the head's token (`ray get-auth-token` there) in "
                                       f"RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
            if code == grpc.StatusCode.UNAUTHENTICATED:  # a head with token authentication: the join sends it
                return None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"something accepts TCP connections there but did not answer in {timeout:g} s"
            if code == grpc.StatusCode.UNAVAILABLE:
                return "something answers there, but not in gRPC (an HTTP server?)"
            return f"a gRPC server answers there, but not Ray's GCS ({code.name})"
    return None


def check_ray_head(address: str, timeout: float = 3.0, join_timeout: float = 60.0) -> bool:
    """Check that ``address`` is a Ray head that this process can join, before anything is loaded:
    a TCP connect, a gRPC call to the head's GCS (``timeout`` seconds each: a server that is not a
    Ray head is refused at once, where ``ray.init`` would retry for 30 s or hang), then ``ray.init``
    in a subprocess, killed after ``join_timeout``. Returns whether the join is on loopback
    (``_loopback_only``); raises ``DistributedError`` saying why not."""
    import os
    import signal
    import subprocess
    import sys

    if address in ("auto", "local"):
        return False
    host, port = check_ray_address(address, timeout=timeout)
    why = None if address.startswith("ray://") else _not_a_gcs(f"{host}:{port}", timeout)
    if why:
        raise DistributedError(f"{address} is not a Ray head: {why}; give the address that `ray start --head "
                               f"--port PORT` prints (the head's GCS port)")
    loopback = _loopback_only(address, host, port)
    env = {**os.environ, **({"RAY_AUTH_MODE": "token"} if _token_auth() else {})}
    proc = subprocess.Popen([sys.executable, "-c", _JOIN, address, "loopback" if loopback else "node-ip"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=join_timeout)
    except subprocess.TimeoutExpired:
        err = f"ray.init did not finish in {join_timeout:g} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the probe and anything it started: its own session
            proc.communicate()
    if proc.returncode:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        raise DistributedError(f"cannot join the Ray head at {address} ({reason[:300]}); start the head with "
                               f"`ray start --head --port {port}` and give --ray-address {host}:{port} on that machine "
                               f"or the IP it prints elsewhere")
    _JOINED[address] = loopback
    return loopback


def _join(ray, address: str) -> None:
    """``ray.init`` at ``address``, on loopback where ``check_ray_head`` found the head there."""
    from ray._private import ray_constants

    loopback = _JOINED.pop(address) if address in _JOINED else check_ray_head(address)
    if _token_auth():
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # RAY_AUTH_MODE=token for this process, as check_ray_head's probe had it
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = old and not loopback  # False: Ray keeps 127.0.0.1 as this node's IP
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:  # the head went away since check_ray_head
        raise DistributedError(f"cannot join the Ray head at {address}: {str(exc).splitlines()[0]}") from None
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


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
                _join(ray, self.address)
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
    if address and address not in _JOINED:  # (checked already, for the join that follows)
        check_ray_head(address)


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
