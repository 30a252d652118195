"""What `llmopt quantize` prints, from a QuantizeResult whose numbers are chosen so every cell is known by hand."""

from __future__ import annotations

from pathlib import Path

from llmopt.quant.api import QuantizeResult
from llmopt.quant.console import layer_table, memory_line, phases_line, summary_table


def _result(**kw: object) -> QuantizeResult:
    metrics = {"float": {"perplexity": 10.0}, "size_bytes": 2 ** 20, "float_size_bytes": 4 * 2 ** 20,
               "quantized": {"perplexity": 10.5, "kld_mean": 0.0125, "kld_p99": 0.25, "top1_agreement": 0.9375,
                             "tokens": 504}, "eval": {"source": "builtin", "split": "test"}}
    layers = [{"name": "model.layers.0", "error": 0.002, "rtn_error": 0.004, "vs_rtn": 0.5, "seconds": 1.25}]
    base = dict(out=Path("q"), method="gptq", format="compressed-tensors", timings={"quantize": 3.0, "total": 7.5},
                quant_args={"bits": 4, "group_size": 32, "sym": True}, calibration={}, layers=layers,
                metrics=metrics, evaluated_with="runtime", quantized_modules=14)
    return QuantizeResult(**{**base, **kw})


def _cells(table) -> dict[str, list[str]]:
    return {c.header: list(c.cells) for c in table.columns}


def test_summary_table_cells_and_caption():
    t = summary_table(_result())
    assert t.title == "gptq W4 g32 sym → compressed-tensors  (14 Linears)"
    cells = _cells(t)
    assert cells["model"] == ["float", "quantized (runtime)"]
    assert cells["perplexity"] == ["10.000", "10.500"] and cells["top-1"] == ["1.000", "0.938"]
    assert cells["mean KLD"] == ["0", "1.250e-02"] and cells["p99 KLD"] == ["0", "2.500e-01"]
    assert cells["size on disk"] == ["4.00 MiB", "1.00 MiB (0.25×)"] and cells["time"] == ["—", "3.0 s"]
    assert t.caption == "perplexity +5.00% vs float on 504 tokens of builtin:test; total time 7.5 s"


def test_summary_table_without_evaluation():
    m = {"size_bytes": 2 ** 20, "float_size_bytes": None}
    cells = _cells(summary_table(_result(metrics=m, evaluated_with=None)))
    assert cells["model"][1] == "quantized (not evaluated)" and cells["perplexity"] == ["—", "—"]
    assert cells["size on disk"] == ["—", "1.00 MiB (—×)"]


def test_layer_table_and_data_free_runs():
    assert _cells(layer_table(_result())) == {"layer": ["model.layers.0"], "gptq vs float": ["2.000e-03"],
                                              "RTN vs float": ["4.000e-03"], "gptq / RTN": ["0.500"],
                                              "time": ["1.25 s"]}
    unchecked = [{"name": "model.layers.0", "error": None, "rtn_error": None, "vs_rtn": None, "seconds": 0.5}]
    assert layer_table(_result(layers=unchecked)) is None


def test_phases_line_in_order_with_the_streamed_split():
    tm = {"total": 9.0, "write": 1.0, "quantize": 6.0, "load": 2.0, "stream_read": 2.5, "stream_write": 1.5}
    assert phases_line(_result(timings=tm)) == ("time: load 2.0 s · quantize 6.0 s (of it: reading 2.5 s, writing "
                                                "1.5 s) · write 1.0 s · total 9.0 s")


def test_memory_line_only_for_llmopts_own_runs():
    assert memory_line(_result()) is None  # an external backend's run records no memory
    mem = {"load": "stream", "reason": "--load stream", "peak_rss_bytes": 3 * 10 ** 9, "peak_rss_vs_model": 0.5,
           "model_bytes": 6 * 10 ** 9}
    assert memory_line(_result(memory=mem)) == ("memory: streamed layer by layer from its shards (--load stream); "
                                                "peak RSS 3.00 GB = 0.50× the 6.00 GB of float weights")
    whole = {"load": "memory", "reason": "fits", "peak_rss_bytes": 10 ** 9, "peak_gpu_bytes": 2 * 10 ** 9}
    assert memory_line(_result(memory=whole)) == ("memory: whole in memory (fits); peak RSS 1.00 GB; "
                                                  "peak GPU memory 2.00 GB")
