"""`llmopt quantize`: parse options → QuantizeArgs → quantize() → tables (or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmopt.checkpoint.types import METHODS, QUANTIZE_FORMATS
from llmopt.cli.options import (
    ChatTemplate,
    Device,
    Dtype,
    Json,
    Overwrite,
    Revision,
    Samples,
    Seed,
    SeqLen,
    Split,
    TextField,
    TrustRemoteCode,
)


def quantize(
    model: Annotated[str, typer.Argument(help="Hub id, local checkpoint directory or builtin:tiny.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")],
    method: Annotated[str, typer.Option("--method", "-m", help=f"One of {', '.join(METHODS)}.")] = "gptq",
    bits: Annotated[int | None, typer.Option("--bits", help="Weight bits (default 8 for int8/w8a8, else 4).")] = None,
    group_size: Annotated[int | None, typer.Option(
        "--group-size", help="Input channels per scale; -1 = per channel (default -1 for int8/w8a8, else 128).")] = None,
    sym: Annotated[bool | None, typer.Option("--sym/--asym", help="Symmetric or asymmetric (default: asym for awq).",
                                             show_default=False)] = None,
    format: Annotated[str, typer.Option("--format", "-f", help=f"Checkpoint format: {', '.join(QUANTIZE_FORMATS)} "
                                                               "(gguf: a compressed-tensors checkpoint plus "
                                                               "model.gguf for llama.cpp beside it).")]
    = "compressed-tensors",
    calib: Annotated[str, typer.Option("--calib", help="Calibration text: builtin, wikitext2, c4, pileval, a "
                                                      "datasets id or a local file/folder.")] = "builtin",
    samples: Samples = 128,
    seq_len: SeqLen = 256,
    split: Split = None,
    text_field: TextField = "text",
    chat_template: ChatTemplate = False,
    damp: Annotated[float, typer.Option("--damp", help="GPTQ: dampening, fraction of mean Hessian diagonal.")] = 0.01,
    block_size: Annotated[int, typer.Option("--block-size", help="GPTQ: columns per lazy-update block.")] = 128,
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize columns by decreasing Hessian "
                                                                "diagonal.")] = False,
    static_groups: Annotated[bool, typer.Option("--static-groups", help="GPTQ with --act-order: group parameters "
                                                                        "from the original order.")] = False,
    scale_search: Annotated[bool, typer.Option("--scale-search", help="GPTQ and RTN: search each group's scale "
                                               "for the least rounding error (GPTQ: weighted by the Hessian's "
                                               "diagonal) instead of taking its range.")]
    = False,
    smoothquant_alpha: Annotated[float, typer.Option("--smoothquant-alpha", help="w8a8: migration strength.")] = 0.5,
    awq_grid: Annotated[int, typer.Option("--awq-grid", help="AWQ: grid points for α and for the clip ratio.")] = 20,
    awq_clip: Annotated[bool, typer.Option("--awq-clip/--no-awq-clip", help="AWQ: search a clip ratio per group.")]
    = True,
    targets: Annotated[list[str] | None, typer.Option(
        "--targets", help="Modules to quantize: class name, glob on module names, or re:REGEX (repeatable). "
                          "lm_head only when named.")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Modules to keep float (same patterns).")]
    = None,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Measure quality vs float at the end.")]
    = True,
    eval_data: Annotated[str, typer.Option("--eval-data", help="Held-out text for the quality table.")] = "builtin",
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Windows for the quality table.")] = 32,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", help="Tokens per evaluation window.")] = 256,
    device: Device = "auto",
    dtype: Dtype = "auto",
    calib_dtype: Annotated[str, typer.Option(
        "--calib-dtype", help="Calibration forwards: auto (bf16 autocast for an fp32 model where bf16 is fast, "
                              "else the model's dtype), model, or bfloat16. Weights, Hessians, statistics and "
                              "solves stay fp32.")] = "auto",
    trust_remote_code: TrustRemoteCode = False,
    revision: Revision = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    backend: Annotated[str, typer.Option("--backend", help="llmopt, or an external backend (llmopt backends).")]
    = "llmopt",
    backend_python: Annotated[str | None, typer.Option("--backend-python", help="Python of the backend's venv.")]
    = None,
    kv_cache: Annotated[str | None, typer.Option(
        "--kv-cache", help="Also calibrate static per-layer K/V cache scales (fp8 or int8: amax/448 or amax/127 "
                           "over the calibration windows), written as compressed-tensors kv_cache_scheme + "
                           "self_attn.k_scale/v_scale, where vLLM reads them.")] = None,
    load: Annotated[str, typer.Option(
        "--load", help="auto: the whole float model in memory when it fits (fastest), else streamed; memory; "
                       "stream: one decoder layer at a time from the safetensors shards, written as it goes.")]
    = "auto",
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory budget of --load auto (e.g. 8GB, 7.5GiB); default: what is available now.")]
    = None,
    layer_check: Annotated[bool | None, typer.Option(
        "--layer-check/--no-layer-check", help="Per-layer output error vs float and RTN on calibration windows "
                                               "(default: on for methods that calibrate; off for the data-free "
                                               "rtn and int8, which then load no calibration data).",
        show_default=False)] = None,
    json_out: Json = False,
) -> None:
    """Quantize a causal LM (RTN, INT8, W8A8 SmoothQuant, GPTQ, AWQ) and write a checkpoint others can serve."""
    from llmopt.cli.console import out as console
    from llmopt.quant.api import QuantizeArgs
    from llmopt.quant.api import quantize as run_quantize

    args = QuantizeArgs(
        model=model, out=out, method=method, bits=bits, group_size=group_size, sym=sym, format=format, calib=calib,
        samples=samples, seq_len=seq_len, split=split, text_field=text_field, chat_template=chat_template, damp=damp,
        block_size=block_size, act_order=act_order, static_groups=static_groups, scale_search=scale_search,
        smoothquant_alpha=smoothquant_alpha,
        awq_grid=awq_grid, awq_clip=awq_clip, targets=targets or ["Linear"], ignore=ignore or [], evaluate=evaluate,
        eval_data=eval_data, eval_samples=eval_samples, eval_seq_len=eval_seq_len, device=device, dtype=dtype,
        calib_dtype=calib_dtype, trust_remote_code=trust_remote_code, revision=revision, seed=seed,
        overwrite=overwrite, backend=backend, backend_python=backend_python, kv_cache=kv_cache, load=load,
        max_memory=max_memory, layer_check=layer_check)
    from llmopt.cli.progress import bars

    with bars(not json_out) as progress:
        result = run_quantize(args, progress=progress)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    from llmopt.quant.console import kinds_table, layer_table, memory_line, moe_table, phases_line, summary_table

    table = layer_table(result)
    if table is not None:
        console.print(table)
    elif result.layers:
        console.print(f"per-layer check: not run ({result.method} is data-free; --layer-check measures each "
                      f"layer's output error on calibration windows)")
    for table in (moe_table(result), kinds_table(result)):
        if table is not None:
            console.print(table)
    console.print(summary_table(result))
    if result.kv_cache is not None:
        kv = result.kv_cache
        console.print(f"KV cache scales ({kv['kind']}, static per layer = amax/{kv['qmax']:g}): k_scale "
                      f"{min(kv['k_scale']):.3g}–{max(kv['k_scale']):.3g}, v_scale {min(kv['v_scale']):.3g}–"
                      f"{max(kv['v_scale']):.3g} over {len(kv['k_scale'])} layers → kv_cache_scheme + "
                      f"self_attn.k_scale/v_scale")
    console.print(phases_line(result))
    memory = memory_line(result)
    if memory is not None:
        console.print(memory)
    console.print(f"wrote {result.out}")
    if result.gguf is not None:
        _print_gguf(result.out, result.gguf)


def _print_gguf(out: Path, info: dict) -> None:
    from llmopt.cli.console import err
    from llmopt.cli.console import out as console

    kinds = ", ".join(f"{n}× {k}" for k, n in info["tensors"].items())
    console.print(f"wrote {out / info['file']} ({info['bytes'] / 2**20:.1f} MiB: {kinds}) for llama.cpp, beside the "
                  f"compressed-tensors safetensors checkpoint (what --evaluate measures and vLLM loads)")
    if info["warning"] is not None:
        err.print(f"warning: {info['warning']}", markup=False)
