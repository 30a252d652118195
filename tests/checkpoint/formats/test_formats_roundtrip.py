"""write_checkpoint → read_checkpoint gives back identical codes, scales, zeros, g_idx and plain tensors."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers.rtn import quantize_model, rtn

from llmopt.errors import LlmoptError
from llmopt.checkpoint.formats import check_supported, read_checkpoint, write_checkpoint
from llmopt.checkpoint.types import QuantArgs


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


CASES = [  # format, method, bits, group size, sym, act bits
    ("compressed-tensors", "rtn", 4, 32, True, None),
    ("compressed-tensors", "rtn", 4, 64, False, None),
    ("compressed-tensors", "rtn", 3, 32, False, None),
    ("compressed-tensors", "int8", 8, -1, True, None),
    ("compressed-tensors", "w8a8", 8, -1, True, 8),
    ("gptq", "gptq", 4, 32, True, None),
    ("gptq", "gptq", 4, 32, False, None),
    ("gptq", "gptq", 3, 32, True, None),
    ("gptq", "gptq", 2, 64, False, None),
    ("gptq", "gptq", 8, -1, True, None),
    ("awq", "awq", 4, 32, False, None),
    ("awq", "awq", 4, 64, True, None),
]


def _same(a, b):
    assert a.shape == b.shape
    assert torch.equal(a.long() if not a.is_floating_point() else a, b.long() if not b.is_floating_point() else b)


@pytest.mark.parametrize("fmt,method,bits,gs,sym,act", CASES)
def test_round_trip(tmp_path, fmt, method, bits, gs, sym, act):
    model = tiny_qwen2() if fmt == "gptq" and bits == 4 else tiny_llama()
    qws = quantize_model(model, bits, gs, sym, act)
    write_checkpoint(fmt, model, qws, tmp_path, QuantArgs(bits=bits, group_size=gs, sym=sym), method)
    config, back, others = read_checkpoint(tmp_path)
    assert config["quantization_config"]["quant_method"] == fmt
    assert set(back) == set(qws)
    scale_dtype = torch.float32 if fmt == "compressed-tensors" else torch.float16
    for name, qw in qws.items():
        r = back[name]
        _same(r.qweight, qw.qweight)
        _same(r.zeros, qw.zeros)
        assert torch.equal(r.scales, qw.scales.to(scale_dtype))
        assert torch.equal(r.group_index(), qw.group_index())
        assert (r.bits, r.group_size, r.sym, r.act_bits) == (qw.bits, qw.group_size, qw.sym, qw.act_bits)
        bias = model.get_submodule(name).bias
        assert (r.bias is None) == (bias is None)
        if bias is not None:
            assert torch.equal(r.bias, bias)
    state = model.state_dict()
    for key, t in others.items():
        assert torch.equal(t, state[key]), key
    quantized_keys = {f"{n}.weight" for n in qws} | {f"{n}.bias" for n in qws}
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(others) == set(state) - quantized_keys - tied


def test_gptq_act_order_g_idx_round_trip(tmp_path):
    model = tiny_llama()
    torch.manual_seed(1)
    qws = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            n_in = m.in_features
            g_idx = (torch.argsort(torch.rand(n_in)).argsort() // 32).to(torch.int32)  # permuted, 32 per group
            qws[name] = rtn(m.weight.detach(), 4, 32, True, g_idx=g_idx)
    args = QuantArgs(bits=4, group_size=32, act_order=True)
    write_checkpoint("gptq", model, qws, tmp_path, args, "gptq")
    config, back, _ = read_checkpoint(tmp_path)
    assert config["quantization_config"]["desc_act"] is True
    for name, qw in qws.items():
        assert torch.equal(back[name].g_idx, qw.g_idx)
        _same(back[name].qweight, qw.qweight)
    with pytest.raises(LlmoptError, match="g_idx"):
        write_checkpoint("compressed-tensors", model, qws, tmp_path / "x", QuantArgs(bits=4, group_size=32),
                         "gptq")


def test_configs_written(tmp_path):
    model = tiny_llama()
    qws = quantize_model(model, 4, 32, True)
    write_checkpoint("compressed-tensors", model, qws, tmp_path, QuantArgs(bits=4, group_size=32), "rtn")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "dynamic": False, "group_size": 32, "strategy": "group"}
    out = tmp_path / "g"
    out.mkdir()
    write_checkpoint("gptq", model, qws, out, QuantArgs(bits=4, group_size=32), "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == (4, 32, True, False,
                                                                                                  "gptq")


@pytest.mark.parametrize("fmt,method,args,match", [
    ("awq", "awq", QuantArgs(bits=8, group_size=128), "4-bit"),
    ("awq", "awq", QuantArgs(bits=4, group_size=-1), "group-wise"),
    ("gptq", "w8a8", QuantArgs(bits=8, group_size=-1), "w8a8"),
    ("compressed-tensors", "w8a8", QuantArgs(bits=8, group_size=-1, sym=False), "asym"),
    ("compressed-tensors", "w8a8", QuantArgs(bits=8, group_size=128), "per-channel"),
    ("compressed-tensors", "gptq", QuantArgs(bits=4, act_order=True), "static-groups"),
    ("nope", "rtn", QuantArgs(), "unknown --format"),
])
def test_unsupported_combinations(fmt, method, args, match):
    with pytest.raises(LlmoptError, match=match):
        check_supported(fmt, method, args)


def test_gptq_rejects_zero_point_zero(tmp_path):
    model = tiny_llama()
    qws = quantize_model(model, 4, 32, False)
    name = next(iter(qws))
    qws[name].zeros[0, 0] = 0
    with pytest.raises(LlmoptError, match="zero point of 0"):
        write_checkpoint("gptq", model, qws, tmp_path, QuantArgs(bits=4, group_size=32, sym=False), "gptq")


def test_reads_per_tensor_int8_scales(tmp_path):
    """compressed-tensors' `tensor` strategy (one scale per matrix) reads as the equivalent per-channel scales."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    qws = quantize_model(model, 8, -1, True, act_bits=8)
    name = "model.layers.0.mlp.up_proj"
    qws[name].scales[:] = qws[name].scales.max()  # a single scale, stored as a [1] tensor below
    write_checkpoint("compressed-tensors", model, qws, tmp_path, QuantArgs(bits=8, group_size=-1), "w8a8")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"][:1, 0].clone()  # [1]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, back, _ = read_checkpoint(tmp_path)
    assert back[name].scales.shape == (model.get_submodule(name).out_features, 1)
    assert torch.equal(back[name].dequantize(), qws[name].dequantize())
