"""`llmopt quantize --kv-cache fp8|int8`: calibrated per-layer K/V scales, written where vLLM reads them
(compressed-tensors kv_cache_scheme + {attention}.k_scale / .v_scale float32 scalars), read back by llmopt's
runtime, used by the engine as static scales, and refused by `verify` when missing or all 1.0."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.checkpoint.kv_scales import QMAX

runner = CliRunner()
SAMPLES, SEQ = 8, 64


@pytest.fixture(scope="module")
def kv_ckpt(tiny_llama_random_dir, tmp_path_factory):
    from llmopt.quant.api import QuantizeArgs, quantize

    out = tmp_path_factory.mktemp("kv") / "q"
    quantize(QuantizeArgs(model=str(tiny_llama_random_dir), out=out, method="rtn", bits=8, group_size=-1,
                          samples=SAMPLES, seq_len=SEQ, evaluate=False, device="cpu", kv_cache="fp8"))
    return out


def _file_scales(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}


def _float64_amax(model_dir):
    """Independent reference: float64 model, pre-hooks on each self_attn that recompute K = rope(k_proj(h)) and
    V = v_proj(h) from the module's own inputs, amax over the same calibration windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from llmopt.calibration import DataSpec, load_token_batch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = load_token_batch(DataSpec("builtin"), tok, SAMPLES, SEQ, 0, "calib").input_ids
    amax = {}

    def hook(i):
        def pre(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            b, t, _ = h.shape
            d = module.head_dim
            k = module.k_proj(h).view(b, t, -1, d).transpose(1, 2)
            v = module.v_proj(h).view(b, t, -1, d).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            cur = amax.setdefault(i, [0.0, 0.0])
            cur[0] = max(cur[0], k.abs().max().item())
            cur[1] = max(cur[1], v.abs().max().item())
        return pre

    hooks = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return amax


def test_scales_equal_float64_amax_over_448(kv_ckpt, tiny_llama_random_dir):
    ref = _float64_amax(tiny_llama_random_dir)
    got = _file_scales(kv_ckpt)
    for i, (k, v) in ref.items():
        assert got[f"model.layers.{i}.self_attn.k_scale"].item() == pytest.approx(k / 448, rel=1e-5)
        assert got[f"model.layers.{i}.self_attn.v_scale"].item() == pytest.approx(v / 448, rel=1e-5)
    meta = json.loads((kv_ckpt / "llmopt.json").read_text())
    assert meta["kv_cache"]["kind"] == "fp8" and meta["kv_cache"]["qmax"] == 448.0
    assert meta["kv_cache"]["k_scale"][0] == pytest.approx(got["model.layers.0.self_attn.k_scale"].item())


def test_checkpoint_layout_is_what_vllm_reads(kv_ckpt):
    qc = json.loads((kv_ckpt / "config.json").read_text())["quantization_config"]
    # vLLM CompressedTensorsKVCacheMethod.validate_kv_cache_scheme: 8 bits, float, strategy tensor, symmetric
    assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                     "dynamic": False, "group_size": None}
    scales = _file_scales(kv_ckpt)
    # vLLM BaseKVCacheMethod.create_weights: torch.tensor(-1.0) scalars under the attention module
    assert sorted(scales) == sorted(f"model.layers.{i}.self_attn.{w}_scale" for i in range(2) for w in "kv")
    for t in scales.values():
        assert t.shape == () and t.dtype == torch.float32 and 0 < t.item() != 1.0


