"""What a model is to layerroute: its decoder stack, its shape (``ModelFingerprint``) and its weights digest.

The lowest layer of the core: the executor walks a ``DecoderStack``, routes carry a
``ModelFingerprint``, stores and routers record ``weights_digest``. Loading a model (and checking it
with the executor) is ``layerroute.models``, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict, dataclass

import torch

from .errors import FingerprintMismatchError, UnsupportedModelError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
