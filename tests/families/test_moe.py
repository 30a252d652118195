"""Per-expert Linears equal transformers' fused experts; all-expert calibration keeps the true-routing output; the
per-expert names are the ones transformers' own save_pretrained writes; a starved expert still gets statistics."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.moe_models import MOE_FAMILIES, moe_model

from llmopt.families import moe
from llmopt.quant.api import target_filter
from llmopt.quant.walk import quantize_model
from llmopt.checkpoint.types import QuantArgs

ALL = (*MOE_FAMILIES, "deepseek_v2")


def _ids(n: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 512, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ALL)
def test_unfused_experts_equal_fused_in_float64(family):
    model = moe_model(family, dtype=torch.float64, experts="eager")  # transformers' reference loop, float64
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        names = moe.unfuse_experts(model)
        out = model(ids).logits
    assert names and not moe.fused_experts(model)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12 * ref.abs().max()), (out - ref).abs().max()
    block = model.get_submodule(names[0])
    assert isinstance(block, moe.UnfusedExperts) and len(block) == 4
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    assert all(isinstance(getattr(block[j], n), torch.nn.Linear) for j in range(4) for n in names)


def test_unfused_equals_default_grouped_mm_in_float32():
    model = moe_model("mixtral")  # transformers' default experts implementation (grouped_mm)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        moe.unfuse_experts(model)
        out = model(ids).logits
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * ref.abs().max()), (out - ref).abs().max()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_calibration_runs_every_expert_on_every_token_with_true_routing_output(family):
    model = moe_model(family, dtype=torch.float64, experts="eager")
    moe.unfuse_experts(model)
    layer = model.model.layers[1]
    seen: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])
                                                                             .shape[0]))
             for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n]
    ids = _ids(n=3, length=20)
    with torch.no_grad():
        ref = model(ids).logits
        seen.clear()
        with moe.routing_calibration(layer, model.config) as routing:
            out = model(ids).logits
    for h in hooks:
        h.remove()
    tokens = ids.numel()
    assert torch.allclose(out, ref, rtol=0, atol=1e-12 * ref.abs().max()), (out - ref).abs().max()
    assert len(seen) == 4 * 3 and set(seen.values()) == {tokens}  # every expert Linear saw every token
    counts = routing.blocks["mlp"]
    assert counts.tokens == tokens and int(counts.routed.sum()) == tokens * model.config.num_experts_per_tok
    assert not layer.mlp.experts.calibrate_all and layer.mlp.experts.counts is None  # restored on exit


@pytest.mark.parametrize("family", ALL)
def test_saved_names_are_what_transformers_save_pretrained_writes(family, tmp_path):
    from safetensors import safe_open

    model = moe_model(family)
    model.save_pretrained(tmp_path)  # transformers reverts its own conversion: the hub layout
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        hub_keys = set(f.keys())
    moe.unfuse_experts(model)
    hub, ours = moe.hub_renamer(model.config), moe.internal_renamer(model.config)
    keys = set(model.state_dict())
    assert {hub(k) for k in keys} == hub_keys
    assert {ours(k) for k in hub_keys} == keys
    expert = "block_sparse_moe.experts.3.w2" if family == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.1.{expert}.weight" in hub_keys


def test_routers_stay_float_unless_named():
    model = moe_model("qwen2_moe")
    moe.unfuse_experts(model)
    routers = moe.router_names(model)
    assert "model.layers.0.mlp.shared_expert_gate" in routers and "model.layers.0.mlp.gate" in routers
    default = target_filter(model, ["Linear"], [])
    assert not default("model.layers.0.mlp.shared_expert_gate")
    assert default("model.layers.0.mlp.experts.2.up_proj") and default("model.layers.0.mlp.shared_expert.down_proj")
    assert target_filter(model, ["Linear", "re:.*shared_expert_gate"], [])("model.layers.0.mlp.shared_expert_gate")


def test_fused_layouts_llmopt_cannot_split_exactly_are_refused():
    from llmopt.errors import LlmoptError

    model = moe_model("mixtral")
    model.model.layers[0].mlp.experts.is_transposed = True  # e.g. gpt-oss' [E, in, out] layout
    with pytest.raises(LlmoptError, match="cannot split exactly"):
        moe.unfuse_experts(model)


def _starve_expert_0(model) -> None:
    """Route no token to expert 0 in any layer: the router's logit for it is pushed to -inf."""
    for layer in model.model.layers:
        gate = layer.mlp.gate
        forward = type(gate).forward

        def starved(hidden, _gate=gate, _forward=forward):
            weight = _gate.weight
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
            bias[0] = -1e4
            logits = torch.nn.functional.linear(hidden.reshape(-1, weight.shape[1]), weight) + bias
            probs = logits.float().softmax(-1)
            top, idx = probs.topk(_gate.top_k, -1)
            return logits, top / top.sum(-1, keepdim=True), idx

        gate.forward = starved


