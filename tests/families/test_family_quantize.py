"""Every family of tests/helpers/family_models.py with every method: the registry's folds are exact (float64),
and `llmopt quantize` → llmopt's runtime gives a finite KLD vs float, quantizes every targeted weight, and GPTQ
beats RTN; compressed-tensors checkpoints load in plain transformers with our runtime's logits."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers.family_models import FAMILIES, family_model

from llmopt.families import linear_like, moe, registry

# family_config drops None overrides, so deepseek_v3's q_lora_rank=None becomes the default 1536 (a 1536-wide
# q_a_proj that dominates the run time): keep the low-rank query path, at the tiny size
OVERRIDES = {"deepseek_v3": dict(q_lora_rank=32)}

# what each family's layer 0 must fold (prev names), so a registry entry cannot silently lose a group
EXPECTED_FOLDS: dict[str, set[str]] = {
    "llama": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"},  # GQA: no v → o
    "mistral": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"},
    "qwen2": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"},
    "qwen3": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"},
    "granite": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"},
    "stablelm": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"},
    "gemma": {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"},
    "gemma2": {"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"},
    "gemma3_text": {"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"},
    "cohere": {"input_layernorm", "mlp.up_proj"},
    "olmo2": {"mlp.up_proj"},
    "exaone4": {"mlp.up_proj"},
    "starcoder2": {"input_layernorm", "post_attention_layernorm"},
    "phi": {"input_layernorm", "self_attn.v_proj"},
    "phi3": {"input_layernorm", "post_attention_layernorm", "mlp.gate_up_proj"},
    "gpt_neox": {"input_layernorm", "post_attention_layernorm", "attention.query_key_value"},
    "opt": {"self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"},
    "falcon": {"ln_attn", "ln_mlp"},
    "gpt2": {"ln_1", "attn.c_attn", "ln_2"},
    "mixtral": {"input_layernorm", "post_attention_layernorm", "mlp.experts.0.w3"},
    "qwen2_moe": {"input_layernorm", "post_attention_layernorm", "mlp.experts.0.up_proj",
                  "mlp.shared_expert.up_proj"},
    "qwen3_moe": {"input_layernorm", "post_attention_layernorm", "mlp.experts.0.up_proj"},
    "deepseek_v3": {"input_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm",
                    "post_attention_layernorm", "mlp.up_proj"},  # layer 0 is dense (first_k_dense_replace)
}


def _prepared(family: str, **overrides):
    """A float64 model of `family` as quantize sees it (experts per expert, Conv1D as Linear), with every norm
    weight and bias perturbed so a fold that forgets one of them changes the output."""
    model = family_model(family, dtype=torch.float64, **{**OVERRIDES.get(family, {}), **overrides})
    moe.unfuse_experts(model)
    linear_like.convert_conv1d(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


def _fold_all(model, gen: torch.Generator) -> list[registry.LayerPlan]:
    _, layers, _ = registry.decoder_layers(model)
    plans = []
    for layer in layers:
        plan = registry.layer_plan(layer, model.config)
        for g in plan.scales:
            n = layer.get_submodule(g.linears[0]).weight.shape[1]
            registry.fold_scales(layer, g, torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
        plans.append(plan)
    return plans


def test_registry_covers_every_family():
    assert set(FAMILIES) <= set(registry.FAMILIES) and set(EXPECTED_FOLDS) == set(FAMILIES)


# variants the tiny configs do not reach by default: sequential Falcon with one norm each, Falcon's parallel
# block with one shared norm, GPT-NeoX without the parallel residual, StableLM with it, phi3 / llama without GQA
VARIANTS = {
    "falcon-parallel-one-norm": ("falcon", dict(new_decoder_architecture=False, parallel_attn=True, multi_query=False,
                                                num_kv_heads=4)),
    "falcon-sequential": ("falcon", dict(new_decoder_architecture=False, parallel_attn=False, multi_query=False,
                                         num_kv_heads=4)),
    "gpt_neox-sequential": ("gpt_neox", dict(use_parallel_residual=False)),
    "stablelm-parallel": ("stablelm", dict(use_parallel_residual=True)),
    "phi3-mha": ("phi3", dict(num_key_value_heads=4)),
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "opt-post-norm": ("opt", dict(do_layer_norm_before=False)),
}
VARIANT_FOLDS = {
    "falcon-parallel-one-norm": ({"input_layernorm", "self_attention.query_key_value"}, set()),
    "falcon-sequential": ({"input_layernorm", "post_attention_layernorm", "self_attention.query_key_value"}, set()),
    "gpt_neox-sequential": ({"input_layernorm", "post_attention_layernorm", "attention.query_key_value"}, set()),
    "stablelm-parallel": ({"input_layernorm", "mlp.up_proj"}, {"post_attention_layernorm"}),
    "phi3-mha": ({"self_attn.qkv_proj", "mlp.gate_up_proj"}, set()),
    "llama-mha": ({"self_attn.v_proj", "mlp.up_proj"}, set()),
    "opt-post-norm": ({"self_attn.v_proj", "fc1"}, {"self_attn_layer_norm", "final_layer_norm"}),
}


@pytest.mark.parametrize("case", [*FAMILIES, *VARIANTS])
def test_folds_are_exact_float64(case):
    """Folding random positive scales through every group of every layer leaves the logits unchanged."""
    family, overrides = VARIANTS.get(case, (case, {}))
    model = _prepared(family, **overrides)
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        plans = _fold_all(model, torch.Generator().manual_seed(2))
        out = model(ids).logits
    must, must_not = (EXPECTED_FOLDS[case], set()) if case in EXPECTED_FOLDS else VARIANT_FOLDS[case]
    prevs = {g.prev for g in plans[0].scales}
    assert prevs >= must and not prevs & must_not, plans[0].to_dict()
    assert sum(len(p.scales) for p in plans) > 0
    # DeepSeek's routers, Gemma's and Cohere's norms compute in float32 whatever the model dtype (round-off ~1e-8);
    # a wrong fold moves the logits by ~1e-1
    tol = 1e-6 if family.startswith(("deepseek", "gemma", "cohere")) else 1e-10
    assert torch.allclose(out, ref, rtol=0, atol=tol * ref.abs().max()), (out - ref).abs().max()


# ---------------------------------------------------------------- quantize → reload, every family × method

FORMAT = {"rtn": "compressed-tensors", "int8": "compressed-tensors", "w8a8": "compressed-tensors", "gptq": "gptq",
          "awq": "awq"}
METHODS = tuple(FORMAT)
# GPTQ: 16 windows of 64 tokens, enough calibration (1024 tokens for 64-wide inputs) that its Hessians are well
# conditioned, so GPTQ < RTN is a property of the method, not luck; the others (data-free, or statistics that
# only need to exist) 4 windows of 32, which keeps AWQ's search cheap. Every method evaluates on the same
# 8 windows of 32 tokens.
COMMON = dict(eval_samples=8, eval_seq_len=32, device="cpu", calib_dtype="model")
CALIB = {"gptq": dict(samples=16, seq_len=64)}
SMALL_CALIB = dict(samples=4, seq_len=32)


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory):
    """Each family's random model saved with the trained tiny model's tokenizer (built lazily, once)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("families")
    dirs: dict[str, object] = {}

    def get(family: str):
        if family not in dirs:
            family_model(family, **OVERRIDES.get(family, {})).save_pretrained(root / family)
            tok.save_pretrained(root / family)
            dirs[family] = root / family
        return dirs[family]

    return get


