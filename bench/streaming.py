"""Quantizing models bigger than memory: peak RSS and wall time of `llmopt quantize --load memory` vs
`--load stream`, on random Llama-shaped models written here as safetensors shards.

Each run is its own process, measured from outside (`/usr/bin/time -v`: maximum resident set size, wall clock)
and from inside (llmopt.json's memory.peak_rss_bytes). Memory and stream runs alternate (ABAB) so the shared
machine's load falls on both; the codes of the two are compared tensor by tensor (they must be bit-identical).

Scenarios (pick with --only):
  gptq   the 0.97B shape (22 layers, hidden 2048, MLP 5632, 32/4 heads, vocab 32000, fp32 = 3.9 GB): GPTQ
         --samples 32 --seq-len 256 --no-evaluate, memory vs stream, the codes compared
  depth  the same width with 11 layers, streamed: peak RSS must not grow with depth
  rtn    RTN on the 0.97B model with the defaults (no calibration, no per-layer check), --no-evaluate
  big    a ~7B shape (32 layers, hidden 4096, MLP 11008, 32/32 heads) in bf16 (≈13.5 GB of shards, more than
         this machine can hold twice) quantized with --load auto and the default budget
Models are built once under --dir (default /tmp/llmopt-streaming) with memory of one tensor at a time.

Usage: python bench/streaming.py [--only gptq,depth,rtn,big] [--repeats 1] [--dir DIR] [--json out.json]
(an existing --json file is resumed: the scenarios it holds are not run again)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "0.97b": dict(layers=22, hidden=2048, inter=5632, heads=32, kv_heads=4, dtype="float32"),
    "0.97b-11": dict(layers=11, hidden=2048, inter=5632, heads=32, kv_heads=4, dtype="float32"),
    "7b": dict(layers=32, hidden=4096, inter=11008, heads=32, kv_heads=32, dtype="bfloat16"),
}
VOCAB = 32000


def build(out: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, dtype: str) -> Path:
    """A random Llama (std 0.02 weights, unit norms) written tensor by tensor into ~2 GB shards, with builtin:tiny's
    tokenizer files (its ids are below the vocab)."""
    from transformers import LlamaConfig

    from llmopt.checkpoint.shards import ShardWriter
    from llmopt.models.loading import resolve_path
    from llmopt.models import ModelSpec

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dt = getattr(torch, dtype)
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp, 2 << 30)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dt)

    writer.add("model.embed_tokens.weight", rand(VOCAB, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (heads * head_dim, hidden)),
                            ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
                            ("self_attn.v_proj", (kv_heads * head_dim, hidden)),
                            ("self_attn.o_proj", (hidden, heads * head_dim)), ("mlp.gate_proj", (inter, hidden)),
                            ("mlp.up_proj", (inter, hidden)), ("mlp.down_proj", (hidden, inter))):
            writer.add(f"{p}{name}.weight", rand(*shape))
        writer.add(f"{p}input_layernorm.weight", torch.ones(hidden, dtype=dt))
        writer.add(f"{p}post_attention_layernorm.weight", torch.ones(hidden, dtype=dt))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=dt))
    writer.add("lm_head.weight", rand(VOCAB, hidden))
    writer.close()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      dtype=dtype)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    tiny = resolve_path(ModelSpec("builtin:tiny"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, tmp / f)
    tmp.rename(out)
    return out


def quantize(model: Path, out: Path, args: list[str]) -> dict:
    """One `llmopt quantize` process: wall seconds, max RSS (outside), llmopt.json's memory and timings."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "llmopt", "quantize", str(model), "--out", str(out),
           "--no-evaluate", *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    meta = json.loads((out / "llmopt.json").read_text())
    return {"args": args, "wall_s": wall, "max_rss_bytes": rss, "memory": meta["memory"],
            "timings": meta["timings"], "size_bytes": meta["metrics"]["size_bytes"]}


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ) between two checkpoint directories, one shard file at a time."""
    from llmopt.checkpoint.shards import ShardReader

    ra, rb = ShardReader(a), ShardReader(b)
    if set(ra.entries) != set(rb.entries):
        return len(ra.entries), sorted(set(ra.entries) ^ set(rb.entries))[:5]
    bad = [k for k in ra.entries if not torch.equal(ra.read(k), rb.read(k))]
    return len(ra.entries), bad


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def scenario_gptq(root: Path, repeats: int) -> dict:
    model = build(root / "llama-0.97b", **SHAPES["0.97b"])
    common = ["--method", "gptq", "--samples", "32", "--seq-len", "256"]
    runs: dict[str, list[dict]] = {"memory": [], "stream": []}
    for _ in range(repeats):
        for mode in ("memory", "stream"):
            runs[mode].append(quantize(model, root / f"out-gptq-{mode}", [*common, "--load", mode]))
            print(f"  gptq {mode}: {runs[mode][-1]['wall_s']:.1f} s, max RSS {gb(runs[mode][-1]['max_rss_bytes'])}",
                  flush=True)
    n, bad = same_tensors(root / "out-gptq-memory", root / "out-gptq-stream")
    med = {m: sorted(r["wall_s"] for r in rs)[len(rs) // 2] for m, rs in runs.items()}
    return {"model": str(model), "shape": SHAPES["0.97b"], "runs": runs, "tensors_compared": n, "differing": bad,
            "wall_ratio_stream_vs_memory": med["stream"] / med["memory"],
            "model_bytes": runs["stream"][0]["memory"]["model_bytes"]}


def scenario_depth(root: Path, gptq: dict | None) -> dict:
    """11 vs 22 layers, streamed (the 22-layer run is the gptq scenario's when it ran)."""
    common = ["--method", "gptq", "--samples", "32", "--seq-len", "256", "--load", "stream"]
    out = {}
    for shape in ("0.97b-11", "0.97b"):
        if shape == "0.97b" and gptq is not None:
            out[shape] = gptq["runs"]["stream"][0]
            continue
        model = build(root / f"llama-{shape}", **SHAPES[shape])
        out[shape] = quantize(model, root / f"out-depth-{shape}", common)
        print(f"  depth {shape}: max RSS {gb(out[shape]['max_rss_bytes'])}", flush=True)
    out["rss_ratio_22_vs_11"] = out["0.97b"]["max_rss_bytes"] / out["0.97b-11"]["max_rss_bytes"]
    return out


def scenario_rtn(root: Path) -> dict:
    model = build(root / "llama-0.97b", **SHAPES["0.97b"])
    out = {mode: quantize(model, root / f"out-rtn-{mode}", ["--method", "rtn", "--load", mode])
           for mode in ("auto", "stream")}
    for mode, r in out.items():
        print(f"  rtn {mode}: {r['wall_s']:.1f} s, max RSS {gb(r['max_rss_bytes'])}", flush=True)
    return out


def scenario_big(root: Path) -> dict:
    t = time.perf_counter()
    model = build(root / "llama-7b-bf16", **SHAPES["7b"])
    built = time.perf_counter() - t
    r = quantize(model, root / "out-big-rtn", ["--method", "rtn"])
    print(f"  big rtn (auto): {r['wall_s']:.1f} s, max RSS {gb(r['max_rss_bytes'])}, {r['memory']['reason']}",
          flush=True)
    return {"model": str(model), "shape": SHAPES["7b"], "build_s": built, "rtn_auto": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="gptq,depth,rtn,big")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmopt-streaming"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    # an existing --json file is resumed: its scenarios are kept, the others run
    results: dict = json.loads(a.json.read_text()) if a.json and a.json.exists() else {}
    results["threads"] = torch.get_num_threads()
    for name in a.only.split(","):
        if name in results:
            continue
        print(f"{name}:", flush=True)
        results[name] = {"gptq": lambda: scenario_gptq(a.dir, a.repeats),
                         "depth": lambda: scenario_depth(a.dir, results.get("gptq")),
                         "rtn": lambda: scenario_rtn(a.dir), "big": lambda: scenario_big(a.dir)}[name]()
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
    g = results.get("gptq")
    if g:
        for mode in ("memory", "stream"):
            r = g["runs"][mode][0]
            print(f"gptq {mode}: wall {r['wall_s']:.1f} s, max RSS {gb(r['max_rss_bytes'])} "
                  f"({r['max_rss_bytes'] / g['model_bytes']:.2f}× the {gb(g['model_bytes'])} model)")
        print(f"gptq stream/memory wall: {g['wall_ratio_stream_vs_memory']:.3f}×; {g['tensors_compared']} tensors "
              f"compared, differing: {g['differing'] or 'none'}")
    if results.get("depth"):
        print(f"depth: max RSS 22 vs 11 layers {results['depth']['rss_ratio_22_vs_11']:.3f}×")


if __name__ == "__main__":
    main()
