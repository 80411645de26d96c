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
import math
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

    return {"layerroute": _version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def _version() -> str:
    """layerroute's version, as installed (read without importing the package's ``__init__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("layerroute")
    except PackageNotFoundError:
        return "unknown"


def _temporary(path: Path) -> Path:
    """A unique temporary name beside ``path`` (so the final rename stays on one file system)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``path`` through a uniquely named temporary file and a rename: readers see all or nothing."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, data, *, indent: int | None = 2, sort_keys: bool = True,
                      **dumps) -> None:
    """Write ``data`` as JSON (and a final newline) atomically, as ``atomic_write`` does."""
    atomic_write(path, json.dumps(data, indent=indent, sort_keys=sort_keys, **dumps) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Save ``tensors`` (moved to the CPU, made contiguous) as a safetensors file atomically: through a
    uniquely named temporary file and a rename, so a reader never sees half a weights file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _temporary(path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
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


def check_weights_digest(model, digest, where, error: type[Exception], what: str, redo: str) -> None:
    """Refuse ``what`` (saved at ``where`` with the weights ``digest`` of the checkpoint it was made
    on) on a model whose weights differ, or when it records no digest; ``redo`` says how to fix it."""
    if not isinstance(digest, str) or not digest:
        raise error(f"{where}: this {what} records no weights digest (it was saved before layerroute required "
                    f"one), so the checkpoint it was made on is unknown; {redo}")
    from .stack import weights_digest  # (torch: imported only where a model is at hand)

    mine = weights_digest(model)
    if mine != digest:
        raise error(f"{where}: this {what} was made on another checkpoint of the same shape (weights digest "
                    f"{digest}); this model's weights digest is {mine}. It is only valid on the checkpoint it was "
                    f"made on; {redo}")


def check_store_weights(path, model) -> None:
    """Refuse a results store whose header does not record ``model``'s weights digest."""
    header, _ = read_store(path)
    check_weights_digest(model, header.get("weights_digest"), path, StoreError, "results store",
                         "search again on this checkpoint (the --model given here)")


def model_header(executor) -> dict:
    """What a store's header records of the model: its shape (fingerprint) and its weights digest,
    so results and labels are never mixed across checkpoints of the same shape."""
    from .stack import weights_digest

    return {"model": executor.fingerprint.to_dict(), "weights_digest": weights_digest(executor.model)}


def check_tensors(tensors: dict, expected: dict, path, error: type[Exception], config: str) -> None:
    """Refuse loaded weights that are not exactly ``expected`` (a freshly built module's state dict):
    the same names and shapes, the same dtypes, and finite values only."""
    import torch

    got = {k: tuple(v.shape) for k, v in tensors.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        raise error(f"{path} does not match {config}: missing {missing[:3]}, unexpected {extra[:3]}, "
                    f"wrong shape {wrong[:3]}")
    dtypes = sorted(k for k, v in tensors.items() if v.dtype != expected[k].dtype)
    if dtypes:
        k = dtypes[0]
        raise error(f"{path}: tensor {k} is {tensors[k].dtype}, but {config} makes it {expected[k].dtype} "
                    f"({len(dtypes)} tensor(s) of another dtype); the file was edited or not written by layerroute")
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise error(f"{path}: tensor {bad[0]} holds NaN or infinite values ({len(bad)} tensor(s)); the weights are "
                    f"corrupt or their training diverged, so they would route nothing sensible; train them again")


def describe_file(path) -> str:
    """What a file is (by its first bytes), for messages about a file given where another was expected."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        return f"an unreadable file ({exc.strerror or exc})"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a Stable-Baselines3 checkpoint, if it came from train-ppo's checkpoints/)"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "a safetensors weights file"
    text = head.decode("utf-8", "replace")
    for candidate in (text.split("\n", 1)[0], text):  # the first line (JSONL), then the whole head (JSON)
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        kind = data.get("format") if isinstance(data, dict) else None
        return {FORMAT: "a layerroute results store (results.jsonl)",
                "layerroute.route": "a route file"}.get(kind, "a JSON file")
    return "a file that is not JSON"


def _without(header: dict, settings: tuple[str, ...]) -> dict:
    """``header`` without the named settings."""
    kept = {k: v for k, v in (header.get("settings") or {}).items() if k not in settings}
    return {**header, "settings": kept}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def read_store(path: str | Path) -> tuple[dict, list[dict]]:
    """The header and the finished records of a store (read-only, no lock)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise StoreError(f"results store {path} does not exist")
    header, records, _ = _parse(path, "it is not a finished results store")
    return header, records


def _parse(path: Path, fix: str = "remove it or pass --overwrite") -> tuple[dict, list[dict], int]:
    """Header, records, and the byte length of the intact part (a torn last line excluded)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    good = len(data) if data.endswith(b"\n") else len(data) - len(lines[-1])
    lines = lines[:-1]  # the last element is '' or a torn line
    if not lines:
        raise StoreError(f"{path} is empty or has no complete header line; {fix}")
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
    records, seen = [], {}
    blocks = (header.get("model") or {}).get("num_layers") if isinstance(header.get("model"), dict) else None
    for n, line in enumerate(lines[1:], 2):
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{path} line {n} is corrupt (not JSON) in the middle of the store; "
                             f"it was not written by layerroute's writer") from None
        _check_record(records[-1], f"{path} line {n}", blocks if isinstance(blocks, int) else None, seen, n)
    return header, records, good


def _check_record(record, where: str, num_layers: int | None, seen: dict, n: int) -> None:
    """Refuse a record that layerroute's writer cannot have written: a key twice (it would be counted
    twice), block indices outside the model, a NaN reward or margin."""
    if not isinstance(record, dict):
        raise StoreError(f"{where} is not a JSON object: the store was edited")
    if "key" in record:
        where = f"{where} (key {record['key']!r})"
        key = _canonical(record["key"])
        if key in seen and record.get("type") != "summary":
            raise StoreError(f"{where} repeats the record of line {seen[key]}: a store holds one record per key, "
                             f"so it was edited or concatenated; remove the repeated line")
        seen[key] = n
    layers = record.get("layers")
    if layers is not None:
        ok = isinstance(layers, list) and layers and all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < (num_layers or math.inf) for b in layers)
        if not ok:
            bad = next((b for b in layers if not (isinstance(b, int) and 0 <= b < (num_layers or math.inf))), None) \
                if isinstance(layers, list) and layers else layers
            blocks = f"blocks 0..{num_layers - 1}" if num_layers else "non-negative block indices"
            raise StoreError(f"{where} has a route with block {bad!r}, but the store's model has {blocks}: the "
                             f"record was edited or written for another model")
    for part in (record, record.get("identity")):
        for field in ("reward", "margin"):
            value = part.get(field) if isinstance(part, dict) else None
            if isinstance(value, float) and math.isnan(value):
                raise StoreError(f"{where} has a NaN {field}: layerroute never stores one, so the store was edited "
                                 f"or corrupted")


class ResultsStore:
    """Append-only writer of one results file. Use as a context manager.

    ``header`` holds what defines the results: ``kind`` (e.g. ``"eval"``, ``"search:mcts"``),
    ``settings``, ``model`` (fingerprint dict), ``task``, ``split``, ``seed``. ``info`` holds
    what does not (versions, times) and is never compared.
    """

    def __init__(self, path: str | Path, header: dict | None = None, *, overwrite: bool = False,
                 info: dict | None = None):
        self.path = Path(path)
        if self.path.suffix != ".jsonl":
            self.path = self.path / FILENAME
        self.header, self.records, self._fd = None, [], None
        self._made = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _take_lock(self.path.with_name(self.path.name + ".lock"), self.path)
        self._new = not (self.path.exists() and self.path.stat().st_size)  # (decided under the lock)
        if header is not None:
            self.open(header, overwrite=overwrite, info=info)

    def open(self, header: dict, *, overwrite: bool = False, info: dict | None = None,
             growable: tuple[str, ...] = ()) -> ResultsStore:
        """Write the header, or check it against the stored one and resume. ``ResultsStore(path)``
        without a header takes only the single-writer lock, so a command can take it before it
        loads a model (a second writer is refused at once) and call ``open`` once it knows the header.
        ``growable`` names settings that only say how much work to do (a per-sample search's
        ``limit``): a store that differs in them alone keeps its records under the new header."""
        self.header = {"format": FORMAT, "version": VERSION, **header}
        try:
            self.records = self._open(overwrite, info or {}, growable)
        except BaseException:
            self.close(failed=True)
            raise
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return self

    def _open(self, overwrite: bool, info: dict, growable: tuple[str, ...]) -> list[dict]:
        if self.path.exists() and self.path.stat().st_size and not overwrite:
            old, records, good = _parse(self.path)
            theirs = {k: v for k, v in old.items() if k != "info"}
            same = _canonical(theirs) == _canonical(self.header)
            if not same and _canonical(_without(theirs, growable)) != _canonical(_without(self.header, growable)):
                diff = sorted(k for k in set(theirs) | set(self.header) if _canonical(theirs.get(k)) !=
                              _canonical(self.header.get(k)))
                detail = "; ".join(_describe_diff(k, theirs.get(k), self.header.get(k)) for k in diff)
                raise StoreError(f"{self.path} holds results made with other settings ({detail}); choose another "
                                 f"--output or pass --overwrite to replace them")
            if good < self.path.stat().st_size:
                warnings.warn(f"{self.path}: dropping a torn last line (a run was killed while writing it)",
                              stacklevel=3)
                os.truncate(self.path, good)
            if not same:  # grown: the same records under the new header, written atomically
                rest = self.path.read_bytes().split(b"\n", 1)[1].decode()
                atomic_write(self.path, _canonical({**self.header, "info": old.get("info", {})}) + "\n" + rest)
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

    def close(self, failed: bool = False) -> None:
        """Release the store. ``failed``: the run failed, so a store it created but never wrote a record
        to is removed with its lock file (a failed run leaves nothing behind)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_lock", None) is not None:
            Path(self._lock.name).unlink(missing_ok=True)  # still held: a run leaves no .lock behind
            if failed and self._new and not self.records:  # still under the lock
                self.path.unlink(missing_ok=True)
                for d in self._made:  # the folders it made, deepest first, if nothing else is in them
                    if d.is_dir() and not any(d.iterdir()):
                        d.rmdir()
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def _take_lock(lock: Path, path: Path):
    """The exclusive lock on ``lock`` (refused at once if another process holds it). A holder removes
    the file before it lets go, so a lock taken on a file no longer at ``lock`` is taken again."""
    while True:
        handle = open(lock, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(f"{path} is being written by another process; wait for it or use another "
                             f"--output") from None
        try:
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def _describe_diff(key: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if _canonical(old.get(k)) != _canonical(new.get(k)))
        return ", ".join(f"{key}.{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:4])
    return f"{key}: {old!r} there, {new!r} now"
