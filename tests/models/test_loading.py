"""Model resolution and loading: every bad input gets a clear LlmoptError."""

import json

import pytest
import torch

from llmopt.errors import LlmoptError
from llmopt.models import ModelSpec, load_model, resolve_path
from llmopt.models.loading import load_config


def test_loads_local_checkpoint(tiny_model_dir):
    lm = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    assert lm.device.type == "cpu" and lm.dtype == torch.float32
    assert next(lm.model.parameters()).dtype == torch.float32
    assert lm.tokenizer.pad_token_id is not None
    assert not lm.model.training


def test_dtype_override(tiny_model_dir):
    lm = load_model(ModelSpec(str(tiny_model_dir), device="cpu", dtype="bfloat16"))
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_missing_path(tmp_path):
    with pytest.raises(LlmoptError, match="does not exist"):
        resolve_path(ModelSpec(str(tmp_path / "nope")))


def test_dir_without_config(tmp_path):
    with pytest.raises(LlmoptError, match="no config.json"):
        load_model(ModelSpec(str(tmp_path), device="cpu"))


def test_encoder_only_rejected(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(LlmoptError, match="encoder-only"):
        load_config(tmp_path)


def test_pickle_only_weights_rejected(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LlmoptError, match="safetensors only"):
        load_model(ModelSpec(str(tmp_path), device="cpu"))


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LlmoptError, match="could not be fetched"):
        resolve_path(ModelSpec("nobody-here/no-such-model-xyz"))


def test_unknown_builtin():
    with pytest.raises(LlmoptError, match="unknown builtin model"):
        resolve_path(ModelSpec("builtin:huge"))


def test_bad_device_and_dtype(tiny_model_dir):
    with pytest.raises(LlmoptError, match="dtype"):
        load_model(ModelSpec(str(tiny_model_dir), device="cpu", dtype="float7"))
    if not torch.cuda.is_available():
        with pytest.raises(LlmoptError, match="no CUDA"):
            load_model(ModelSpec(str(tiny_model_dir), device="cuda"))


def test_remote_code_needs_flag(tiny_model_dir, tmp_path):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(model_type="my-custom-arch", auto_map={"AutoConfig": "modeling.MyConfig"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmoptError, match="trust-remote-code"):
        load_config(tmp_path)
