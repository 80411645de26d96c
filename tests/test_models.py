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
    with pytest.raises(ModelNotFoundError, match="cannot load model 'no-such-org/no-such-model'"):
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