@pytest.fixture(scope="module")
def starved_runs():
    """GPTQ, AWQ and RTN on a Mixtral whose expert 0 gets no routed token; the Hessians GPTQ solved with."""
    import llmopt.quant.methods as methods

    calib = _ids(n=8, length=32, seed=1)
    runs = {}
    for method in ("rtn", "gptq", "awq"):
        model = moe_model("mixtral")
        moe.unfuse_experts(model)
        _starve_expert_0(model)
        hessians: list[tuple[int, torch.Tensor]] = []
        real = methods.gptq_quantize

        def spy(w, h, args, _real=real, _log=hessians, **kw):
            _log.append((w.shape[0], h.clone()))
            return _real(w, h, args, **kw)

        methods.gptq_quantize = spy
        try:
            qargs = QuantArgs(bits=4, group_size=32, sym=method != "awq")
            res = quantize_model(model, calib, method, qargs, target_filter(model, ["Linear"], []),
                                 torch.device("cpu"), batch_size=4)
        finally:
            methods.gptq_quantize = real
        runs[method] = (model, res, hessians)
    return runs


def test_starved_expert_is_reported_and_gets_a_full_rank_hessian(starved_runs):
    _, res, hessians = starved_runs["gptq"]
    report = res.layers[1].detail["moe"]
    assert report["blocks"]["mlp"]["tokens"] == 8 * 32 and report["blocks"]["mlp"]["starved"] == [0]
    assert report["statistics"] == "all tokens through every expert"
    assert report["blocks"]["mlp"]["routed_tokens"][0] == 0 and sum(report["blocks"]["mlp"]["routed_tokens"]) == 512
    # per layer: q/k/v, o, the experts' gate/up (one input, stacked), then each expert's down_proj alone
    downs = [h for rows, h in hessians if rows == 64][1:5]  # layer 0: o_proj first, then the 4 down_projs
    for h in downs:  # every expert's down_proj Hessian comes from all 256 tokens: positive definite
        eig = torch.linalg.eigvalsh(h.double())
        assert eig.min() > 0 and eig.max() / eig.min() < 1e6
    assert not torch.equal(downs[0], downs[1])  # per expert: its own activations


def test_starved_expert_is_quantized_from_its_statistics(starved_runs):
    """Expert 0 never saw a routed token, yet GPTQ and AWQ quantize it from statistics: on the calibration block
    inputs (what their statistics describe) its output error is below RTN's."""
    float_model = moe_model("mixtral")
    moe.unfuse_experts(float_model)
    block = float_model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    hook = block.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        float_model(_ids(n=8, length=32, seed=1))  # the calibration tokens
        hook.remove()
        x = seen[0]  # [T, H] the normed input every expert of layer 0 reads
        ref = block.experts[0](x)
        errors = {}
        for method, (model, _, _) in starved_runs.items():
            # AWQ folded 1/s into the norm and s into the experts: expert 0 now reads x / s
            ratio = model.model.layers[0].post_attention_layernorm.weight / \
                float_model.model.layers[0].post_attention_layernorm.weight
            y = model.model.layers[0].mlp.experts[0](x * ratio)
            errors[method] = ((y - ref).norm() / ref.norm()).item()
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors
    _, res, _ = starved_runs["awq"]
    awq0 = res.layers[0].detail["mlp.experts.0.w3"]  # expert 0's up → down scales were searched, not left at 1
    assert awq0["alpha"] > 0 and awq0["loss_vs_rtn"] < 1


@pytest.mark.parametrize("family", ALL)
def test_scale_groups_fold_exactly_routers_included(family):
    """Folding any positive scales through every AWQ/SmoothQuant group leaves the float model's logits unchanged:
    the routers read the scaled norm output too, so their columns must take the scales (float64)."""
    from llmopt.families.registry import fold_scales, scale_groups

    model = moe_model(family, dtype=torch.float64, experts="eager")
    moe.unfuse_experts(model)
    ids = _ids()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = model(ids).logits
        for layer in model.model.layers:
            groups = scale_groups(layer, model.config)
            for g in groups:
                n_in = layer.get_submodule(g.linears[0]).weight.shape[1]
                fold_scales(layer, g, torch.rand(n_in, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
        out = model(ids).logits
    assert any("experts" in g.prev for g in groups) and any(g.linears[-1].endswith("gate") for g in groups)
    # DeepSeek's routers compute in float32 whatever the model dtype: their weights round at 1e-7; a changed
    # routing would move the logits by ~1e-1
    tol = 1e-6 if family.startswith("deepseek") else 1e-10
    assert torch.allclose(out, ref, rtol=0, atol=tol * ref.abs().max()), (out - ref).abs().max()


def test_gptq_stacks_experts_in_row_chunks_with_the_same_codes(monkeypatch):
    """All experts' gate/up share one Hessian; stacking them in chunks (bounded memory) gives the same codes."""
    import llmopt.quant.methods as methods

    calib = _ids(n=4, length=32, seed=3)

    def codes():
        model = moe_model("qwen3_moe")
        moe.unfuse_experts(model)
        return quantize_model(model, calib, "gptq", QuantArgs(bits=4, group_size=32),
                              target_filter(model, ["Linear"], []), torch.device("cpu"), batch_size=4).qweights

    whole = codes()
    monkeypatch.setattr(methods, "STACK_ROWS", 64)  # one expert Linear per GPTQ call
    chunked = codes()
    assert whole.keys() == chunked.keys()
    for name, w in whole.items():
        assert torch.equal(w.qweight, chunked[name].qweight) and torch.equal(w.scales, chunked[name].scales), name
