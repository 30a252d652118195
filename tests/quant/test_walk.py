"""The layer-by-layer pipeline on tiny models: GPTQ/AWQ beat RTN, architectures, lm_head and tied embeddings."""

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from llmopt.calibration import DataSpec, load_token_batch
from llmopt.evaluate.quality import measure_quality
from llmopt.models import LoadedModel, ModelSpec, load_model
from llmopt.quant.api import target_filter
from llmopt.quant.reference import act_quant_hooks
from llmopt.quant.walk import quantize_model
from llmopt.checkpoint.types import QuantArgs

CPU = torch.device("cpu")


class FloatModels:
    """Each checkpoint's float model, loaded once per module: `reference` is shared and never quantized, `fresh`
    a deep copy (tied embeddings stay tied) for a test to quantize in place."""

    def __init__(self) -> None:
        self._loaded: dict[str, LoadedModel] = {}

    def loaded(self, path: Path) -> LoadedModel:
        key = str(path)
        if key not in self._loaded:
            self._loaded[key] = load_model(ModelSpec(key, "cpu", "float32"))
        return self._loaded[key]

    def reference(self, path: Path) -> torch.nn.Module:
        return self.loaded(path).model

    def fresh(self, path: Path) -> torch.nn.Module:
        return copy.deepcopy(self.reference(path))


@pytest.fixture(scope="module")
def floats() -> FloatModels:
    return FloatModels()


@pytest.fixture(scope="module")
def data(tiny_model_dir, floats):
    tok = floats.loaded(tiny_model_dir).tokenizer
    calib = load_token_batch(DataSpec("builtin"), tok, 32, 64, 0, "calib").input_ids
    test = load_token_batch(DataSpec("builtin"), tok, 16, 64, 0, "test").input_ids
    return calib, test


def _run(floats, path, calib, test, method, qargs, targets=("Linear",), ignore=()):
    base, model = floats.reference(path), floats.fresh(path)
    res = quantize_model(model, calib, method, qargs, target_filter(model, list(targets), list(ignore)), CPU,
                         batch_size=8)
    act = {n: model.get_submodule(n) for n, w in res.qweights.items() if w.act_bits}
    with act_quant_hooks(act) if act else contextlib.nullcontext():
        q = measure_quality(model, test % model.config.vocab_size, base)
    return res, q, model


def test_gptq_and_awq_beat_rtn_on_trained_llama(tiny_model_dir, data, floats):
    calib, test = data
    _, rtn, _ = _run(floats, tiny_model_dir, calib, test, "rtn", QuantArgs(bits=4, group_size=32))
    gres, gptq, _ = _run(floats, tiny_model_dir, calib, test, "gptq", QuantArgs(bits=4, group_size=32))
    _, rtn_a, _ = _run(floats, tiny_model_dir, calib, test, "rtn", QuantArgs(bits=4, group_size=32, sym=False))
    ares, awq, _ = _run(floats, tiny_model_dir, calib, test, "awq", QuantArgs(bits=4, group_size=32, sym=False))
    # Held-out KLD of this 2-layer model is a handful of outlier positions (GPTQ/RTN moved from 0.16x to 0.72x
    # between two CPUs that train test-tiny differently): the halving is asserted on every layer's output error,
    # the ranking on KLD.
    assert gptq.kld_mean < rtn.kld_mean
    assert all(r.error <= 0.5 * r.rtn_error for r in gres.layers)
    # AWQ's per-group search includes s = 1 (RTN itself) on the float activations it calibrates on, so layer 0
    # (float inputs) cannot lose to RTN; past it, with 2k calibration tokens, AWQ vs RTN asym is a coin toss here
    # (layer 1 and held-out KLD 2.3x RTN's on one CPU's test-tiny): only a broken fold's blow-up is caught there.
    # The ranking on a real model is bench/quant_quality.py's (builtin:tiny, 128x256 calibration).
    assert ares.layers[0].error < ares.layers[0].rtn_error
    assert awq.kld_mean < 5 * rtn_a.kld_mean
    assert len(gres.qweights) == 2 * 7 and "lm_head" not in gres.qweights


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_eight_bit_perplexity_within_one_percent(tiny_model_dir, data, floats, method):
    calib, test = data
    res, q, _ = _run(floats, tiny_model_dir, calib, test, method, QuantArgs(bits=8, group_size=-1))
    f = measure_quality(floats.reference(tiny_model_dir), test)
    assert abs(q.perplexity / f.perplexity - 1) < 0.01
    assert all(w.act_bits == (8 if method == "w8a8" else None) for w in res.qweights.values())


