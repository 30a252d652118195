"""What `llmopt quantize` prints, as rich tables and lines of a QuantizeResult: quantized vs float quality, sizes,
time, and the per-layer check."""

from __future__ import annotations

from rich.table import Table

from llmopt.quant.api import QuantizeResult


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f} MiB"


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def summary_table(res: QuantizeResult) -> Table:
    """Float vs quantized: perplexity, mean/p99 KLD, top-1 agreement, size on disk, time."""
    m = res.metrics
    qa = res.quant_args
    group = "per-channel" if qa["group_size"] == -1 else f"g{qa['group_size']}"
    title = (f"{res.method} W{qa['bits']} {group} {'sym' if qa['sym'] else 'asym'} → {res.format}"
             f"  ({res.quantized_modules} Linears)")
    t = Table(title=title, title_justify="left")
    for col in ("model", "perplexity", "mean KLD", "p99 KLD", "top-1", "size on disk", "time"):
        t.add_column(col, justify="left" if col == "model" else "right")
    fq, qq = m.get("float"), m.get("quantized")
    t.add_row("float", _f(fq and fq["perplexity"], ".3f"), "0", "0", "1.000", _mib(m.get("float_size_bytes")), "—")
    ratio = m["size_bytes"] / m["float_size_bytes"] if m.get("float_size_bytes") else None
    t.add_row(f"quantized ({res.evaluated_with or 'not evaluated'})", _f(qq and qq["perplexity"], ".3f"),
              _f(qq and qq["kld_mean"], ".3e"), _f(qq and qq["kld_p99"], ".3e"), _f(qq and qq["top1_agreement"], ".3f"),
              f"{_mib(m.get('size_bytes'))} ({_f(ratio, '.2f')}×)", f"{res.timings['quantize']:.1f} s")
    if fq and qq:
        delta = qq["perplexity"] / fq["perplexity"] - 1
        t.caption = (f"perplexity {delta:+.2%} vs float on {qq['tokens']} tokens of {m['eval']['source']}:"
                     f"{m['eval']['split']}; total time {res.timings['total']:.1f} s")
    return t


def layer_table(res: QuantizeResult) -> Table | None:
    """Per-layer relative output error vs the float layer, next to RTN's at the same bits/group/sym (None when
    no layer was checked)."""
    if not any(layer["error"] is not None for layer in res.layers):
        return None
    t = Table(title="per-layer relative output error (check samples)", title_justify="left")
    for col in ("layer", f"{res.method} vs float", "RTN vs float", f"{res.method} / RTN", "time"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for layer in res.layers:
        t.add_row(layer["name"], _f(layer["error"], ".3e"), _f(layer["rtn_error"], ".3e"), _f(layer["vs_rtn"], ".3f"),
                  f"{layer['seconds']:.2f} s")
    return t


_PHASES = (("load", "load"), ("data", "data"), ("kv_calibrate", "KV scales"), ("quantize", "quantize"),
           ("write", "write"), ("evaluate", "evaluate"), ("total", "total"))


def phases_line(res: QuantizeResult) -> str:
    """Seconds per phase, as measured ('quantize' includes a streamed model's reads and writes)."""
    tm = res.timings
    parts = [f"{label} {tm[key]:.1f} s" for key, label in _PHASES if key in tm]
    if "stream_read" in tm:
        inside = f"reading {tm['stream_read']:.1f} s, writing {tm['stream_write']:.1f} s"
        if "stream_evaluate" in tm:
            inside += f", evaluating {tm['stream_evaluate']:.1f} s"
        parts[[k for k, _ in _PHASES if k in tm].index("quantize")] += f" (of it: {inside})"
    return "time: " + " · ".join(parts)


def memory_line(res: QuantizeResult) -> str | None:
    """How the model was loaded and the peak resident memory measured (None: an external backend's run)."""
    from llmopt.memory import gb

    mem = res.memory
    if not mem:
        return None
    how = "streamed layer by layer from its shards" if mem["load"] == "stream" else "whole in memory"
    line = f"memory: {how} ({mem['reason']}); peak RSS {gb(mem['peak_rss_bytes'])}"
    if mem.get("peak_rss_vs_model") is not None:
        line += f" = {mem['peak_rss_vs_model']:.2f}× the {gb(mem['model_bytes'])} of float weights"
    if mem.get("peak_gpu_bytes") is not None:
        line += f"; peak GPU memory {gb(mem['peak_gpu_bytes'])}"
    if mem.get("peak_rss_with_evaluation_bytes") is not None:
        line += f"; {gb(mem['peak_rss_with_evaluation_bytes'])} with the evaluation"
    return line


def moe_table(res: QuantizeResult) -> Table | None:
    """Tokens routed to each expert during calibration, per MoE layer, and how starved experts were treated."""
    if not res.moe or not res.moe["routing"]:
        return None
    t = Table(title="MoE calibration: tokens routed to each expert", title_justify="left")
    for col in ("layer", "tokens × top-k", "routed per expert", "starved", "statistics"):
        t.add_column(col, justify="left" if col in ("layer", "routed per expert") else "right")
    for layer, rep in res.moe["routing"].items():
        for block, b in rep["blocks"].items():
            t.add_row(f"{layer} {block}", f"{b['tokens']} × {rep['top_k']}", " ".join(map(str, b["routed_tokens"])),
                      ",".join(map(str, b["starved"])) or "none", rep["statistics"])
    t.caption = f"{res.moe['starved_treatment']}; routers kept float"
    return t


def kinds_table(res: QuantizeResult) -> Table | None:
    """Quantized / targeted / total parameters per kind (attention, MLP, experts, routers, embeddings, head)."""
    if not res.parameters:
        return None
    t = Table(title="parameters by kind", title_justify="left")
    for col in ("kind", "quantized", "targeted", "total", "quantized / total"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    for kind, c in res.parameters.items():
        if c["total"]:
            t.add_row(kind, f"{c['quantized']:,}", f"{c['targeted']:,}", f"{c['total']:,}",
                      f"{c['quantized'] / c['total']:.1%}")
    return t
