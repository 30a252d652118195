"""--kv-dtype: quantized (int8, fp8_e4m3) and float KV caches against float64 references, their bytes with scales,
what a fixed budget holds, and the one-line refusals."""

import pytest
import torch

from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
from llmopt.engine.attention import LayerSpec, PagedKVCache, kv_bytes_per_token
from llmopt.engine.kv_format import KV_DTYPES, dequantize, fp8_dtype, quantize, resolve_kv_format
from llmopt.engine.speculative import attach_draft
from llmopt.errors import LlmoptError

LENGTHS = [1, 5, 17, 33, 16, 40, 9]
OUTS = [6, 12, 20, 5, 9, 16, 11]
QUANTIZED = ["int8"] + (["fp8_e4m3"] if fp8_dtype() is not None else [])


def run(model, ps, outs, **config):
    engine = LLMEngine(model, EngineConfig(**({"kv_budget": 10 ** 8, "block_size": 4} | config)))
    for p, o in zip(ps, outs):
        engine.add(p, SamplingParams(max_tokens=o, ignore_eos=True))
    return engine, [s.output for s in engine.run()]


def kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in float64."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("kv", QUANTIZED)
def test_quantize_error_is_within_half_a_step(kv):
    fmt = resolve_kv_format(kv, torch.float64)
    x = torch.randn(50, 3, 16, dtype=torch.float64) * torch.logspace(-3, 2, 50, dtype=torch.float64)[:, None, None]
    x[7, 1] = 0  # an all-zero head must stay zero, not NaN
    codes, scale = quantize(x, fmt)
    assert codes.dtype == fmt.dtype and scale.shape == (50, 3)
    back = dequantize(codes, scale, torch.float64)
    amax = x.abs().amax(-1, keepdim=True)  # [50, 3, 1]
    # int8's power-of-two scale is ≥ amax/127 and < 2·amax/127: ≤ half a step < amax/127; fp8 e4m3 (float16
    # scale): 3 mantissa bits, ≤ 2^-4 relative
    bound = amax / 127 if kv == "int8" else torch.maximum(x.abs() * 2 ** -4, amax / 448 * 2 ** -9)
    assert ((back - x).abs() <= bound * 1.01 + 1e-12).all()
    assert (back[7, 1] == 0).all()
    if kv == "int8":  # E8M0 scales: exact powers of two, never below amax / qmax and under twice it (live heads)
        values, live = torch.exp2(scale.double() - 127), amax[..., 0] > 0
        assert scale.dtype == torch.uint8
        assert (values[live] >= amax[..., 0][live] / 127).all() and (values[live] < 2 * amax[..., 0][live] / 127).all()


