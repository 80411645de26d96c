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

import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ModelFileError, ModelNotFoundError, UnsupportedModelError
from .executor import verify_model
from .model_files import (_EMBEDDED, DEFAULT_MODEL, DTYPE_NAMES, cache_dir, check_device, check_dtype, check_gguf,  # noqa: F401
                          check_model_name, embedded_gguf, gguf_cache_dir)
from .stack import (SUPPORTED_FAMILIES, DecoderStack, ModelFingerprint, _first_line, decoder_stack,  # noqa: F401
                    model_fingerprint, weights_digest)

def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.split(":")[0], torch.float32)
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype(dtype)
    return getattr(torch, DTYPE_NAMES[dtype])


def dequantized_gguf_dir(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into a safetensors model directory in the cache; return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gguf_cache_dir(gguf)
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