def test_reload_gives_the_same_scales_and_engine_uses_them(kv_ckpt):
    from llmopt.engine import EngineConfig, LLMEngine
    from llmopt.models import ModelSpec, load_model

    model = load_model(ModelSpec(str(kv_ckpt), "cpu", "float32")).model
    table = model.kv_cache_scales
    scales = _file_scales(kv_ckpt)
    assert table.kind == "fp8"
    assert table.k == [scales[f"model.layers.{i}.self_attn.k_scale"].item() for i in range(2)]
    assert table.v == [scales[f"model.layers.{i}.self_attn.v_scale"].item() for i in range(2)]

    tokens = torch.randint(4, 500, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = LLMEngine(model, EngineConfig(kv_budget=10 ** 8, block_size=16)).teacher_forced_logits(tokens, 32)
    kinds = ["int8"] + (["fp8_e4m3"] if hasattr(torch, "float8_e4m3fn") else [])
    for kv in kinds:
        engine = LLMEngine(model, EngineConfig(kv_budget=10 ** 8, block_size=16, kv_dtype=kv))
        assert engine.kv_stats().kv_scales.startswith("static per layer")
        got = engine.teacher_forced_logits(tokens, 32)
        assert torch.isfinite(got).all()
        lp, lq = ref.double().log_softmax(-1), got.double().log_softmax(-1)
        kld = (lp.exp() * (lp - lq)).sum(-1)
        assert 0 < kld.mean().item() < 1e-3, (kv, kld.mean().item())
        # static: the pools hold the scale 1 for every token (no per-token amaxes) and the read applies the
        # calibrated layer scale, in this cache's code range
        from llmopt.engine.kv_format import scale_values

        qmax = 127.0 if kv == "int8" else 448.0
        used = scale_values(engine.cache.k_scale[0].view(-1)[:len(tokens)])
        assert torch.equal(used, torch.ones_like(used))
        assert engine.cache.static[0][0] == pytest.approx(table.k[0] * 448 / qmax, rel=1e-6)
    model.kv_cache_scales = None  # no calibrated scales: per-(token, kv head) dynamic ones, and it says so
    assert LLMEngine(model, EngineConfig(kv_budget=10 ** 8, kv_dtype="int8")).kv_stats().kv_scales.startswith("dynamic")
    assert LLMEngine(model, EngineConfig(kv_budget=10 ** 8)).kv_stats().kv_scales == "none"


def _rewrite(src, dst, fn):
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    save_file(fn(t), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_verify_catches_all_ones_and_missing(kv_ckpt, tmp_path):
    from llmopt.checkpoint.kv_scales import check_checkpoint

    assert check_checkpoint(kv_ckpt, json.loads((kv_ckpt / "config.json").read_text()))["layers"] == 2
    is_kv = ("self_attn.k_scale", "self_attn.v_scale")
    ones = _rewrite(kv_ckpt, tmp_path / "ones",
                    lambda t: {k: (torch.tensor(1.0) if k.endswith(is_kv) else v) for k, v in t.items()})
    missing = _rewrite(kv_ckpt, tmp_path / "missing",
                       lambda t: {k: v for k, v in t.items() if not k.endswith(is_kv)})
    for path, why in ((ones, "exactly 1.0"), (missing, "no k_scale tensors")):
        r = runner.invoke(app, ["verify", str(path), "--with", "transformers", "--device", "cpu"])
        assert r.exit_code == 1, r.output
        assert why in r.output


def test_kv_cache_refused_outside_compressed_tensors(tiny_llama_random_dir, tmp_path):
    r = runner.invoke(app, ["quantize", str(tiny_llama_random_dir), "--method", "rtn", "--format", "gptq",
                            "--kv-cache", "fp8", "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "compressed-tensors" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["quantize", str(tiny_llama_random_dir), "--kv-cache", "fp4", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--kv-cache must be fp8 or int8" in r.output


def test_int8_kind_scales_over_127(tiny_llama_random_dir, tmp_path):
    from llmopt.models import ModelSpec, load_model
    from llmopt.quant import kv_scales as kvs
    from llmopt.checkpoint import kv_scales as ckv

    model = load_model(ModelSpec(str(tiny_llama_random_dir), "cpu", "float32")).model
    ids = torch.randint(4, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    f8, i8 = kvs.calibrate(model, ids, "fp8"), kvs.calibrate(model, ids, "int8")
    assert ckv.scheme("int8")["type"] == "int"
    for a, b in zip(f8.k + f8.v, i8.k + i8.v):
        assert a * QMAX["fp8"] == pytest.approx(b * QMAX["int8"], rel=1e-6)
    assert i8.for_qmax(448.0)[0][0] == pytest.approx(f8.k[0], rel=1e-6)


def test_static_codes_clamp_past_the_calibrated_amax():
    from llmopt.engine.kv_format import dequantize, quantize_static, resolve_kv_format

    fmt = resolve_kv_format("int8", torch.float32)
    x = torch.tensor([[[0.5, -1.0, 2.0, -3.0]]])  # [T, Hkv, D]; calibrated amax 2.0 → scale 2/127
    codes, scale = quantize_static(x, 2.0 / 127, fmt)
    assert scale.shape == (1, 1) and codes.dtype == torch.int8
    back = dequantize(codes, scale, torch.float32, factor=2.0 / 127)  # the read applies the exact layer scale
    assert back[0, 0, :3].sub(x[0, 0, :3]).abs().max() <= 2.0 / 127 * 0.51
    assert back[0, 0, 3] == pytest.approx(-2.0, rel=1e-3)  # past amax: clamped to -qmax · scale


def test_per_head_scales_load_as_their_max_and_bad_scales_fail_verify(kv_ckpt, tmp_path):
    from llmopt.errors import CheckFailed
    from llmopt.models import ModelSpec, load_model
    from llmopt.checkpoint.kv_scales import check_checkpoint

    def per_head(t):  # strategy attn_head: one scale per kv head (2 here)
        return {k: (torch.stack([v * 0.5, v]) if k.endswith(("k_scale", "v_scale")) else v) for k, v in t.items()}

    path = _rewrite(kv_ckpt, tmp_path / "heads", per_head)
    table = load_model(ModelSpec(str(path), "cpu", "float32")).model.kv_cache_scales
    want = _file_scales(kv_ckpt)
    assert table.k[1] == want["model.layers.1.self_attn.k_scale"].item() and "per-head" in table.note
    config = json.loads((path / "config.json").read_text())
    assert check_checkpoint(path, config)["layers"] == 2
    neg = _rewrite(kv_ckpt, tmp_path / "neg", lambda t: {k: (-v if k.endswith("0.self_attn.v_scale") else v)
                                                         for k, v in t.items()})
    with pytest.raises(CheckFailed, match="positive and finite"):
        check_checkpoint(neg, config)


def test_cli_kv_cache_int8(tiny_llama_random_dir, tmp_path):
    out = tmp_path / "i8"
    r = runner.invoke(app, ["quantize", str(tiny_llama_random_dir), "--method", "rtn", "--bits", "8", "--group-size",
                            "-1", "--kv-cache", "int8", "--samples", "4", "--seq-len", "32", "--no-evaluate",
                            "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "KV cache scales (int8, static per layer = amax/127)" in r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["type"] == "int" and qc["kv_cache_scheme"]["strategy"] == "tensor"
    assert len(_file_scales(out)) == 4
