"""KV-quantization quality through the engine's cache, against independent references."""

import pytest
import torch

from llmopt.engine.kv_format import fp8_dtype
from llmopt.errors import LlmoptError
from llmopt.evaluate.kv_quality import measure_kv_quality


def _windows(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    """A random float64 Llama (GQA 4/2 heads): float64 so the float-KV path can be held to HF's forward exactly."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3)
    return AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()


def test_float_kv_is_the_hf_float64_forward(model):
    windows = _windows(2, 150)
    q = measure_kv_quality(model, windows, "auto", chunk=32)
    assert q.kld_mean == 0 and q.top1 == 1 and q.perplexity == q.float_perplexity and q.kv_dtype == "float64"
    # the float-KV run's perplexity is HF's own float64 forward's, computed independently here
    nll = 0.0
    for w in windows:
        with torch.no_grad():
            lp = model(torch.tensor([w])).logits[0, :-1].log_softmax(-1)  # [L-1, V]
        nll -= float(lp.gather(-1, torch.tensor(w[1:])[:, None]).sum())
    assert q.float_perplexity == pytest.approx(float(torch.exp(torch.tensor(nll / (2 * 149)))), rel=1e-10)
    assert q.tokens == 2 * 149


@pytest.mark.parametrize("kv", ["int8", "float16"] + (["fp8_e4m3"] if fp8_dtype() is not None else []))
def test_quantized_kv_costs_a_little(model, kv):
    q = measure_kv_quality(model, _windows(2, 150, seed=1), kv, chunk=32)
    assert 0 < q.kld_mean < {"int8": 1e-6, "float16": 1e-9, "fp8_e4m3": 1e-5}[kv]
    assert q.kld_mean <= q.kld_p99 and q.top1 > 0.98  # a random model: near-flat distributions, near-ties
    assert q.perplexity == pytest.approx(q.float_perplexity, rel=1e-3)
    d = q.to_quality()
    assert set(d) >= {"kv_kld_mean", "kv_kld_p99", "kv_top1", "kv_perplexity"} and d["kv_dtype"] == kv
    # no calibrated checkpoint scales: 8-bit caches code with per-(token, kv head) scales, float16 has none
    assert d["kv_scales"] == ("none" if kv == "float16" else "dynamic per (token, kv head)")


def test_int8_worse_than_float16_kv(model):
    w = _windows(1, 200, seed=2)
    assert measure_kv_quality(model, w, "int8").kld_mean > measure_kv_quality(model, w, "float16").kld_mean


def test_bad_windows_refused(model):
    with pytest.raises(LlmoptError, match="at least 2 tokens"):
        measure_kv_quality(model, [[5]], "int8")


FAST = ["--num-requests", "4", "--prompt-len", "8:24", "--output-len", "4:8", "--seq-len", "64",
        "--quality-tokens", "512", "--kv-budget", "4MiB", "--threads", "1", "--repeats", "1", "--no-warmup"]


def _eval(*args):
    from typer.testing import CliRunner

    from llmopt.cli.main import app

    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_eval_kv_dtype_int8_reports_kv_quality_bytes_and_gates(tiny_model_dir, tmp_path):
    import json

    from llmopt.recipes.gates import evaluate_gate, flatten_result, parse_gate

    j, c = tmp_path / "kv.json", tmp_path / "kv.csv"
    r = _eval(tiny_model_dir, *FAST, "--kv-dtype", "int8", "--json", j, "--csv", c)
    assert r.exit_code == 0, r.output
    e = json.loads(j.read_text())["results"][0]
    q, m = e["quality"], e["memory"]
    assert q["kv_dtype"] == "int8" and q["kv_tokens"] == 8 * 63  # 512 tokens in 8 windows of 64
    assert 0 < q["kv_kld_mean"] <= q["kv_kld_p99"] and q["kv_top1"] > 0.9
    assert q["kv_perplexity"] == pytest.approx(q["kv_float_perplexity"], rel=0.01)
    assert m["kv_dtype"] == "int8" and m["kv_bytes_allocated"] == m["kv_bytes_formula"] + m["kv_waste_bytes"]
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["head_dim"] + 1)  # codes + E8M0 scales
    assert m["kv_bytes_formula"] == m["kv_peak_tokens"] * per_token
    assert "KV KLD" in r.output and "int8 KV vs float KV" in r.output and "kv_kld_mean" in c.read_text()
    flat = flatten_result(e)
    assert flat["kv_kld_mean"] == q["kv_kld_mean"]
    assert evaluate_gate(parse_gate("m.kv_kld_mean < 0.01"), {"m": flat}).passed


def test_eval_float_kv_reports_no_kv_quality(tiny_model_dir, tmp_path):
    import json

    j = tmp_path / "f.json"
    r = _eval(tiny_model_dir, *FAST, "--kv-dtype", "float32", "--json", j)  # the model's own dtype: nothing lost
    assert r.exit_code == 0, r.output
    e = json.loads(j.read_text())["results"][0]
    assert "kv_kld_mean" not in e["quality"] and e["memory"]["kv_dtype"] == "float32"


@pytest.mark.parametrize("case", ["unknown", "hf", "fp8_missing"])
def test_bad_kv_dtype_is_one_line_exit_2(case, tiny_model_dir, monkeypatch):
    args = {"unknown": ["--kv-dtype", "int4"], "hf": ["--kv-dtype", "int8", "--engine", "hf"],
            "fp8_missing": ["--kv-dtype", "fp8_e4m3"]}[case]
    if case == "fp8_missing":
        monkeypatch.setattr("llmopt.engine.kv_format.fp8_dtype", lambda: None)
    r = _eval(tiny_model_dir, *FAST, "--perf-only", *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip().startswith("error:")]
    expect = {"unknown": "--kv-dtype must be one of", "hf": "--engine hf keeps its own",
              "fp8_missing": "needs torch.float8_e4m3fn"}[case]
    assert len(lines) == 1 and expect in r.output.replace("\n", " ")