_RUNS: dict[tuple[str, str], tuple] = {}


def _quantized(family_dirs, tmp_path_factory, family: str, method: str):
    """quantize once per (family, method) for the whole module: (result, checkpoint dir)."""
    from llmopt.quant.api import QuantizeArgs, quantize

    key = (family, method)
    if key not in _RUNS:
        out = tmp_path_factory.mktemp("q") / f"{family}-{method}"
        args = QuantizeArgs(model=str(family_dirs(family)), out=out, method=method, format=FORMAT[method],
                            group_size=None if method in ("int8", "w8a8") else 32,
                            **COMMON, **CALIB.get(method, SMALL_CALIB))
        _RUNS[key] = (quantize(args), out)
    return _RUNS[key]


def _targeted_weights(family: str) -> dict[str, int]:
    """Every weight matrix `Linear` targets by default, counted on the model itself (experts per expert,
    Conv1D as Linear; routers, embeddings and the head excluded), under the hub's names."""
    from llmopt.quant.api import target_filter

    model = family_model(family, **OVERRIDES.get(family, {}))
    moe.unfuse_experts(model)
    linear_like.convert_conv1d(model)
    hub = moe.hub_renamer(model.config)
    is_target = target_filter(model, ["Linear"], [])
    return {hub(n): m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and is_target(n)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_every_method(family_dirs, tmp_path_factory, family, method):
    """quantize → reload through llmopt's runtime → finite KLD vs float; every targeted weight quantized."""
    import json

    from llmopt.checkpoint.formats import read_checkpoint

    res, out = _quantized(family_dirs, tmp_path_factory, family, method)
    assert res.evaluated_with == "runtime"
    kld = res.metrics["quantized"]["kld_mean"]
    assert math.isfinite(kld) and kld > 0
    _, qweights, _ = read_checkpoint(out)
    targeted = _targeted_weights(family)
    assert sum(n for name, n in targeted.items() if name in qweights) >= 0.95 * sum(targeted.values())
    for kind in ("attention", "mlp", "experts"):  # the run's own accounting: nothing targeted stayed float
        assert res.parameters[kind]["quantized"] == res.parameters[kind]["targeted"], (kind, res.parameters)
    assert res.parameters["attention"]["quantized"] > 0 and res.parameters["mlp"]["quantized"] + \
        res.parameters["experts"]["quantized"] > 0
    meta = json.loads((out / "llmopt.json").read_text())
    if method in registry.SCALE_METHODS:  # what was folded and what was skipped, per distinct layer plan
        plans = meta["scale_migration"]["plans"]
        assert meta["scale_migration"]["family"] == family and plans and all(p["scale_groups"] for p in plans)
    else:
        assert meta["scale_migration"] is None
    assert bool(meta["conv1d_as_linear"]) == (family == "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_beats_rtn(family_dirs, tmp_path_factory, family):
    rtn = _quantized(family_dirs, tmp_path_factory, family, "rtn")[0].metrics["quantized"]["kld_mean"]
    gptq = _quantized(family_dirs, tmp_path_factory, family, "gptq")[0].metrics["quantized"]["kld_mean"]
    assert gptq < rtn, (gptq, rtn)


# families whose compressed-tensors checkpoints plain transformers (5.24, compressed-tensors 0.20) cannot load
HF_CANNOT_LOAD = {
    # GPT-2 is built of Conv1D modules, which compressed-tensors' "Linear" target never matches: the quantized
    # tensors are left unexpected and the Conv1D weights re-initialised (W4A16: a warning only; W8A8: a size
    # mismatch error). llmopt's runtime (Conv1D → Linear) and vLLM (its GPT-2 uses Linear layers) read them.
    "gpt2": "Conv1D",
    # FalconPreTrainedModel._init_weights calls normal_(module.weight) on every FalconLinear; a pack-quantized
    # module holds weight_packed instead: AttributeError before any weight is used (W8A8 keeps `weight`: loads)
    "falcon": "FalconLinear._init_weights",
}


def _hf_vs_runtime(out, float_dir):
    from transformers import AutoModelForCausalLM

    from llmopt.models import ModelSpec, load_model
    from llmopt.runtime import set_kernel

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(ModelSpec(str(out), "cpu", "float32")).model
    float_model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        set_kernel(ours, "dequant")  # the pure-torch path: transformers' arithmetic
        return ref, ours(ids).logits, float_model(ids).logits


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in HF_CANNOT_LOAD])
def test_transformers_loads_compressed_tensors(family_dirs, tmp_path_factory, family):
    """W4A16 compressed-tensors output loads with plain from_pretrained: our runtime's logits."""
    _, out = _quantized(family_dirs, tmp_path_factory, family, "rtn")
    ref, exact, float_logits = _hf_vs_runtime(out, family_dirs(family))
    assert torch.allclose(exact, ref, rtol=0, atol=1e-4 * ref.abs().max()), (exact - ref).abs().max()
    assert (float_logits - ref).abs().max() > 10 * (exact - ref).abs().max()  # transformers runs the codes


