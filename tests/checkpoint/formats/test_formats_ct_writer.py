"""Checkpoints written by compressed-tensors' own compressor (what llm-compressor saves) load in llmopt."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_formats_roundtrip import tiny_llama

from llmopt.checkpoint.formats import read_checkpoint
from llmopt.runtime import load_quantized_model, set_kernel


def _ct_checkpoint(path, scheme: str, sym: bool):
    """Quantize a tiny Llama with compressed-tensors' lifecycle + ModelCompressor and save it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    model = tiny_llama()
    if scheme == "W4A16":
        weights, acts = QuantizationArgs(num_bits=4, symmetric=sym, group_size=32, strategy="group"), None
    else:
        weights = QuantizationArgs(num_bits=8, symmetric=True, strategy="channel")
        acts = QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights,
                                                                         input_activations=acts)}, ignore=["lm_head"])
    apply_quantization_config(model, qc)
    float_weights = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not hasattr(m, "weight_scale"):
                continue
            w = m.weight.float()
            n, g = m.weight_scale.shape
            wg = w.view(n, g, -1)  # [N, G, gs]
            if sym:
                m.weight_scale.copy_(wg.abs().amax(-1) / (7.5 if scheme == "W4A16" else 127.5))
            else:
                lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
                s = (hi - lo) / 15
                m.weight_scale.copy_(s)
                m.weight_zero_point.copy_(torch.round(-8 - lo / s).clamp(-8, 7).to(m.weight_zero_point.dtype))
            float_weights[name] = (w.clone(), m.weight_scale.clone())
    fmt = "pack-quantized" if scheme == "W4A16" else "int-quantized"
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(path)
    compressor.update_config(str(path))
    return float_weights


@pytest.mark.parametrize("scheme,sym", [("W4A16", True), ("W4A16", False), ("W8A8", True)])
def test_reads_compressed_tensors_writer(tmp_path, scheme, sym):
    from transformers import AutoConfig, AutoModelForCausalLM

    float_weights = _ct_checkpoint(tmp_path, scheme, sym)
    _, qweights, _ = read_checkpoint(tmp_path)
    assert set(qweights) == set(float_weights)
    for name, (w, scale) in float_weights.items():
        qw = qweights[name]
        assert (qw.sym, qw.act_bits) == (sym, 8 if scheme == "W8A8" else None)
        gs = w.shape[1] // scale.shape[1]
        # rounding to the grid moves each weight by at most half a step of its group's scale
        step = scale.repeat_interleave(gs, dim=1)
        assert ((qw.dequantize() - w).abs() <= step * 0.5001 + 1e-7).all()
    ours = load_quantized_model(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.device("cpu"), torch.float32)
    set_kernel(ours, "dequant")
    if not sym:  # transformers 5.24 + compressed-tensors 0.20 mis-shape packed zero points on load (upstream)
        return
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
