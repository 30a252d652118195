"""models info: the KV-cache formula against bytes a real cache allocates; the CLI output."""

import json

import torch
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.models import ModelSpec, attention_shape, kv_bytes, load_model


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
    r = CliRunner().invoke(app, ["models", "info", str(tiny_model_dir), "--context", "2048", "--batch", "4", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    lm = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    params = sum(p.numel() for p in lm.model.parameters())
    assert info["params"] == params and info["weight_bytes"] == params * 4
    layers, _, kv_heads, head_dim = attention_shape(lm.config)
    assert info["kv_bytes_per_token"] == 2 * layers * kv_heads * head_dim * 4
    assert info["kv_bytes"] == info["kv_bytes_per_token"] * 2048 * 4


def test_info_table_and_bad_context(tiny_model_dir):
    runner = CliRunner()
    r = runner.invoke(app, ["models", "info", str(tiny_model_dir), "--dtype", "bfloat16"])
    assert r.exit_code == 0 and "KV bytes" in r.output and "bfloat16" in r.output
    r = runner.invoke(app, ["models", "info", str(tiny_model_dir), "--context", "0"])
    assert r.exit_code == 2
