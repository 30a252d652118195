"""models info: the KV-cache formula against bytes a real cache allocates; the CLI output."""

import json

import pytest
import torch
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.models import ModelSpec, attention_shape, kv_bytes, load_model
from llmopt.models.info import kv_layout


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def test_kv_formula_matches_dynamic_cache(tiny_qwen2_dir):
    lm = load_model(ModelSpec(str(tiny_qwen2_dir), device="cpu"))
    prompt = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 200]])
    new = 24
    out = lm.model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            return_dict_in_generate=True, pad_token_id=3)
    layers, _, kv_heads, head_dim = attention_shape(lm.config)
    assert kv_heads < lm.config.num_attention_heads  # GQA counts kv heads, not query heads
    tokens = out.sequences.shape[1] - 1  # the last sampled token is never fed back, so never cached
    formula = kv_bytes(layers, kv_heads, head_dim, tokens, 4)
    measured = _cache_bytes(out.past_key_values)
    assert abs(measured - formula) <= 0.05 * formula


def test_info_json(tiny_model_dir):
    """Counted by hand from the test recipe (tests/helpers/builtin_recipes.py): vocab 512, hidden 128, MLP 256,
    2 layers, 4 heads of 32 over 2 kv heads, untied head."""
    r = CliRunner().invoke(app, ["models", "info", str(tiny_model_dir), "--context", "2048", "--batch", "4", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    attn = 128 * 128 + 2 * 128 * (2 * 32) + 128 * 128  # q, k and v (2 kv heads · 32), o
    layer = attn + 3 * 128 * 256 + 2 * 128  # gate, up, down; two RMSNorms
    params = 2 * 512 * 128 + 2 * layer + 128  # embeddings + lm_head, layers, final norm
    assert info["params"] == params == 426_624 and info["weight_bytes"] == params * 4
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4 == 1024  # layers · (K + V) · kv heads · head dim · fp32
    assert info["kv_bytes"] == 1024 * 2048 * 4  # · context · batch


def test_info_table_and_bad_context(tiny_model_dir):
    runner = CliRunner()
    r = runner.invoke(app, ["models", "info", str(tiny_model_dir), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    lines = [line.strip("│ ") for line in r.output.splitlines() if line.count("│") == 3]
    rows = dict(tuple(c.strip() for c in line.split("│")) for line in lines)
    # the same hand count as test_info_json, in 2-byte elements, default context 4096
    assert rows["parameters"] == "426,624" and rows["dtype"] == "bfloat16"
    assert rows["weight bytes"] == "833.25 KiB (853,248 B)"
    assert rows["KV bytes / token"] == "512 B" and rows["full-attention layers"] == "2 × 256 B / token"
    assert rows["KV bytes (1 × 4096 tokens)"] == "2.00 MiB (2,097,152 B)"
    r = runner.invoke(app, ["models", "info", str(tiny_model_dir), "--context", "0"])
    assert r.exit_code == 2 and "--context and --batch must be positive" in r.output


def _family(name: str, **kw):
    from tests.helpers.family_models import family_config, family_model

    return family_config(name, **kw), family_model


@pytest.mark.parametrize("family", ["llama", "mistral", "starcoder2", "gemma2", "gemma3_text", "exaone4",
                                    "deepseek_v3"])
def test_kv_layout_matches_what_the_engine_caches(family):
    from llmopt.engine import EngineConfig, LLMEngine

    _, family_model = _family(family)
    model = family_model(family)
    layout = kv_layout(model.config)
    engine = LLMEngine(model, EngineConfig(kv_budget=10 ** 7, block_size=4))
    windows = [s.window for s in engine.specs]
    assert layout.sliding_layers == sum(w is not None for w in windows)
    assert layout.full_layers == windows.count(None)
    assert layout.window == max((w for w in windows if w is not None), default=None)
    assert layout.layers * layout.layer_bytes_per_token(4) == engine.kv_bytes_per_token


@pytest.mark.parametrize("family", ["gemma3_text", "deepseek_v3"])
def test_sliding_cap_and_mla_latent_match_hf_cache(family):
    _, family_model = _family(family)
    model = family_model(family, **({"experts_implementation": "eager"} if family == "deepseek_v3" else {}))
    layout = kv_layout(model.config)
    out = model.generate(torch.arange(4, 34)[None], max_new_tokens=10, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=3)
    tokens = out.sequences.shape[1] - 1
    measured = _cache_bytes(out.past_key_values)
    if family == "deepseek_v3":  # transformers caches MLA's latent, as vLLM does
        assert measured == layout.latent_bytes(tokens, 4) < layout.bytes(tokens, 4)
    else:  # between steps HF's sliding layers keep window − 1 tokens; the step's own query token makes window
        assert layout.bytes(tokens, 4) - measured == layout.sliding_layers * layout.layer_bytes_per_token(4)


def test_info_json_counts_sliding_layers_and_mla_latent(tmp_path):
    runner = CliRunner()
    _, family_model = _family("gemma3_text")
    family_model("gemma3_text").save_pretrained(tmp_path / "g")
    info = json.loads(runner.invoke(app, ["models", "info", str(tmp_path / "g"), "--context", "100", "--json",
                                          "--dtype", "float32"]).output)
    per = 2 * 2 * 16 * 4  # kv heads · (K + V) head dim 16 · float32
    assert (info["full_layers"], info["sliding_layers"], info["sliding_window"]) == (2, 2, 8)
    assert info["kv_bytes_per_token"] == 4 * per and info["kv_bytes"] == (2 * 100 + 2 * 8) * per
    family_model("deepseek_v3").save_pretrained(tmp_path / "d")
    r = runner.invoke(app, ["models", "info", str(tmp_path / "d"), "--context", "100", "--dtype", "float32"])
    assert r.exit_code == 0 and "MLA" in r.output
    info = json.loads(runner.invoke(app, ["models", "info", str(tmp_path / "d"), "--context", "100", "--json",
                                          "--dtype", "float32"]).output)
    assert (info["k_head_dim"], info["v_head_dim"]) == (32, 16)
    assert info["kv_bytes"] == 2 * 100 * 4 * (32 + 16) * 4  # layers · tokens · heads · (K + V) · float32
    assert info["latent_kv_bytes"] == 2 * 100 * (32 + 16) * 4  # layers · tokens · (kv_lora_rank + rope) · float32


def test_info_says_what_quantizes_and_what_the_engine_serves(tmp_path):
    """The support line comes from the registry and the engine's own probe (run on the meta device): windows and
    softcapping are named, ALiBi Falcon is refused with the engine's reason, an architecture outside the registry
    gets only the methods that need no scale mappings."""
    _, family_model = _family("gemma2")

    def support(name: str, **overrides) -> dict:
        family_model(name, **overrides).save_pretrained(tmp_path / name)
        r = CliRunner().invoke(app, ["models", "info", str(tmp_path / name), "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["supported"]

    gemma2 = support("gemma2")
    assert gemma2["methods"] == ["rtn", "int8", "gptq", "awq", "w8a8"]
    assert gemma2["engine"] == "served: full + sliding 8 attention, softcap"
    alibi = support("falcon", new_decoder_architecture=False, multi_query=False, num_kv_heads=4, alibi=True)
    assert alibi["engine"].startswith("refused: ALiBi")
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    GPTBigCodeForCausalLM(GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=512)).save_pretrained(
        tmp_path / "bigcode")
    r = CliRunner().invoke(app, ["models", "info", str(tmp_path / "bigcode"), "--json"])
    assert json.loads(r.output)["supported"]["methods"] == ["rtn", "int8", "gptq"]