# W8A8 (int-quantized) checkpoints plain transformers does not run as llmopt does
HF_W8A8_DIFFERS = {
    **HF_CANNOT_LOAD,
    # compressed-tensors' dynamic "token" activation strategy reduces all dims but {0, 1}: OPT flattens its MLP
    # input to [tokens, hidden] before fc1, where that is ONE scale for the whole tensor, not one per token
    # (llmopt and vLLM quantize per token). Attention Linears (3-D inputs) match exactly.
    "opt": "2-D activations quantized per tensor",
    # transformers cannot merge per-expert int8 `weight`s into its fused experts ("Concatenate on tensors
    # destined for ...experts.gate_up_proj. Ckpt contains: 0"); W4A16 per-expert checkpoints load
    **{f: "per-expert int8 experts" for f in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")},
}
del HF_W8A8_DIFFERS["falcon"]  # W8A8 keeps `weight`: Falcon loads


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in HF_W8A8_DIFFERS])
def test_transformers_loads_compressed_tensors_w8a8(family_dirs, tmp_path_factory, family):
    _, out = _quantized(family_dirs, tmp_path_factory, family, "w8a8")
    ref, exact, float_logits = _hf_vs_runtime(out, family_dirs(family))
    assert torch.allclose(exact, ref, rtol=0, atol=1e-4 * ref.abs().max()), (exact - ref).abs().max()
    assert (float_logits - ref).abs().max() > 0


