"""What an eval result is written as: the rich table, JSON, CSV and a PNG plot of quality against throughput
(Pareto front)."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from llmopt.evaluate import utilization
from llmopt.utils import atomic_write

_STATS = ("mean", "p50", "p95", "p99")
_DISTS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
# quality.generation's figures that go into the CSV (the same names recipe gates use)
GENERATION_METRICS = ("refusal_rate", "over_refusal_rate", "refusal_drift_pp", "over_refusal_drift_pp", "refusal_flips",
                      "answer_accuracy", "answer_exact_match", "answer_accuracy_drift_pp", "answer_flips",
                      "baseline_agreement", "baseline_token_f1", "baseline_rouge_l", "output_tokens_mean",
                      "judge_unparsed")
# eval --kv-dtype: the quantized KV cache vs float KV through llmopt's engine (kv_quality.py); the gates' names too
KV_QUALITY_METRICS = ("kv_dtype", "kv_kld_mean", "kv_kld_p99", "kv_top1", "kv_perplexity", "kv_float_perplexity")


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def _bytes(v) -> str:
    if v is None:
        return "—"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v} B"


def _three(d: dict | None) -> str:
    if not d:
        return "—"
    return " / ".join(_fmt(d.get(k), 1) for k in ("p50", "p95", "p99"))


def baseline_perplexity(result: dict) -> float | None:
    base = result.get("baseline")
    for r in result["results"]:
        if base is not None and r["model"] == base:
            return r["quality"].get("perplexity")
    return None


def _pct(v) -> str:
    return "—" if v is None else f"{v * 100:.1f}%"


def _refusal(g: dict) -> str:
    """Refusal rate on harmful prompts / over-refusal on benign ones, with the drift vs the baseline."""
    if g.get("refusal_rate") is None and g.get("over_refusal_rate") is None:
        return "—"
    drift = g.get("refusal_drift_pp")
    return (f"{_pct(g.get('refusal_rate'))} / {_pct(g.get('over_refusal_rate'))}"
            + ("" if drift is None else f" ({drift:+.1f} pp)"))


def _generation_cells(q: dict) -> list[str]:
    g = q.get("generation") or {}
    acc, drift = g.get("answer_accuracy"), g.get("answer_accuracy_drift_pp")
    return [_refusal(g), _pct(acc) + ("" if acc is None or drift is None else f" ({drift:+.1f} pp)"),
            _pct(g.get("baseline_agreement")), _fmt(g.get("baseline_rouge_l"), 3)]


def _kv_cells(q: dict) -> list[str]:
    kld = q.get("kv_kld_mean")
    return [q.get("kv_dtype") or "—", "—" if kld is None else f"{kld:.3g}", _fmt(q.get("kv_top1"), 4)]


def table(result: dict) -> Table:
    """One row per model: the issue's columns (model, method, size, ppl, Δppl, KLD, top-1, TTFT, TPOT, ...), and
    with --prompts the prompt-set columns (refusal / over-refusal, answer accuracy, agreement with the baseline)."""
    base_ppl = baseline_perplexity(result)
    generated = any(r["quality"].get("generation") for r in result["results"])
    t = Table(title="llmopt eval", show_lines=False)
    gen_cols = ("refusal / over", "answer acc", "same as base", "ROUGE-L") if generated else ()
    kv_measured = any(r["quality"].get("kv_kld_mean") is not None for r in result["results"])
    kv_cols = ("KV dtype", "KV KLD", "KV top-1") if kv_measured else ()  # --kv-dtype vs float KV, through the engine
    for col in ("model", "method", "size", "ppl", "Δppl", "KLD", "top-1", *kv_cols, *gen_cols, "TTFT ms p50/p95/p99",
                "TPOT ms p50/p95/p99", "tok/s", "req/s", "util % mean/p95", "KV bytes", "cost/1k tok"):
        t.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in result["results"]:
        q, p, m = r["quality"], r["perf"], r["memory"]
        ppl = q.get("perplexity")
        dppl = (f"{(ppl / base_ppl - 1) * 100:+.2f}%" if ppl is not None and base_ppl else "—")
        t.add_row(r["model"], r["method"], _bytes(m.get("weight_bytes")), _fmt(ppl), dppl,
                  "—" if q.get("kld_mean") is None else f"{q['kld_mean']:.3g}", _fmt(q.get("top1_agreement"), 3),
                  *(_kv_cells(q) if kv_measured else ()), *(_generation_cells(q) if generated else ()),
                  _three(p.get("ttft_ms")),
                  _three(p.get("tpot_ms")), _fmt(p.get("output_tokens_per_s"), 1), _fmt(p.get("requests_per_s"), 2),
                  utilization.describe(p.get("utilization")),
                  _bytes(m.get("kv_bytes_allocated") if m.get("kv_bytes_allocated") is not None
                         else m.get("kv_bytes_formula")),
                  _fmt(p.get("cost_per_1k_output_tokens"), 5))
    return t


def flat_row(r: dict) -> dict:
    """One model's entry flattened for CSV (ttft_ms.p50 → ttft_p50_ms, tasks.T.metric)."""
    row = {"model": r["model"], "method": r["method"]}
    for key in ("perplexity", "kld_mean", "kld_p99", "top1_agreement"):
        row[key] = r["quality"].get(key)
    for key in KV_QUALITY_METRICS:
        if r["quality"].get(key) is not None:
            row[key] = r["quality"][key]
    for task, metrics in (r["quality"].get("tasks") or {}).items():
        for k, v in metrics.items():
            row[f"tasks.{task}.{k}"] = v
    gen = r["quality"].get("generation")
    if gen:
        row.update({k: gen.get(k) for k in GENERATION_METRICS})
    p = r["perf"]
    for key in ("engine", "threads", "repeats", "output_tokens_per_s", "total_tokens_per_s", "requests_per_s"):
        row[key] = p.get(key)
    for d in _DISTS:
        for s in _STATS:
            row[f"{d[:-3]}_{s}_ms"] = (p.get(d) or {}).get(s)
    row["cost_per_1k_output_tokens"] = p.get("cost_per_1k_output_tokens")
    if p.get("utilization"):
        row.update({k: v for k, v in utilization.flat(p["utilization"]).items() if v is not None})
    row.update(r["memory"])
    spec = r.get("speculative") or {}
    row["acceptance_rate"] = spec.get("acceptance_rate")
    return row


