"""`llmopt quantize` on random tiny MoE models of every family, every method: experts quantized, saved per expert
under the hub's names, reloaded through llmopt's runtime with finite KLD vs float; compressed-tensors MoE
checkpoints load in plain transformers with our runtime's logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.helpers.moe_models import MOE_FAMILIES, moe_model

from llmopt.families import moe
from llmopt.quant.api import QuantizeArgs, quantize, target_filter
from llmopt.checkpoint.formats import read_checkpoint

FORMAT = {"rtn": "compressed-tensors", "int8": "compressed-tensors", "w8a8": "compressed-tensors", "gptq": "gptq",
          "awq": "awq"}


@pytest.fixture(scope="module")
def moe_dirs(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    dirs = {}
    for family in MOE_FAMILIES:
        path = tmp_path_factory.mktemp("moe") / family
        moe_model(family).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[family] = path
    return dirs


_RUNS: dict[tuple[str, str], tuple] = {}


def _quantized(moe_dirs, tmp_path_factory, family: str, method: str):
    """quantize once per (family, method) for the whole module: (result, checkpoint dir)."""
    key = (family, method)
    if key not in _RUNS:
        out = tmp_path_factory.mktemp("q") / f"{family}-{method}"
        args = QuantizeArgs(model=str(moe_dirs[family]), out=out, method=method, format=FORMAT[method],
                            group_size=None if method in ("int8", "w8a8") else 32, samples=8, seq_len=64,
                            eval_samples=4, eval_seq_len=64, device="cpu", calib_dtype="model")
        _RUNS[key] = (quantize(args), out)
    return _RUNS[key]


def _targeted_weights(family: str) -> dict[str, int]:
    """Every weight `Linear` targets by default (experts split per expert, routers and lm_head excluded)."""
    model = moe_model(family)
    moe.unfuse_experts(model)
    hub = moe.hub_renamer(model.config)
    is_target = target_filter(model, ["Linear"], [])
    return {hub(n): m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and is_target(n)}


@pytest.mark.parametrize("method", list(FORMAT))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_method_quantizes_every_expert(moe_dirs, tmp_path_factory, family, method):
    res, out = _quantized(moe_dirs, tmp_path_factory, family, method)
    assert res.evaluated_with == "runtime"  # reloaded through llmopt's runtime (per-expert quantized Linears)
    kld = res.metrics["quantized"]["kld_mean"]
    assert math.isfinite(kld) and kld > 0
    _, qweights, _ = read_checkpoint(out)
    targeted = _targeted_weights(family)
    quantized = sum(n for name, n in targeted.items() if name in qweights)
    assert quantized >= 0.95 * sum(targeted.values()), (quantized, sum(targeted.values()))
    kinds = res.parameters  # the run's own accounting agrees: every expert weight quantized
    assert kinds["experts"]["quantized"] == kinds["experts"]["total"] > 0
    assert kinds["attention"]["quantized"] == kinds["attention"]["targeted"] > 0
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    down = "w2" if family == "mixtral" else "down_proj"
    assert f"model.layers.1.{block}.experts.3.{down}" in qweights  # the hub's per-expert layout
    meta = json.loads((out / "llmopt.json").read_text())
    assert all(r not in qweights for r in meta["moe"]["float_routers"])
    if method in ("rtn", "int8"):  # data-free: no calibration forward, so no routing counts
        assert meta["moe"]["routing"] == {}
        return
    routing = meta["moe"]["routing"]["layer 1"]
    counts = routing["blocks"]["mlp"]
    assert counts["tokens"] == 8 * 64 and sum(counts["routed_tokens"]) == 8 * 64 * routing["top_k"]
    assert all(r not in qweights for r in meta["moe"]["float_routers"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_beats_rtn(moe_dirs, tmp_path_factory, family):
    rtn = _quantized(moe_dirs, tmp_path_factory, family, "rtn")[0].metrics["quantized"]["kld_mean"]
    gptq = _quantized(moe_dirs, tmp_path_factory, family, "gptq")[0].metrics["quantized"]["kld_mean"]
    assert gptq < rtn, (gptq, rtn)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_transformers_loads_compressed_tensors_moe(moe_dirs, tmp_path_factory, family):
    """transformers merges our per-expert packed tensors into its fused experts: same logits as our runtime."""
    from transformers import AutoModelForCausalLM

    from llmopt.models import ModelSpec, load_model
    from llmopt.runtime import set_kernel

    _, out = _quantized(moe_dirs, tmp_path_factory, family, "rtn")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(ModelSpec(str(out), "cpu", "float32")).model
    float_model = AutoModelForCausalLM.from_pretrained(moe_dirs[family], dtype=torch.float32).eval()
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        set_kernel(ours, "dequant")
        exact = ours(ids).logits
        drift = (float_model(ids).logits - ref).abs().max()
    assert torch.allclose(exact, ref, rtol=0, atol=1e-4 * ref.abs().max()), (exact - ref).abs().max()
    assert drift > 1e-3  # transformers really runs the quantized experts, not float ones


def test_experts_left_fused_is_an_error_not_a_silent_float_run(moe_dirs, tmp_path, monkeypatch):
    """A family whose experts llmopt cannot split (simulated: Mixtral dropped from LAYOUTS, as before issue 12)
    keeps them fused and float: the run refuses before calibrating, unless --ignore names them; then the fused
    float experts are written as they are and the runtime reloads them."""
    from llmopt.errors import LlmoptError

    monkeypatch.delitem(moe.LAYOUTS, "mixtral")
    args = dict(model=str(moe_dirs["mixtral"]), method="rtn", group_size=32, samples=4, seq_len=32, device="cpu",
                eval_samples=2, eval_seq_len=32)
    with pytest.raises(LlmoptError, match="targeted experts weights would stay float"):
        quantize(QuantizeArgs(out=tmp_path / "a", **args))
    assert not (tmp_path / "a").exists()
    res = quantize(QuantizeArgs(out=tmp_path / "b", ignore=["re:.*experts.*"], **args))
    assert res.parameters["experts"]["quantized"] == res.parameters["experts"]["targeted"] == 0
    assert res.parameters["experts"]["total"] > 0 and res.parameters["attention"]["quantized"] > 0
    assert res.evaluated_with == "runtime" and math.isfinite(res.metrics["quantized"]["kld_mean"])


def test_engine_greedy_on_quantized_moe_equals_generate(moe_dirs, tmp_path_factory):
    """The reloaded per-expert quantized model serves through llmopt's engine: greedy tokens = generate's."""
    from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
    from llmopt.models import ModelSpec, load_model
    from llmopt.runtime import set_kernel

    _, out = _quantized(moe_dirs, tmp_path_factory, "qwen2_moe", "gptq")
    model = load_model(ModelSpec(str(out), "cpu", "float32")).model
    set_kernel(model, "dequant")  # one kernel for every M: generate and the engine batch differently
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 512, (n,), generator=gen).tolist() for n in (3, 17, 9)]
    engine = LLMEngine(model, EngineConfig(kv_budget=10 ** 8, block_size=4))
    for p in prompts:
        engine.add(p, SamplingParams(max_tokens=8, ignore_eos=True))
    got = [s.output for s in engine.run()]
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(p):]
               .tolist() for p in prompts]
    assert got == ref


@pytest.mark.parametrize("family,method", [("qwen2_moe", "awq"), ("deepseek_v3", "gptq")])
def test_gptqmodel_loads_per_expert_checkpoints(moe_dirs, tmp_path_factory, family, method):
    """GPTQModel (a real GPTQ/AWQ loader) reads our per-expert experts and shared experts: same logits as ours.
    (GPTQModel 7.7 cannot load Mixtral's hub names w1/w2/w3 in quantized checkpoints: its defuser renames only
    float `.weight` keys to gate_proj/up_proj/down_proj.)"""
    pytest.importorskip("gptqmodel")
    from typer.testing import CliRunner

    from llmopt.cli.main import app

    _, out = _quantized(moe_dirs, tmp_path_factory, family, method)
    r = CliRunner().invoke(app, ["verify", str(out), "--with", "gptqmodel", "--prompts", "2", "--prompt-len", "32",
                                 "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    (check,) = json.loads(r.output[r.output.index("{"):])["checks"]
    assert check["passed"] and check["kld_mean"] <= 1e-3
