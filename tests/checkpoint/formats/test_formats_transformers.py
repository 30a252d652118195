"""compressed-tensors checkpoints load in plain transformers and give llmopt's runtime logits; GPTQ/AWQ
checkpoints run in llmopt's runtime with the logits of the float model holding their dequantized weights."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.rtn import quantize_model
from test_formats_roundtrip import tiny_llama, tiny_qwen2

from llmopt.checkpoint.formats import read_checkpoint, write_checkpoint
from llmopt.checkpoint.types import QuantArgs
from llmopt.runtime import kernel_report, load_quantized_model, set_kernel

CT_SCHEMES = {  # name: method, bits, group size, act bits
    "W4A16-g32": ("rtn", 4, 32, None),
    "W8A16-channel": ("int8", 8, -1, None),
    "W8A8-dynamic": ("w8a8", 8, -1, 8),
}


def _runtime(path):
    from transformers import AutoConfig

    return load_quantized_model(path, AutoConfig.from_pretrained(path), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("scheme", list(CT_SCHEMES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_loads_compressed_tensors(tmp_path, scheme, arch):
    from transformers import AutoModelForCausalLM

    method, bits, gs, act = CT_SCHEMES[scheme]
    model = tiny_llama() if arch == "llama" else tiny_qwen2()
    qws = quantize_model(model, bits, gs, True, act)
    write_checkpoint("compressed-tensors", model, qws, tmp_path, QuantArgs(bits=bits, group_size=gs), method)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = _runtime(tmp_path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        set_kernel(ours, "dequant")  # the pure-torch path: same arithmetic as transformers, float32
        exact = ours(ids).logits
        set_kernel(ours, None)  # the low-bit kernels chosen by measurement
        fast = ours(ids).logits
    assert torch.allclose(exact, ref, atol=1e-5, rtol=1e-5), (exact - ref).abs().max()
    if act is None:  # weight-only: transformers' float weights are exactly our dequantized codes
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
    # kernels run bf16 activations (int4pack/int8pack) or re-round activations near quantization boundaries
    # (W8A8): equal within bf16 / one-quantization-step tolerance
    assert (fast - ref).abs().max() <= 0.02 * ref.abs().max(), (fast - ref).abs().max()
    assert all(desc.split()[0] in ("int4", "int8", "w8a8") for _, desc in kernel_report(ours))


@pytest.mark.parametrize("fmt,bits,gs,sym", [("gptq", 4, 32, True), ("gptq", 4, 32, False), ("gptq", 3, 32, True),
                                             ("awq", 4, 32, False)])
def test_runtime_runs_gptq_and_awq(tmp_path, fmt, bits, gs, sym):
    model = tiny_qwen2() if fmt == "awq" else tiny_llama()
    qws = quantize_model(model, bits, gs, sym)
    write_checkpoint(fmt, model, qws, tmp_path, QuantArgs(bits=bits, group_size=gs, sym=sym), fmt)
    _, back, _ = read_checkpoint(tmp_path)
    with torch.no_grad():  # float reference: the weights the checkpoint actually stores (fp16 scales)
        for name, qw in back.items():
            model.get_submodule(name).weight.copy_(qw.dequantize())
    ours = _runtime(tmp_path)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        set_kernel(ours, "dequant")
        exact = ours(ids).logits
        set_kernel(ours, None)
        fast = ours(ids).logits
    assert torch.allclose(exact, ref, atol=1e-5, rtol=1e-5), (exact - ref).abs().max()
    assert (fast - ref).abs().max() <= 0.02 * ref.abs().max()


def test_quantized_head_of_tied_model(tmp_path):
    """Qwen2 ties lm_head to the embedding; quantizing the head unties it in the written config."""
    from transformers import AutoModelForCausalLM

    model = tiny_qwen2()
    qws = quantize_model(model, 4, 32, True, skip=())
    assert "lm_head" in qws
    write_checkpoint("compressed-tensors", model, qws, tmp_path, QuantArgs(bits=4, group_size=32), "rtn")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = _runtime(tmp_path)
    set_kernel(ours, "dequant")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
