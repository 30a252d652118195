"""Small in-memory models for engine tests (no tokenizer needed): float64 so that greedy comparisons
against `generate` cannot flip on a rounding-level near-tie."""

from __future__ import annotations

import pytest
import torch


def make_model(arch: str = "llama", layers: int = 2, dtype=torch.float64, seed: int = 0, vocab: int = 256):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlamaConfig(head_dim=16, **common) if arch == "llama" else Qwen2Config(tie_word_embeddings=True, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if arch == "qwen2":  # Qwen2 initialises biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def llama64():
    return make_model("llama")


@pytest.fixture(scope="session")
def qwen64():
    return make_model("qwen2", seed=1)


def _prompts(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


_REFERENCES: dict = {}


def _reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of HF generate with EOS ignored (the engine's ignore_eos); cached per model and prompt."""
    key = (id(model), tuple(prompt), n)
    if key not in _REFERENCES:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=3)
        _REFERENCES[key] = out[0, len(prompt):].tolist()
    return _REFERENCES[key]


@pytest.fixture(scope="session")
def build_model():
    return make_model


@pytest.fixture(scope="session")
def prompts():
    return _prompts


@pytest.fixture(scope="session")
def reference():
    return _reference


@pytest.fixture(params=["gathered", "in place", "flex"])
def read_path(request, monkeypatch):
    """Run the test with every decode step reading the KV cache one way: gathered into a padded batch, in place
    (the rule in model_runner.read_in_place picks by context length; the tests' contexts are short), or through
    FlexAttention's block mask (CUDA's default; eager here), which auto turns into where it can serve the cache."""
    from llmopt.engine import model_runner

    monkeypatch.setattr(model_runner, "read_in_place", lambda device, contexts: request.param == "in place")
    if request.param == "flex":
        resolve = model_runner.resolve_decode_attention

        def flex_when_auto(choice, specs, cache, dtype, *args):
            servable = choice == "auto" and not cache.fmt.scaled and cache.fmt.dtype == dtype
            return resolve("flex" if servable else choice, specs, cache, dtype, *args)

        monkeypatch.setattr(model_runner, "resolve_decode_attention", flex_when_auto)
    return request.param
