"""llmopt GPTQ → GGUF Q4_0 vs llama.cpp's own Q4_0, measured by llama.cpp itself: KLD vs the float model on the
same held-out text, perplexity, file size, batch-1 decode tok/s.

Steps (all files under --work):
  1. the float model → F32 GGUF (`llmopt export --float-type f32`), and its logits on the held-out text
     (llama-perplexity --kl-divergence-base);
  2. llmopt GPTQ 4-bit g32 sym (`llmopt quantize --method gptq --group-size 32`) → GGUF (`llmopt export`):
     every Linear exactly Q4_0, embeddings/head F16;
  3. llama.cpp's Q4_0 of the same F32 GGUF (llama-quantize, embeddings/head kept F16 too, so only the Linears
     differ);
  4. with --kquants: llama.cpp's Q4_K_M, and where llama-imatrix is built, its importance matrix over the same
     number of calibration tokens llmopt's GPTQ used (builtin train split, --ctx-token chunks) for Q4_0 and
     Q4_K_M — llama.cpp's best RTN-family quantizers, Q4_0 + imatrix at the same file size as GPTQ's;
  5. llama-perplexity --kl-divergence on every quantized file, llama-bench (-p 0 -n 64) on all;
  6. llmopt's own perplexity on the identical chunks (llama-perplexity's scheme: chunks of --ctx tokens, BOS
     first, the second half scored), from transformers with the checkpoint's dequantized weights, so the GGUF
     number can be checked against llmopt's.

llama.cpp is not a dependency: build llama-perplexity/llama-bench/llama-quantize and pass --llamacpp-bin.
`--no-repack` (-nr) is passed unless --repack: llama.cpp's AMX repacking dies with SIGILL where the OS does not
grant AMX tiles (the dev sandbox); a build without AMX can repack (its AVX-512 interleaved Q4_0/Q8_0 kernels).

Usage: python bench/llamacpp_compare.py [--model builtin:tiny] [--llamacpp-bin /work/llamacpp/build/bin]
       [--work /tmp/llamacpp-compare] [--ctx 256] [--chunks N] [--threads 2] [--quantize-args "..."] [--kquants]
       [--also CHECKPOINT_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

PY = sys.executable
NO_REPACK = ["-nr"]  # main() clears it with --repack


def run(cmd: list[str], log: Path) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the log is kept either way
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}), see {log}")
    return proc.stdout + proc.stderr


def held_out_text(path: Path, split: str = "test") -> Path:
    from llmopt.calibration.corpus import split_texts

    path.write_text("\n\n".join(split_texts(split)))
    return path


def quantize_args_tokens(quantize_args: str) -> int:
    """Calibration tokens of the GPTQ run: --samples × --seq-len (llmopt quantize's defaults 128 × 256)."""
    words = quantize_args.split()
    get = lambda flag, default: int(words[words.index(flag) + 1]) if flag in words else default
    return get("--samples", 128) * get("--seq-len", 256)


def llama_cpp_quants(b: Path, w: Path, f32: Path, args) -> dict[str, Path]:
    """llama.cpp's own 4-bit files of the F32 GGUF (embeddings and head F16, as llmopt's): Q4_0, and with
    --kquants Q4_K_M plus imatrix variants where llama-imatrix is built."""
    def quantize(label: str, stem: str, qtype: str, *extra: str) -> None:
        files[label] = w / f"{stem}.gguf"
        run([str(b / "llama-quantize"), *extra, "--token-embedding-type", "f16", "--output-tensor-type", "f16",
             str(f32), str(files[label]), qtype, str(args.threads)], w / f"quantize-{files[label].stem}.log")

    files: dict[str, Path] = {}
    quantize("llama.cpp Q4_0", "lcpp-q4_0", "Q4_0")
    if not args.kquants:
        return files
    quantize("llama.cpp Q4_K_M", "lcpp-q4_k_m", "Q4_K_M")
    if not (b / "llama-imatrix").exists():
        print(f"no {b / 'llama-imatrix'}: imatrix rows skipped")
        return files
    imatrix = w / "imatrix.gguf"
    chunks = max(1, quantize_args_tokens(args.quantize_args) // args.ctx)
    run([str(b / "llama-imatrix"), "-m", str(f32), "-f", str(held_out_text(w / "calib.txt", "train")), "-o",
         str(imatrix), "-c", str(args.ctx), "--chunks", str(chunks), "-t", str(args.threads), *NO_REPACK],
        w / "imatrix.log")
    quantize("llama.cpp Q4_0 + imatrix", "lcpp-q4_0-imatrix", "Q4_0", "--imatrix", str(imatrix))
    quantize("llama.cpp Q4_K_M + imatrix", "lcpp-q4_k_m-imatrix", "Q4_K_M", "--imatrix", str(imatrix))
    return files


def perplexity(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int, log: Path,
               kld: list[str]) -> dict:
    out = run([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
               "--chunks", str(chunks), "-t", str(threads), *NO_REPACK, *kld], log)
    result = {}
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out) or re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out)
    if m:
        result["ppl"] = float(m.group(1))
    for key, pattern in (("kld_mean", r"Mean\s+KLD:\s*([-\d.e]+)"), ("kld_p99", r"99\.0%\s+KLD:\s*([-\d.e]+)"),
                         ("same_top_pct", r"Same top p:\s*([\d.]+)")):
        if m := re.search(pattern, out):
            result[key] = float(m.group(1))
    return result