@pytest.mark.parametrize("method,sym", [("gptq", True), ("awq", False), ("w8a8", True)])
def test_qwen2_biases_gqa_tied(tiny_qwen2_dir, data, floats, method, sym):
    calib, test = data
    bits = 8 if method == "w8a8" else 4
    qargs = QuantArgs(bits=bits, group_size=-1 if bits == 8 else 32, sym=sym)
    res, q, model = _run(floats, tiny_qwen2_dir, calib, test, method, qargs)
    assert res.qweights["model.layers.0.self_attn.q_proj"].bias is not None  # Qwen2 attention biases carried
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert all(torch.isfinite(torch.tensor(r.error)) and r.error < 1.2 * r.rtn_error for r in res.layers)
    assert q.top1_agreement > 0.8


def test_lm_head_only_when_named(tiny_qwen2_dir, data, floats):
    calib, test = data
    res, _, model = _run(floats, tiny_qwen2_dir, calib, test, "gptq", QuantArgs(bits=8, group_size=-1),
                         targets=("Linear", "lm_head"), ignore=("re:.*mlp.*",))
    assert "lm_head" in res.qweights and not any("mlp" in n for n in res.qweights)
    # quantizing a tied head unties it: the embeddings stay float
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert not model.config.tie_word_embeddings
    assert res.layers[-1].name == "lm_head" and res.layers[-1].error < 0.02


@pytest.mark.parametrize("method,sym", [("gptq", True), ("awq", False), ("w8a8", True)])
def test_unchecked_batches_stop_early_with_identical_codes(tiny_model_dir, data, floats, monkeypatch, method, sym):
    """Past the checked batches the stats pass stops after the last collector: the codes must not change."""
    import llmopt.quant.walk as walk

    calib, _ = data
    qargs = QuantArgs(bits=8 if method == "w8a8" else 4, group_size=-1 if method == "w8a8" else 32, sym=sym)

    def codes(check_tokens: int):
        monkeypatch.setattr(walk, "CHECK_TOKENS", check_tokens)
        model = floats.fresh(tiny_model_dir)
        return quantize_model(model, calib, method, qargs, target_filter(model, ["Linear"], []), CPU, batch_size=8)

    early = codes(64 * 8)  # 1 of 4 batches checked: 3 stop early
    full = codes(64 * 32)  # every batch checked: full forwards
    assert early.qweights.keys() == full.qweights.keys()
    for name, w in early.qweights.items():
        assert torch.equal(w.qweight, full.qweights[name].qweight), name
        assert torch.equal(w.scales, full.qweights[name].scales), name


def _quantize(floats, path, calib, method, qargs, ignore=(), **kw):
    model = floats.fresh(path)
    res = quantize_model(model, calib, method, qargs, target_filter(model, ["Linear"], list(ignore)), CPU,
                         batch_size=8, **kw)
    return res, model


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_staged_gptq_matches_layer_and_beats_rtn(request, data, floats, fixture):
    """The sublayer cut reproduces the float layer; true-sequential GPTQ is as good as the two-pass one."""
    from llmopt.quant.walk import SublayerStages, capture_inputs

    path = request.getfixturevalue(fixture)
    calib, test = data
    base = floats.reference(path)
    batch = capture_inputs(base, calib[:4], 4, CPU)[0]
    assert SublayerStages.fits(base.model.layers[0], batch)
    qargs = QuantArgs(bits=4, group_size=32)
    kld = {}
    for staged in (None, False):
        res, m = _quantize(floats, path, calib, "gptq", qargs, staged=staged)
        assert all(r.error < r.rtn_error for r in res.layers)
        kld[staged] = measure_quality(m, test % m.config.vocab_size, base).kld_mean
    assert kld[None] <= 1.15 * kld[False]


def test_staged_recomputes_mlp_inputs_identically(tiny_model_dir, data, floats, monkeypatch):
    """down_proj's inputs kept between its Hessian and its forward, or recomputed: same codes, same outputs."""
    import llmopt.quant.walk as walk

    calib, _ = data
    kept, _ = _quantize(floats, tiny_model_dir, calib, "gptq", QuantArgs(bits=4, group_size=32))
    monkeypatch.setattr(walk, "KEEP_MLP_BYTES", 0)
    recomputed, _ = _quantize(floats, tiny_model_dir, calib, "gptq", QuantArgs(bits=4, group_size=32))
    for name, w in kept.qweights.items():
        assert torch.equal(w.qweight, recomputed.qweights[name].qweight), name
    assert [r.error for r in kept.layers] == [r.error for r in recomputed.layers]