def to_csv(result: dict) -> str:
    rows = [flat_row(r) for r in result["results"]]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (higher x: throughput, lower y: KLD or perplexity),
    sorted by x; a point with a NaN coordinate is never on the front."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 <= y and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated and not (math.isnan(x) or math.isnan(y)):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


@dataclass(frozen=True, slots=True)
class PlotPoint:
    throughput: float  # output tokens/s
    quality: float  # KLD or perplexity, lower is better
    label: str


def plot_quality_vs_throughput(points: list[PlotPoint], path: Path, kld: bool, title: str = "") -> None:
    """The one quality-vs-throughput plot (eval --plot and a recipe's report.png): the Pareto front marked, KLD on
    a log scale (symlog when a KLD is 0, e.g. the baseline's own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front([(p.throughput, p.quality) for p in points])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([p.throughput for p in points], [p.quality for p in points], color="tab:blue", zorder=3)
    if front:
        ax.plot([points[i].throughput for i in front], [points[i].quality for i in front], color="tab:red", lw=1.5,
                linestyle="--", zorder=2, label="Pareto front", marker="o", mfc="none", ms=11)
        ax.legend()
    for p in points:
        ax.annotate(p.label, (p.throughput, p.quality), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if kld and points and all(p.quality > 0 for p in points):
        ax.set_yscale("log")
    elif kld and points:
        ax.set_yscale("symlog", linthresh=min((p.quality for p in points if p.quality > 0), default=1e-6))
    ax.set_xlabel("output tokens/s (higher is better)")
    ax.set_ylabel(("mean KL-divergence vs baseline (nats)" if kld else "perplexity") + " (lower is better)")
    ax.set_title(f"{title}: quality against throughput" if title else "quality against throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_png(result: dict, path: Path) -> None:
    """eval --plot: KLD when a baseline was given, else perplexity, against output tokens/s."""
    use_kld = any(r["quality"].get("kld_mean") is not None for r in result["results"])
    key = "kld_mean" if use_kld else "perplexity"
    points = [PlotPoint(r["perf"]["output_tokens_per_s"], r["quality"][key], Path(r["model"]).name or r["model"])
              for r in result["results"]
              if r["quality"].get(key) is not None and r["perf"].get("output_tokens_per_s") is not None]
    plot_quality_vs_throughput(points, path, use_kld)


def finite(obj):
    """JSON has no inf/nan: non-finite numbers become null (not measured)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def sidecar(json_path: Path, kind: str) -> Path:
    """A file beside the JSON report: r.json → r.flips.jsonl, r.generations.jsonl."""
    json_path = Path(json_path)
    return json_path.with_name(f"{json_path.stem}.{kind}.jsonl")


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(finite(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)


def write_reports(result, json_path: Path | None, csv_path: Path | None, plot_path: Path | None) -> None:
    """The report files; with --prompts, beside the JSON also every generation and the flips against the baseline
    (an empty flips file when nothing flipped, so a stale one from an earlier run never survives)."""
    d = finite(result.to_dict())
    for path in (json_path, csv_path, plot_path):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        atomic_write(json_path, json.dumps(d, indent=2, allow_nan=False) + "\n")
        if result.generations:
            atomic_write(sidecar(json_path, "generations"), _jsonl(result.generations))
            atomic_write(sidecar(json_path, "flips"), _jsonl(result.flips))
    if csv_path is not None:
        atomic_write(csv_path, to_csv(d))
    if plot_path is not None:
        atomic_write(plot_path, lambda p: plot_png(d, p))
