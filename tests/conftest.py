"""Shared fixtures: tiny models built in seconds, an isolated LLMOPT_HOME.

- `tiny_model_dir`: a *trained* small Llama (builtin corpus, BPE tokenizer) — a real LM, built once per session.
- `tiny_qwen2_dir`: a random Qwen2 (attention biases, GQA) sharing that tokenizer — a second architecture.
- `tiny_llama_random_dir`: a random Llama with the same tokenizer (fast, for shape/plumbing tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the user's cache.
os.environ.setdefault("LLMOPT_HOME", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"llmopt-test-home-{os.getpid()}"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """Build the test-sized builtin model once; returns its BuildReport."""
    from llmopt.models.builtin import build
    from tests.helpers.builtin_recipes import small_recipe

    out = tmp_path_factory.mktemp("models") / "tiny-test"
    return build("test-tiny", out=out, recipe=small_recipe())


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_build) -> Path:
    return Path(tiny_build.path)


def _random_model(config, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return _random_model(cfg, tiny_model_dir, tmp_path_factory.mktemp("models") / "qwen2-random")


@pytest.fixture(scope="session")
def tiny_llama_random_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return _random_model(cfg, tiny_model_dir, tmp_path_factory.mktemp("models") / "llama-random")


CHECKPOINT_FAST = ["--samples", "8", "--seq-len", "64", "--device", "cpu", "--group-size", "32"]


@pytest.fixture(scope="session")
def llmopt_checkpoints(tiny_model_dir, tmp_path_factory):
    """A session's worth of llmopt's GPTQ (compressed-tensors, gptq) and AWQ (awq) outputs of the trained tiny
    model (the verify and backend tests share them)."""
    from typer.testing import CliRunner

    from llmopt.cli.main import app

    base = tmp_path_factory.mktemp("verify")
    out = {}
    for method, fmt in (("gptq", "compressed-tensors"), ("gptq", "gptq"), ("awq", "awq")):
        path = base / f"{method}-{fmt}"
        r = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--method", method, "--format", fmt,
                                     "--out", str(path), "--no-evaluate", *CHECKPOINT_FAST])
        assert r.exit_code == 0, r.output
        out[fmt] = path
    return out