@pytest.mark.parametrize("method,sym", [("gptq", True), ("awq", False), ("w8a8", True), ("rtn", True)])
def test_written_back_weights_are_the_codes(tiny_qwen2_dir, data, floats, method, sym):
    """Every quantized Linear computes with exactly its codes' dequantized weight, also after AWQ/SmoothQuant
    folded a later group's scales into it (v→o, up→down divide the row scales of a quantized Linear)."""
    calib, _ = data
    bits = 8 if method == "w8a8" else 4
    qargs = QuantArgs(bits=bits, group_size=-1 if bits == 8 else 32, sym=sym)
    res, model = _quantize(floats, tiny_qwen2_dir, calib, method, qargs)
    for name, qw in res.qweights.items():
        lin = model.get_submodule(name)
        torch.testing.assert_close(lin.weight, qw.dequantize(lin.weight.dtype), rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.equal(floats.reference(tiny_qwen2_dir).get_submodule(name).weight, lin.weight), name
        if lin.bias is not None:
            torch.testing.assert_close(lin.bias, qw.bias, msg=name)


@pytest.mark.parametrize("method,sequential", [("awq", False), ("w8a8", False), ("gptq", True)])
def test_which_model_each_method_calibrates_on(tiny_model_dir, data, floats, method, sequential):
    """AWQ/SmoothQuant calibrate layer 1 on the float model's activations (codes independent of whether layer 0
    is quantized); GPTQ on the quantized model's (codes change)."""
    calib, _ = data
    qargs = QuantArgs(bits=8 if method == "w8a8" else 4, group_size=-1 if method == "w8a8" else 32,
                      sym=method != "awq")
    both, _ = _quantize(floats, tiny_model_dir, calib, method, qargs)
    only1, _ = _quantize(floats, tiny_model_dir, calib, method, qargs, ignore=("re:.*layers\\.0\\..*",))
    name = "model.layers.1.mlp.down_proj"
    assert "model.layers.0.mlp.down_proj" not in only1.qweights
    same = torch.equal(both.qweights[name].qweight, only1.qweights[name].qweight)
    assert same != sequential


def test_bf16_calibration_keeps_fp32_statistics(tiny_model_dir, data, floats):
    """--calib-dtype bfloat16: forwards under autocast, yet GPTQ still beats RTN in every layer and lands
    near the fp32 calibration (the Hessians and solves are fp32)."""
    calib, test = data
    base = floats.reference(tiny_model_dir)
    qargs = QuantArgs(bits=4, group_size=32)
    kld, codes = {}, {}
    for dt in (None, torch.bfloat16):
        res, m = _quantize(floats, tiny_model_dir, calib, "gptq", qargs, calib_dtype=dt)
        assert all(r.error < r.rtn_error for r in res.layers)
        assert all(p.dtype == torch.float32 for p in m.parameters())
        kld[dt] = measure_quality(m, test % m.config.vocab_size, base).kld_mean
        codes[dt] = res.qweights
    assert kld[torch.bfloat16] <= 1.3 * kld[None]
    assert any(not torch.equal(w.qweight, codes[None][n].qweight) for n, w in codes[torch.bfloat16].items())


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_sublayer_cut_fits_qwen3_and_mistral(tiny_model_dir, tmp_path, floats, family):
    """Qwen3 (q/k norms inside attention) and Mistral (a sliding window shorter than the sequence) cut the same
    way; staged GPTQ beats RTN in every layer there too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen3Config

    from llmopt.quant.walk import SublayerStages, capture_inputs

    common = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    cfg = Qwen3Config(**common, head_dim=32) if family == "qwen3" else MistralConfig(**common, sliding_window=16)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / family)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / family)
    ids = torch.randint(0, 1024, (16, 64))
    model = floats.reference(tmp_path / family)
    assert SublayerStages.fits(model.model.layers[0], capture_inputs(model, ids[:4], 4, CPU)[0])
    res, _ = _quantize(floats, tmp_path / family, ids, "gptq", QuantArgs(bits=4, group_size=32))
    assert all(r.error < r.rtn_error for r in res.layers)