def decode_speed(binary: Path, gguf: Path, threads: int, log: Path) -> float:
    out = run([str(binary / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", "64", "-t", str(threads),
               *(["--repack", "0"] if NO_REPACK else []), "-r", "5", "-o", "json"], log)
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    return float(rows[0]["avg_ts"])


def llmopt_ppl(model_dir: Path, ckpt: Path | None, text: Path, ctx: int, chunks: int) -> float:
    """Perplexity in llama-perplexity's scheme, from transformers with the checkpoint's dequantized Linears."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if ckpt is not None:
        from llmopt.checkpoint.formats import read_checkpoint

        _, qweights, others = read_checkpoint(ckpt)
        with torch.no_grad():
            model.load_state_dict(others, strict=False)  # AWQ folds its scales into the norms: take those too
            for name, qw in qweights.items():
                model.get_submodule(name).weight.copy_(qw.dequantize(torch.float32))
    # llama-perplexity tokenizes the whole file with BOS first, then also puts BOS at the start of every chunk
    ids = torch.tensor([tok.bos_token_id, *tok(text.read_text(), add_special_tokens=False)["input_ids"]])
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, min(len(ids) - ctx + 1, chunks * ctx), ctx):
            chunk = ids[start:start + ctx].clone()
            chunk[0] = tok.bos_token_id
            logp = torch.log_softmax(model(chunk[None]).logits[0].float(), -1)  # [ctx, vocab]
            first = ctx // 2
            targets = chunk[first + 1:]
            nll -= logp[first:-1].gather(-1, targets[:, None]).sum().item()
            count += len(targets)
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--llamacpp-bin", type=Path, default=Path("/work/llamacpp/build/bin"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp-compare"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=-1, help="score only the first N chunks (-1: all); a ~1B "
                    "model in fp32 scores ~10k tokens in minutes here")
    ap.add_argument("--quantize-args", default="", help="more `llmopt quantize` options for the GPTQ checkpoint, "
                    "e.g. '--samples 32 --seq-len 256' for a ~1B model")
    ap.add_argument("--repack", action="store_true", help="let llama.cpp repack weights into its interleaved "
                    "layouts (faster decode; needs a build without AMX, or an OS that grants AMX tiles)")
    ap.add_argument("--kquants", action="store_true", help="also llama.cpp's Q4_K_M, and imatrix variants")
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="More llmopt checkpoints of the same model to export and measure (AWQ→Q4_1, int8→Q8_0, "
                         "act-order/g128 → requantized).")
    args = ap.parse_args()
    if args.repack:
        NO_REPACK.clear()
    w, b = args.work, args.llamacpp_bin
    w.mkdir(parents=True, exist_ok=True)
    model_dir = resolve(args.model)
    text = held_out_text(w / "test.txt")
    ckpt = w / "gptq-g32"
    if not ckpt.exists():
        run([PY, "-m", "llmopt", "quantize", args.model, "-o", str(ckpt), "--method", "gptq", "--group-size", "32",
             "--no-evaluate", *args.quantize_args.split()], w / "quantize.log")
    files = {"F32": w / "f32.gguf", "llmopt GPTQ→Q4_0": w / "llmopt-q4_0.gguf"}
    run([PY, "-m", "llmopt", "export", str(model_dir), "--float-type", "f32", "--out", str(files["F32"])],
        w / "export-f32.log")
    run([PY, "-m", "llmopt", "export", str(ckpt), "--out", str(files["llmopt GPTQ→Q4_0"])], w / "export-q4.log")
    extra = {f"llmopt {c.name}": c for c in args.also}
    for label, c in extra.items():
        files[label] = w / f"{c.name}.gguf"
        run([PY, "-m", "llmopt", "export", str(c), "--out", str(files[label])], w / f"export-{c.name}.log")
    lcpp = llama_cpp_quants(b, w, files["F32"], args)
    files |= lcpp
    base = w / "f32.logits"
    rows = {"F32": perplexity(b, files["F32"], text, args.ctx, args.chunks, args.threads, w / "ppl-f32.log",
                              ["--kl-divergence-base", str(base)])}
    for label in ("llmopt GPTQ→Q4_0", *lcpp, *extra):
        rows[label] = perplexity(b, files[label], text, args.ctx, args.chunks, args.threads,
                                 w / f"ppl-{files[label].stem}.log", ["--kl-divergence-base", str(base), "--kl-divergence"])
    for label, path in files.items():
        rows[label]["bytes"] = path.stat().st_size
        rows[label]["decode_tok_s"] = decode_speed(b, path, args.threads, w / f"bench-{path.stem}.log")
    chunks = args.chunks if args.chunks > 0 else 1 << 30
    rows["F32"]["llmopt_ppl"] = llmopt_ppl(model_dir, None, text, args.ctx, chunks)
    rows["llmopt GPTQ→Q4_0"]["llmopt_ppl"] = llmopt_ppl(model_dir, ckpt, text, args.ctx, chunks)
    for label, c in extra.items():
        rows[label]["llmopt_ppl"] = llmopt_ppl(model_dir, c, text, args.ctx, chunks)
    load = os.getloadavg()
    print(json.dumps({"model": args.model, "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
                      "loadavg": load, "rows": rows}, indent=2))
    print(f"\n| {args.model}, ctx {args.ctx}, {args.threads} threads, load {load[0]:.1f} | PPL (llama.cpp) | "
          f"PPL (llmopt, same chunks) | mean KLD vs F32 | same top-1 % | MiB | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r.get('ppl', float('nan')):.4f} | {r.get('llmopt_ppl', float('nan')):.4f} | "
              f"{r.get('kld_mean', 0.0):.5f} | {r.get('same_top_pct', 100.0):.2f} | {r['bytes'] / 2**20:.2f} | "
              f"{r['decode_tok_s']:.0f} |")


def resolve(model: str) -> Path:
    from llmopt.models.loading import ModelSpec, resolve_path

    return Path(resolve_path(ModelSpec(model)))


if __name__ == "__main__":
    main()
