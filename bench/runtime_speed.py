"""Decode and prefill speed of llmopt's quantized runtime against the float model, side by side.

A Llama-shaped model (TinyLlama-1.1B's shape by default: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV
heads, vocab 32000; random weights) is quantized with RTN, written as compressed-tensors checkpoints (W4A16 g128,
W8A16 per channel, W8A8 dynamic), loaded back through llmopt.runtime.load_quantized_model, and timed in
interleaved rounds against the fp32 (and bf16) model:
- decode: batch-1 greedy steps with a KV cache after a prompt; tokens/s = 1 / median step time
- prefill: one forward over the prompt; tokens/s = prompt length / median time
Every variant gets a warm-up first. Ratios are of medians.

A `+head` variant also quantizes lm_head (llmopt quantize leaves it float unless --targets names it): at
batch-1 decode a float lm_head over a 32k vocabulary is a fixed cost the quantized layers cannot shrink.

Full depth matters: with fewer layers the float lm_head and the per-step fixed costs weigh more than
they do in any real model. Threads default to torch's default (all cores).

`no-matmul` is the float model with every decoder Linear replaced by a stub that returns zeros: its decode step
is what the decoder costs outside the matmuls (transformers' eager norms, rotary, KV cache, attention and module
calls), printed as a share of each variant's step.

Each variant's decode also reads as a weight bandwidth (weight bytes / step time), printed beside a read
probe of the machine (a sum over 1 GiB of float32 at the same threads).

--llamacpp-bin DIR puts llama.cpp beside each round: every fp32/int8/int4 checkpoint (the builtin tokenizer is
copied in, so use --vocab 1024 or more) is exported with `llmopt export --float-type f32` — int4 to Q4_0 and int8
per channel to Q8_0, both exact, embeddings and head F32 as in llmopt's runtime — and `llama-bench -p 0 -n STEPS`
runs on it in the same rounds, so both engines decode the very same weights. w8a8 (the int8 weights, activations
quantized per token at run time) is set beside the same Q8_0 file: llama.cpp's Q8_0 dot products also quantize
the activations to 8 bits (blocks of 32), so that pair does the same kind of arithmetic; the file is timed
once a round for both. --llamacpp-no-repack passes
`--repack 0` (where the OS does not grant AMX tiles, an AMX build of llama.cpp dies in its repacking).

    python bench/runtime_speed.py [--layers 22] [--threads N] [--prompt 128] [--steps 16] [--rounds 3]
        [--group-size 128] [--vocab 32000] [--llamacpp-bin DIR [--llamacpp-no-repack]]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def build_float(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


class _FreeMatmul(torch.nn.Module):
    """Stands in for a decoder Linear at (almost) no cost: returns one zeros tensor per input shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.zeros: dict[torch.Size, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        if shape not in self.zeros:
            self.zeros[shape] = x.new_zeros(*shape, self.out_features)
        return self.zeros[shape]


def without_matmuls(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every decoder Linear free: its decode step is what the decoder costs outside the matmuls
    (norms, rotary, KV cache, attention, module dispatch; lm_head stays)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.lm_head:
                setattr(parent, name, _FreeMatmul(child.out_features))
    return model


def quantized(model: torch.nn.Module, variant: str, root: Path, group_size: int = 128) -> torch.nn.Module:
    """RTN-quantize every decoder Linear, write a compressed-tensors checkpoint, load it with llmopt's runtime."""
    from transformers import AutoConfig

    from llmopt.checkpoint.formats import write_checkpoint
    from llmopt.checkpoint.types import QuantArgs
    from llmopt.quant.rtn import rtn_quantize
    from llmopt.runtime import load_quantized_model

    method, _, head = variant.partition("+")
    lm_head = head == "head"
    qargs = QuantArgs(bits=4, group_size=group_size) if method == "int4" else QuantArgs(bits=8, group_size=-1)
    qweights = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (lm_head or name != "lm_head"):
            qw = rtn_quantize(m.weight.detach(), qargs)
            qw.act_bits = 8 if method == "w8a8" else None
            qweights[name] = qw
    out = root / variant.replace("+", "-")
    out.mkdir()
    write_checkpoint("compressed-tensors", model, qweights, out, qargs, {"int4": "rtn"}.get(method, method))
    return load_quantized_model(out, AutoConfig.from_pretrained(out), torch.device("cpu"), torch.float32)


@torch.no_grad()
def measure(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill seconds, median decode step seconds) for one run."""
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(prompt, past_key_values=cache, use_cache=True)
    prefill = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    step_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True)
        step_times.append(time.perf_counter() - t0)
        tok = out.logits[:, -1:].argmax(-1)
    return prefill, statistics.median(step_times)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a float32 sum over `gib` GiB at torch's current threads (median of repeats after one warm-up)."""
    t = torch.ones(int(gib * 2**30) // 4)
    t.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    return t.numel() * 4 / statistics.median(times) / 1e9


GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0", "w8a8": "Q8_0"}


def gguf_files(base: torch.nn.Module, variants: list[str], root: Path) -> dict[str, Path]:
    """variant → GGUF of its checkpoint under root (written by quantized(); fp32 saved here)."""
    from llmopt.checkpoint.formats.gguf import export_gguf
    from llmopt.models.loading import ModelSpec, resolve_path

    tokenizer = Path(resolve_path(ModelSpec("builtin:tiny")))
    files = {}
    for v in variants:
        if v == "no-matmul":
            continue
        if v not in GGUF_TYPES:
            print(f"llama.cpp: {v} has no exact GGUF type, not compared")
            continue
        if v == "w8a8":  # handled below: the int8 checkpoint's very weights
            continue
        ckpt = root / v
        if v == "fp32":
            base.save_pretrained(ckpt)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, ckpt / name)
        files[v] = root / f"{v}.gguf"
        export_gguf(ckpt, files[v], float_type="f32")
    if "w8a8" in variants:  # same RTN per-channel weights as int8; only llmopt quantizes activations per token
        if "int8" in files:
            files["w8a8"] = files["int8"]
        else:
            print("llama.cpp: w8a8 is compared on the int8 checkpoint's Q8_0 file: add int8 to --variants")
    return files


def llama_bench(binary: Path, gguf: Path, steps: int, threads: int, repack: bool) -> float:
    """llama.cpp's batch-1 decode tok/s on the file (one repetition after llama-bench's own warm-up)."""
    cmd = [str(binary / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(steps), "-t", str(threads),
           "-r", "1", "-o", "json", *([] if repack else ["--repack", "0"])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out[out.index("["):out.rindex("]") + 1])[0]["avg_ts"])


def kernel_summary(model: torch.nn.Module) -> str:
    from llmopt.runtime import kernel_report

    counts: dict[str, int] = {}
    for _, desc in kernel_report(model):
        counts[desc] = counts.get(desc, 0) + 1
    return "; ".join(f"{n}× {d}" for d, n in sorted(counts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill M)")
    p.add_argument("--steps", type=int, default=16, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="fp32,int4,int8,w8a8,int4+head,int8+head",
                   help="any of fp32, bf16, int4, int8, w8a8 (each quantized one optionally with +head), and "
                        "no-matmul (the float model with free decoder Linears: the decoder's fixed cost)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--llamacpp-bin", type=Path, help="llama.cpp's build/bin: run llama-bench on the same weights")
    p.add_argument("--llamacpp-no-repack", action="store_true", help="pass --repack 0 to llama-bench")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, layers {args.layers}, hidden {args.hidden}, "
          f"mlp {args.intermediate}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, prompt {args.prompt}, "
          f"decode steps {args.steps} × {args.rounds} rounds (interleaved)")

    base = build_float(args)
    n_lin = sum(m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    print(f"params: decoder Linears {n_lin / 1e6:.0f}M, lm_head {base.lm_head.weight.numel() / 1e6:.0f}M, "
          f"embeddings {base.model.embed_tokens.weight.numel() / 1e6:.0f}M")
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-") as tmp:
        run_rounds(args, base, variants, Path(tmp))


def run_rounds(args, base: torch.nn.Module, variants: list[str], tmp: Path) -> None:
    from llmopt.runtime import weight_bytes

    models: dict[str, torch.nn.Module] = {}
    for v in variants:
        if v == "fp32":
            models[v] = base
        elif v == "bf16":
            models[v] = build_float(args).to(torch.bfloat16)
        elif v == "no-matmul":
            models[v] = without_matmuls(build_float(args))
        else:
            models[v] = quantized(base, v, tmp, args.group_size)
        gc.collect()
    files = gguf_files(base, variants, tmp) if args.llamacpp_bin else {}
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)
    for m in models.values():  # warm-up: allocations, oneDNN primitives for M=1 and M=prompt
        measure(m, prompt, 4)
    results: dict[str, dict[str, list[float]]] = {v: {"prefill": [], "decode": [], "llamacpp": []} for v in models}
    probe = []
    for _ in range(args.rounds):
        probe.append(read_bandwidth())
        timed: dict[Path, float] = {}  # each GGUF file once a round (int8 and w8a8 share one)
        for v, m in models.items():
            pre, dec = measure(m, prompt, args.steps)
            results[v]["prefill"].append(pre)
            results[v]["decode"].append(dec)
            if v in files:
                if files[v] not in timed:
                    timed[files[v]] = llama_bench(args.llamacpp_bin, files[v], args.steps, threads,
                                                  not args.llamacpp_no_repack)
                results[v]["llamacpp"].append(timed[files[v]])

    print(f"\nread probe (float32 sum over 1 GiB, {threads} threads): {statistics.median(probe):.1f} GB/s "
          f"(rounds: {', '.join(f'{b:.1f}' for b in probe)})")
    ref = results.get("fp32")
    head = f"{'variant':10} {'decode tok/s':>13} {'× fp32':>8} {'weights GB/s':>13} {'prefill tok/s':>14} {'× fp32':>8}"
    head += f" {'weights MB':>11}" + (f" {'llama.cpp':>16} {'llmopt/llama.cpp':>17}" if files else "")
    print(head)
    for v, r in results.items():
        dec = statistics.median(r["decode"])
        pre = statistics.median(r["prefill"])
        d_ratio = statistics.median(ref["decode"]) / dec if ref else float("nan")
        p_ratio = statistics.median(ref["prefill"]) / pre if ref else float("nan")
        wb = weight_bytes(models[v])
        line = (f"{v:10} {1 / dec:13.2f} {d_ratio:8.2f} {wb / dec / 1e9:13.1f} {args.prompt / pre:14.1f} "
                f"{p_ratio:8.2f} {wb / 1e6:11.0f}")
        if r["llamacpp"]:
            lc = statistics.median(r["llamacpp"])
            rounds = ", ".join(f"{(1 / d) / t:.2f}" for d, t in zip(r["decode"], r["llamacpp"]))
            line += f" {lc:9.2f} {GGUF_TYPES[v]:>6} {(1 / dec) / lc:17.2f}  (rounds {rounds})"
        print(line)
    for v, m in models.items():
        if v not in ("fp32", "bf16", "no-matmul"):
            print(f"kernels {v}: {kernel_summary(m)}")
    if "no-matmul" in results:
        fixed = statistics.median(results["no-matmul"]["decode"])
        shares = ", ".join(f"{v} {fixed / statistics.median(r['decode']):.0%}" for v, r in results.items()
                           if v != "no-matmul")
        print(f"decoder outside the matmuls (no-matmul): {fixed * 1e3:.2f} ms a decode step; share of each step: "
              f"{shares}")

if __name__ == "__main__":
    main()
