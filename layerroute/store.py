"""The results store: an append-only JSONL journal that every run writes through.

Line 1 is a header: what made the results (``kind``, ``settings``, the model fingerprint, the
task, split and seed) plus ``info`` that does not define them (versions, start time). Every
later line is one finished record (a sample, a trial, a row), written with a single
``write`` on an ``O_APPEND`` descriptor and flushed to disk, so a killed run loses at most
the record in flight; a torn last line is dropped when the store is reopened.

Reopening with the same header resumes (``done`` lists the finished keys); a different header
is refused unless ``overwrite``. One writer at a time: the writer holds an exclusive lock on
``<path>.lock`` until it closes, and a second writer is refused at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from pathlib import Path

from .errors import LayerRouteError

FORMAT = "layerroute.results"
VERSION = 1
FILENAME = "results.jsonl"


class StoreError(LayerRouteError):
    """A results store that is corrupt, made with other settings, or in use by another process."""


def environment() -> dict:
    """Versions and threads: stored in a header's ``info``, never compared."""
    import platform

    import torch
    import transformers

    from . import __version__

    return {"layerroute": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``path`` through a uniquely named temporary file and a rename: readers see all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path, error: type[Exception], missing: str) -> dict:
    """A JSON file, or ``error`` saying it is ``missing`` or corrupt (never a raw traceback)."""
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is corrupt (not JSON: {exc})") from None


def read_safetensors(path: str | Path, error: type[Exception], missing: str) -> dict:
    """Tensors of a safetensors file (nothing is unpickled), or ``error`` saying it is ``missing``,
    corrupt or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path} is corrupt or truncated (not a readable safetensors file: {exc}); "
                    f"save or copy it again") from None


def check_weights_digest(model, digest: str | None, where, error: type[Exception], what: str) -> None:
    """Refuse ``what`` (saved at ``where``, trained on weights with ``digest``) on a model whose
    weights differ: it reads hidden states, so it only works on its own checkpoint."""
    from .models import weights_digest

    mine = weights_digest(model) if digest else None
    if digest and mine != digest:
        raise error(f"{where}: this {what} was trained on another checkpoint of the same shape (weights digest "
                    f"{digest}); this model's weights digest is {mine}. It reads the base model's hidden states, "
                    f"so it only works on the checkpoint it was trained on")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def read_store(path: str | Path) -> tuple[dict, list[dict]]:
    """The header and the finished records of a store (read-only, no lock)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise StoreError(f"results store {path} does not exist")
    header, records, _ = _parse(path)
    return header, records


def _parse(path: Path) -> tuple[dict, list[dict], int]:
    """Header, records, and the byte length of the intact part (a torn last line excluded)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    good = len(data) if data.endswith(b"\n") else len(data) - len(lines[-1])
    lines = lines[:-1]  # the last element is '' or a torn line
    if not lines:
        raise StoreError(f"{path} is empty or has no complete header line; remove it or pass --overwrite")
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(f"{path} line 1 is not JSON: not a layerroute results store") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StoreError(f"{path} is not a layerroute results store (its first line has no "
                         f"\"format\": \"{FORMAT}\")")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise StoreError(f"{path} has store version {header.get('version')!r}; this layerroute reads "
                         f"version {VERSION} or older")
    records = []
    for n, line in enumerate(lines[1:], 2):
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{path} line {n} is corrupt (not JSON) in the middle of the store; "
                             f"it was not written by layerroute's writer") from None
    return header, records, good


class ResultsStore:
    """Append-only writer of one results file. Use as a context manager.

    ``header`` holds what defines the results: ``kind`` (e.g. ``"eval"``, ``"search:mcts"``),
    ``settings``, ``model`` (fingerprint dict), ``task``, ``split``, ``seed``. ``info`` holds
    what does not (versions, times) and is never compared.
    """

    def __init__(self, path: str | Path, header: dict, *, overwrite: bool = False, info: dict | None = None):
        self.path = Path(path)
        if self.path.suffix != ".jsonl":
            self.path = self.path / FILENAME
        self.header = {"format": FORMAT, "version": VERSION, **header}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreError(f"{self.path} is being written by another process; wait for it or use another "
                             f"--output") from None
        try:
            self.records = self._open(overwrite, info or {})
        except BaseException:
            self.close()
            raise
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _open(self, overwrite: bool, info: dict) -> list[dict]:
        if self.path.exists() and self.path.stat().st_size and not overwrite:
            old, records, good = _parse(self.path)
            theirs = {k: v for k, v in old.items() if k != "info"}
            if _canonical(theirs) != _canonical(self.header):
                diff = sorted(k for k in set(theirs) | set(self.header) if _canonical(theirs.get(k)) !=
                              _canonical(self.header.get(k)))
                detail = "; ".join(_describe_diff(k, theirs.get(k), self.header.get(k)) for k in diff)
                raise StoreError(f"{self.path} holds results made with other settings ({detail}); choose another "
                                 f"--output or pass --overwrite to replace them")
            if good < self.path.stat().st_size:
                warnings.warn(f"{self.path}: dropping a torn last line (a run was killed while writing it)",
                              stacklevel=3)
                os.truncate(self.path, good)
            return records
        atomic_write(self.path, _canonical({**self.header, "info": {"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                                    **environment(), **info}}) + "\n")
        return []

    def summary(self) -> dict | None:
        """The last summary record, if the run has finished once."""
        return next((r for r in reversed(self.records) if r.get("type") == "summary"), None)

    def done(self, field: str = "key") -> set:
        """Values of ``field`` over the finished records (what a resumed run skips)."""
        return {r[field] for r in self.records if field in r}

    def append(self, record: dict) -> None:
        """Write one finished record as one line, durably."""
        line = (_canonical(record) + "\n").encode()
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.records.append(json.loads(line))

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe_diff(key: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if _canonical(old.get(k)) != _canonical(new.get(k)))
        return ", ".join(f"{key}.{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:4])
    return f"{key}: {old!r} there, {new!r} now"
