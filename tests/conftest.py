"""Shared fixtures: tiny random-weight models of every supported family, and SmolLM2-135M."""

import pytest
import torch
import transformers as tf

from layerroute import RouteExecutor

# Small enough to be fast; sliding windows shorter than the test prompts so window masks matter.
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=6)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(sliding_window=6)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(sliding_window=6)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(pad_token_id=0)),
    # Families that scale outside their decoder layers, which the executor reproduces:
    # Granite multiplies the embeddings and divides the logits, Cohere multiplies the logits.
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(embedding_multiplier=12.0, logits_scaling=8.0,
                                                               residual_multiplier=0.22, attention_multiplier=0.0625)),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.0625, pad_token_id=0)),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config).eval().requires_grad_(False)
    # Random init leaves tiny weights; scale up so that routing changes the logits visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def altered_checkpoints(family: str = "llama", **overrides) -> dict:
    """Checkpoints equal to ``tiny_model(family, **overrides)`` but for one tensor (scaled), or for
    one value of one tensor (the last of the embeddings: a digest of strided samples misses it)."""
    whole, one = tiny_model(family, **overrides), tiny_model(family, **overrides)
    with torch.no_grad():
        whole.model.layers[2].mlp.up_proj.weight.mul_(1.5)
        one.model.embed_tokens.weight.view(-1)[-1] += 1.0
    return {"one tensor": whole, "one value": one}


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct (the embedded default), dequantized once into the user cache."""
    from layerroute import load_model

    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer, RouteExecutor(model)


def padded_batch(vocab: int, lengths, total: int, seed: int = 0):
    """Left-padded random token ids and mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1
        ids[b, : total - n] = 0
    return ids, mask


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer (from the embedded model)."""
    from transformers import AutoTokenizer

    from layerroute.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def tiny(tok):
    """A random 5-block Llama over SmolLM2's vocabulary: fast, exact, and real tokenization."""
    return RouteExecutor(tiny_model("llama", vocab_size=len(tok)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 5-block Llama with SmolLM2's tokenizer, saved as a model directory."""
    from transformers import AutoTokenizer

    from layerroute.models import resolve_model_path

    d = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def assert_logits_close(actual, expected, rel: float = 1e-5):
    """Logits agree within ``rel`` of their scale: max |a - b| <= rel * max(1, max |b|).

    fp32 rounding grows with the logits' size and the context length, so a fixed absolute
    bound is either loose for small logits or flaky for long contexts."""
    scale = max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * scale, f"logits differ by {diff:.3g}, more than {rel:g} x their scale {scale:.3g}"