def test_transformers_cannot_load_gpt2_compressed_tensors(family_dirs, tmp_path_factory):
    """Documents HF_CANNOT_LOAD["gpt2"]: transformers re-initialises the Conv1D weights (logits unrelated to ours)
    while llmopt's runtime reloads the checkpoint (test_every_family_every_method)."""
    _, out = _quantized(family_dirs, tmp_path_factory, "gpt2", "rtn")
    ref, exact, _ = _hf_vs_runtime(out, family_dirs("gpt2"))
    assert (exact - ref).abs().max() > 1e-2 * ref.abs().max()


def test_architecture_outside_the_registry(tiny_model_dir, tmp_path):
    """BLOOM has no registry entry: GPTQ and RTN still quantize every Linear (decoder layers found as its one
    ModuleList of num_hidden_layers blocks); AWQ and W8A8 refuse with one line naming the supported families."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig

    from llmopt.errors import LlmoptError
    from llmopt.quant.api import QuantizeArgs, quantize

    torch.manual_seed(0)
    path = tmp_path / "bloom"
    AutoModelForCausalLM.from_config(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=512)) \
        .save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    assert registry.supported_methods(BloomConfig()) == ["rtn", "int8", "gptq"]
    common = dict(model=str(path), group_size=32, samples=4, seq_len=32, eval_samples=2, eval_seq_len=32,
                  device="cpu", calib_dtype="model")
    res = quantize(QuantizeArgs(out=tmp_path / "gptq", method="gptq", **common))
    assert res.parameters["attention"]["quantized"] == res.parameters["attention"]["targeted"] > 0
    assert res.parameters["mlp"]["quantized"] == res.parameters["mlp"]["targeted"] > 0
    assert math.isfinite(res.metrics["quantized"]["kld_mean"])
    for method in ("awq", "w8a8"):
        with pytest.raises(LlmoptError, match=r"supports llama, .*gpt2.* models, not 'bloom'") as err:
            quantize(QuantizeArgs(out=tmp_path / method, method=method, **{**common, "group_size": None}))
        assert "\n" not in str(err.value) and not (tmp_path / method).exists()


def test_supported_methods_of_registry_families():
    from transformers import AutoConfig

    for family in FAMILIES:
        assert registry.supported_methods(AutoConfig.for_model(family)) == list(registry.ALL_METHODS)