@pytest.mark.parametrize("kv", QUANTIZED)
@pytest.mark.parametrize("dim", [16, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_dequant_equals_the_reference(kv, dim, dtype):
    from llmopt.engine.attention import _gather_dequant

    fmt = resolve_kv_format(kv, dtype)
    codes, scale = quantize(torch.randn(9, 4, 2, dim), fmt)  # [N, bs, Hkv, D], [N, bs, Hkv]
    tables = torch.tensor([[3, 0, 8], [1, 1, 5]])  # [B, nb]
    want = dequantize(codes[tables], scale[tables], dtype).view(2, 12, 2, dim).transpose(1, 2)  # [B, Hkv, S, D]
    assert torch.equal(_gather_dequant(codes, scale, tables, dtype), want)


@pytest.mark.skipif(fp8_dtype() is None, reason="this torch has no float8_e4m3fn")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_codes_convert_exactly(dtype):
    from llmopt.engine.kv_format import codes_to

    codes = torch.arange(256, dtype=torch.uint8).view(fp8_dtype()).view(16, 16)  # every e4m3fn bit pattern
    want = codes.to(dtype)  # torch's own cast
    got = codes_to(codes, dtype)
    real = ~want.isnan()
    assert got.dtype == dtype and torch.equal(got[real], want[real]) and real.sum() == 254


@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16", *QUANTIZED])
def test_greedy_tokens_and_teacher_forced_kld_vs_float64(kv, llama64, prompts, reference, read_path):
    ps = prompts(LENGTHS)
    engine, outs = run(llama64, ps, OUTS, kv_dtype=kv)
    # this float64 model's greedy margins are wide enough that every KV format keeps every token
    assert outs == [reference(llama64, p, o) for p, o in zip(ps, OUTS)]
    tokens = prompts([200], seed=5)[0]
    ref = llama64(torch.tensor([tokens])).logits[0]  # [200, V] float64 HF forward, its own attention
    got = engine.teacher_forced_logits(tokens, chunk=16)
    d = kld(ref, got)
    assert 0 < d.mean() < {"float32": 1e-14, "float16": 1e-9, "bfloat16": 1e-7, "int8": 1e-6, "fp8_e4m3": 1e-5}[kv]
    assert (d[1:] > 0).all() if kv in QUANTIZED else True  # every query after the first reads quantized keys


def test_auto_kv_is_the_model_dtype_and_exact(llama64, prompts):
    engine, _ = run(llama64, prompts([3]), [2])
    assert engine.kv_format.dtype == torch.float64 and not engine.kv_format.scaled
    assert engine.kv_stats().kv_dtype == "float64"
    tokens = prompts([120], seed=2)[0]
    ref = llama64(torch.tensor([tokens])).logits[0]
    assert torch.allclose(engine.teacher_forced_logits(tokens, chunk=7), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kv", QUANTIZED)
def test_quantized_kv_bytes_with_scales(kv, build_model):
    # head_dim 32 as builtin:tiny: int8 codes + a 1-byte E8M0 scale per (token, head) = (32 + 1) / (4 · 32) of
    # float32 (the targets: ≤ 0.27× float32, ≤ 0.53× bfloat16); fp8 codes + a float16 scale: (32 + 2) / 128
    specs = [LayerSpec(kv_heads=2, k_head_dim=32, v_head_dim=32)] * 4
    f32 = PagedKVCache.allocate(specs, 10, 16, resolve_kv_format("float32", torch.float32), torch.device("cpu"))
    q = PagedKVCache.allocate(specs, 10, 16, resolve_kv_format(kv, torch.float32), torch.device("cpu"))
    assert q.total_bytes == 10 * 16 * kv_bytes_per_token(specs, q.fmt)  # the formula counts the scales
    assert q.total_bytes == sum(t.numel() * t.element_size() for t in q.k + q.v + q.k_scale + q.v_scale)
    scale_bytes = 1 if kv == "int8" else 2  # int8: E8M0; fp8_e4m3: float16
    assert q.total_bytes / f32.total_bytes == pytest.approx((32 + scale_bytes) / 128)
    if kv == "int8":
        assert (32 + 1) / 128 <= 0.27 and (32 + 1) / 64 <= 0.53
    # the engine's KVStats: allocated = peak blocks' bytes, formula = peak tokens · bytes per token, both with scales
    model = build_model(dtype=torch.float32)
    engine, _ = run(model, [[5] * 30, [6] * 11], [4, 4], kv_dtype=kv)
    st = engine.kv_stats()
    per_token = 2 * (2 * 2 * 16 * 1 + 2 * 2 * scale_bytes)  # layers · (K+V codes · 1 byte + K and V scales)
    assert st.formula_bytes == st.peak_tokens * per_token and st.kv_dtype == kv
    assert st.allocated_bytes == st.peak_blocks * 4 * per_token


def test_fixed_budget_holds_more_int8_sequences(build_model, prompts):
    model = build_model(dtype=torch.float32)
    ps = prompts([40] * 8, seed=4)
    budget = LLMEngine(model, EngineConfig(kv_budget=10 ** 6, block_size=4)).cache.bytes_per_block * 45
    f32, f_out = run(model, ps, [20] * 8, kv_budget=budget)
    i8, i_out = run(model, ps, [20] * 8, kv_budget=budget, kv_dtype="int8")
    # 45 float32 blocks hold 3 of these 15-block requests at once; int8 (+ scales) packs 64 / 17 as many blocks in:
    # all 8 run together
    assert i8.blocks.stats.num_blocks >= 1.9 * f32.blocks.stats.num_blocks
    assert i8.scheduler.num_preemptions == 0 < f32.scheduler.num_preemptions
    assert i8.kv_stats().peak_tokens >= 1.9 * f32.kv_stats().peak_tokens
    assert sum(a == b for x, y in zip(f_out, i_out) for a, b in zip(x, y)) >= 0.95 * 8 * 20


def test_speculative_draft_uses_the_kv_dtype(llama64, prompts):
    import copy

    draft = copy.deepcopy(llama64)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    ps = prompts([3, 17, 30])
    _, plain = run(llama64, ps, [10, 9, 12], kv_dtype="int8")
    engine = LLMEngine(llama64, EngineConfig(kv_budget=10 ** 8, block_size=4, kv_dtype="int8"))
    spec = attach_draft(engine, draft, 3)
    assert spec.cache.fmt.name == "int8" and spec.cache.k_scale
    for p, o in zip(ps, [10, 9, 12]):
        engine.add(p, SamplingParams(max_tokens=o, ignore_eos=True))
    assert [s.output for s in engine.run()] == plain
    assert spec.stats.proposed > 0


def test_bad_kv_dtype_is_one_line_error(monkeypatch):
    assert set(KV_DTYPES) == {"auto", "float32", "bfloat16", "float16", "int8", "fp8_e4m3"}
    with pytest.raises(LlmoptError, match="--kv-dtype must be one of"):
        EngineConfig(kv_budget=10 ** 6, kv_dtype="int4")
    monkeypatch.setattr("llmopt.engine.kv_format.fp8_dtype", lambda: None)
    with pytest.raises(LlmoptError, match="needs torch.float8_e4m3fn") as e:
        EngineConfig(kv_budget=10 ** 6, kv_dtype="fp8_e4m3")
    assert "\n" not in str(e.value)
