"""MoE quantization on a Mixtral-shaped model: tokens routed to each expert during calibration, starved experts,
and KLD vs float for every method, through the checkpoint reloaded by llmopt's runtime.

The model is builtin:tiny (a trained 4-layer Llama, hidden 256, MLP 768) upcycled into a Mixtral with --experts
experts, top-2: every expert is the trained MLP times (1 + noise) with its own noise (--noise, relative), the
router is random N(0, router_scale²/hidden). Mixtral normalises the top-2 weights to sum 1, so the MoE block stays
close to the trained MLP: a real language model with Mixtral's exact layout (fused experts in transformers 5).

    python bench/moe_calibration.py --out-dir /tmp/moe-bench [--samples 128 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = {"rtn": "compressed-tensors", "int8": "compressed-tensors", "w8a8": "compressed-tensors", "gptq": "gptq",
           "awq": "awq"}


def upcycle(src: Path, out: Path, experts: int, noise: float, router_scale: float, seed: int) -> Path:
    """builtin:tiny's Llama → a Mixtral whose experts are noisy copies of each layer's MLP."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=c.rope_parameters, num_local_experts=experts, num_experts_per_tok=2,
                        tie_word_embeddings=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for dl, ml in zip(dense.model.layers, moe.model.layers, strict=True):
            gate_up = torch.cat([dl.mlp.gate_proj.weight, dl.mlp.up_proj.weight])  # [2I, H]
            for j in range(experts):
                ml.mlp.experts.gate_up_proj[j] = gate_up * (1 + noise * torch.randn(gate_up.shape, generator=gen))
                down = dl.mlp.down_proj.weight
                ml.mlp.experts.down_proj[j] = down * (1 + noise * torch.randn(down.shape, generator=gen))
            ml.mlp.gate.weight.normal_(0, router_scale / c.hidden_size ** 0.5, generator=gen)
    assert all(".mlp." in k for k in missing), missing  # everything else came from the trained model
    moe.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--router-scale", type=float, default=4.0)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()

    from llmopt.models import ModelSpec, resolve_path
    from llmopt.quant.api import QuantizeArgs, quantize

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = upcycle(resolve_path(ModelSpec("builtin:tiny")), args.out_dir / "mixtral-tiny", args.experts, args.noise,
                    args.router_scale, seed=0)
    rows, routing = [], None
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        res = quantize(QuantizeArgs(model=str(model), out=args.out_dir / method, method=method,
                                    format=METHODS[method], samples=args.samples, seq_len=args.seq_len,
                                    overwrite=True))
        q, f, experts = res.metrics["quantized"], res.metrics["float"], res.parameters["experts"]
        rows.append({"method": method, "format": res.format, "kld_mean": q["kld_mean"], "kld_p99": q["kld_p99"],
                     "top1": q["top1_agreement"], "ppl": q["perplexity"], "float_ppl": f["perplexity"],
                     "experts_quantized": experts["quantized"] / experts["total"],
                     "size_ratio": res.metrics["size_bytes"] / res.metrics["float_size_bytes"],
                     "seconds": time.perf_counter() - t0})
        if res.moe and res.moe["routing"] and (routing is None or method in ("gptq", "awq")):
            routing = (method, res.moe)
    print(f"model: builtin:tiny upcycled to Mixtral, {args.experts} experts top-2, 4 layers, hidden 256; "
          f"calibration builtin {args.samples}×{args.seq_len}; threads {torch.get_num_threads()}")
    print(f"{'method':7} {'format':19} {'ppl':>9} {'mean KLD':>10} {'p99 KLD':>10} {'top-1':>6} {'experts q.':>10} "
          f"{'size':>6} {'time':>7}")
    for r in rows:
        print(f"{r['method']:7} {r['format']:19} {r['ppl']:9.3f} {r['kld_mean']:10.3e} {r['kld_p99']:10.3e} "
              f"{r['top1']:6.3f} {r['experts_quantized']:10.1%} {r['size_ratio']:5.2f}× {r['seconds']:6.1f}s")
    print(f"float perplexity {rows[0]['float_ppl']:.3f}")
    method, info = routing
    print(f"tokens routed to each expert during {method} calibration ({info['starved_experts']} starved):")
    for layer, rep in info["routing"].items():
        for block, b in rep["blocks"].items():
            print(f"  {layer} {block}: {b['tokens']} tokens × top-{rep['top_k']} → {b['routed_tokens']}"
                  f" starved {b['starved'] or 'none'}")
    print(f"starved experts: {info['starved_treatment']}")
    (args.out_dir / "moe_calibration.json").write_text(json.dumps({"rows": rows, "moe": info}, indent=2))


if __name__ == "__main__":
    main()
