"""Reading GGUF files back in tests: every tensor dequantized by the gguf package's own code, llama.cpp's q/k
row order undone, and the weights a block stores for an llmopt QuantizedWeight (its scale rounded to fp16)."""

from __future__ import annotations

import torch

from llmopt.checkpoint.formats.gguf import qk_row_order

N_HEAD, N_KV, HEAD_DIM = 4, 2, 32  # the test models' attention shape (tests/conftest.py, tests/checkpoint)


def gguf_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized by the gguf package, as [rows, cols] float32 (GGUF order)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(w.copy()).float().reshape([int(n) for n in reversed(t.shape)])
    return out


def hub_rows(name: str, w: torch.Tensor, arch: str) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation so the rows are the hub's again."""
    if arch != "llama" or not name.endswith(("attn_q.weight", "attn_k.weight")):
        return w
    heads = N_HEAD if "attn_q" in name else N_KV
    return w[torch.argsort(qk_row_order(w.shape[0], heads))]


def fp16_scale_reference(qw) -> torch.Tensor:
    """What the block stores: (q - zero) * fp16(scale), or q * fp16(scale) + fp16(-zero * scale) for Q4_1."""
    g = qw.group_index()
    q, z, s = qw.qweight.float(), qw.zeros.float()[:, g], qw.scales.float()[:, g]
    if qw.sym:
        return (q - z) * s.half().float()
    return q * s.half().float() + (-z * s).half().float()


def gguf_name(module: str) -> str:
    """GGUF weight name of a decoder Linear, written out independently of the exporter's table."""
    layer, rest = module.removeprefix("model.layers.").split(".", 1)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    return f"blk.{layer}.{names[rest]}.weight"
