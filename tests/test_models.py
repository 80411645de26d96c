"""Model loading and the structure check."""

import pytest
import torch
import transformers as tf

from layerroute import ModelNotFoundError, UnsupportedModelError, decoder_stack, load_model
from layerroute.models import cache_dir

from .conftest import tiny_model


def test_error_model_path_does_not_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "nope.gguf"))


def test_error_hub_id_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-org/no-such-model': not an embedded model"):
        load_model("no-such-org/no-such-model")


def test_error_encoder_only_model(tmp_path):
    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)
    tf.BertModel(config).save_pretrained(tmp_path / "bert")
    tok_dir = tmp_path / "bert"
    (tok_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    with pytest.raises(UnsupportedModelError, match="BertLMHeadModel is not supported: it looks encoder-only"):
        load_model(str(tok_dir))
    config = tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    tf.DistilBertModel(config).save_pretrained(tmp_path / "distil")
    with pytest.raises(UnsupportedModelError, match="DistilBertConfig .*no causal-LM head"):
        load_model(str(tmp_path / "distil"))


def test_error_unsupported_decoder_names_class_and_families():
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel is not supported.*families: llama, qwen2"):
        decoder_stack(gpt2)


def test_load_local_directory_is_frozen(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "m")
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer())
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.dtype == torch.float32
    assert decoder_stack(loaded).fingerprint.key() == ("qwen3", 5, 64)


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERROUTE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LAYERROUTE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "layerroute"


@pytest.mark.slow
def test_embedded_default_loads_from_cache(smollm):
    model, tok, ex = smollm
    assert type(model).__name__ == "LlamaForCausalLM" and ex.num_layers == 30
    assert ex.fingerprint.hidden_size == 576
    assert any(p.suffix == ".safetensors" for p in cache_dir().glob("models/*/*"))


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))


# ---- support is verified, not assumed -------------------------------------------------------

@pytest.mark.parametrize("family, scales", [
    ("granite", {"embed_multiplier": 12.0, "logit_divisor": 8.0}),
    ("cohere", {"logit_multiplier": 0.0625}),
])
def test_scaling_outside_the_layers_is_reproduced_or_refused(family, scales, monkeypatch):
    from layerroute import NotExactError, RouteExecutor

    ex = RouteExecutor(tiny_model(family))
    assert ex.check.passed and ex.check.max_diff <= 1e-5
    assert {k: getattr(ex.stack, k) for k in scales} == scales
    # Without the support the self-check refuses the model: never silently wrong.
    monkeypatch.setattr("layerroute.stack._scales", lambda *a: {})
    cls = type(ex.model).__name__
    with pytest.raises(NotExactError, match=rf"{cls} failed .*self-check.*logits differ from the HF forward by"):
        RouteExecutor(tiny_model(family, seed=1))


def test_a_model_that_computes_outside_its_layers_is_refused():
    from layerroute import NotExactError, RouteExecutor

    class HalfLogitsLlama(tf.LlamaForCausalLM):  # a family the structure check cannot tell apart
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = HalfLogitsLlama(tiny_model("llama").config).eval()
    with pytest.raises(NotExactError, match=r"HalfLogitsLlama failed.*2 times the model's: the model scales its "
                                            r"logits outside its decoder layers"):
        RouteExecutor(model)
    # NanoChat's structure matches, but its forward does more than embed, blocks, norm, head.
    config = tf.NanoChatConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(NotExactError, match="NanoChatForCausalLM failed.*outside its decoder layers"):
        RouteExecutor(tf.NanoChatForCausalLM(config).eval())


def test_hybrid_chunked_and_multimodal_models_are_refused_with_the_reason():
    small = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    with torch.device("meta"):  # the reasons come from the config; no weights needed
        cases = [
            (tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**small, layer_types=["linear_attention", "full_attention"])),
             r"Qwen3NextForCausalLM is not supported: it is a hybrid model: 1 of its 2 layers is 'linear_attention'"),
            (tf.Llama4ForCausalLM(tf.Llama4TextConfig(**small, attention_chunk_size=16)),
             r"Llama4ForCausalLM is not supported: it uses chunked attention .*chunks of 16 tokens"),
            (tf.Lfm2ForCausalLM(tf.Lfm2Config(**small, layer_types=["conv", "full_attention"], pad_token_id=0)),
             r"Lfm2ForCausalLM is not supported: .* 'conv', not softmax attention"),
            (tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
                text_config=small, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=28, patch_size=14))),
             r"Gemma3ForConditionalGeneration is not supported: it is a multimodal model \(gemma3: text with vision\)"
             r".*text-only class Gemma3ForCausalLM"),
        ]
    for model, reason in cases:
        with pytest.raises(UnsupportedModelError, match=reason):
            decoder_stack(model)


# ---- unreadable model files ----------------------------------------------------------------------

def test_error_unreadable_gguf(tmp_path):
    from layerroute import ModelFileError

    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "junk.gguf").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + bytes(60))  # right magic, truncated header
    with pytest.raises(ModelFileError, match="GGUF file .*empty.gguf is empty"):
        load_model(str(tmp_path / "empty.gguf"))
    with pytest.raises(ModelFileError, match="junk.gguf is not a GGUF file"):
        load_model(str(tmp_path / "junk.gguf"))
    with pytest.raises(ModelFileError, match="GGUF file .*cut.gguf is corrupt: cannot read its header"):
        load_model(str(tmp_path / "cut.gguf"))


def test_error_corrupt_model_directory(tmp_path):
    from layerroute import ModelFileError

    model = tiny_model("llama")
    for name in ("config", "weights", "tokenizer"):
        model.save_pretrained(tmp_path / name)
        tf.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer()).save_pretrained(tmp_path / name)
    (tmp_path / "config" / "config.json").write_text("{not json")
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ModelFileError, match="cannot read the config of .*config"):
        load_model(str(tmp_path / "config"))
    with pytest.raises(ModelFileError, match="cannot load the weights of .*weights"):
        load_model(str(tmp_path / "weights"))
    with pytest.raises(ModelFileError, match="cannot load the tokenizer of .*tokenizer"):
        load_model(str(tmp_path / "tokenizer"))


def test_error_unavailable_device_and_unknown_dtype(tmp_path):
    from layerroute import InputError

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device 'cuda' was asked for but torch sees no CUDA GPU"):
            load_model(str(tmp_path), device="cuda")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        load_model(str(tmp_path), device="tpu")
    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        load_model(str(tmp_path), dtype="float8")
