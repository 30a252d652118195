"""perf.utilization: the sampler's statistics (pure), and the figure in `llmopt eval --json` on CPU (with
perf.attention, the engine's attention paths, from the same run)."""

import json
import os
import time

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.evaluate.utilization import (
    Stats,
    Utilization,
    UtilizationSampler,
    describe,
    flat,
    percentile,
)
from llmopt.recipes.gates import METRICS, flatten_result

FAST = ["--num-requests", "4", "--prompt-len", "8:24", "--output-len", "4:8", "--kv-budget", "4MiB",
        "--threads", "1", "--repeats", "2", "--perf-only"]


def test_stats_mean_and_interpolated_percentiles():
    s = Stats.of([10.0, 20.0, 30.0, 40.0, 50.0])
    assert (s.mean, s.p50, s.p95) == (30.0, 30.0, pytest.approx(48.0))  # p95 at rank 3.8: 40 + 0.8 * 10
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        Stats.of([])


def test_report_dict_flat_names_and_cell():
    u = Utilization("cpu", 0.1, threads=2, cpu_percent=[100.0, 200.0, 150.0]).to_dict()
    assert u["samples"] == 3 and u["cpu_percent"] == {"mean": 150.0, "p50": 150.0, "p95": pytest.approx(195.0)}
    assert u["cpu_percent_per_thread"]["mean"] == 75.0 and "gpu_util_percent" not in u
    f = flat(u)
    assert f["cpu_percent_p50"] == 150.0 and f["gpu_util_percent_mean"] is None
    assert set(f) <= set(METRICS)
    assert flatten_result({"perf": {"utilization": u}})["cpu_percent_p95"] == pytest.approx(195.0)
    assert describe(u) == "cpu 150/195" and describe(None) == "—"


def test_sampler_measures_a_busy_thread():
    with UtilizationSampler("cpu", interval_s=0.02) as s:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:  # one core busy
            pass
    u = s.result.to_dict()
    assert u["samples"] >= 3
    assert 50 < u["cpu_percent"]["mean"] <= 100 * (os.cpu_count() or 1) + 5


def test_eval_json_has_utilization_on_cpu(tiny_model_dir, tmp_path):
    j, c = tmp_path / "r.json", tmp_path / "r.csv"
    r = CliRunner().invoke(app, ["eval", str(tiny_model_dir), *FAST, "--json", str(j), "--csv", str(c)])
    assert r.exit_code == 0, r.output
    u = json.loads(j.read_text())["results"][0]["perf"]["utilization"]
    cores = os.cpu_count() or 1
    assert u["device"] == "cpu" and u["samples"] > 0 and u["interval_s"] == 0.1
    assert 0 < u["cpu_percent"]["mean"] <= 100 * cores and u["threads"] == 1  # --threads 1
    assert u["cpu_percent"]["p50"] <= u["cpu_percent"]["p95"]
    assert "cpu_percent_mean" in c.read_text().splitlines()[0]
    assert "utilisation over the timed runs" in r.output
    # which attention path the engine's steps took (perf.attention), from the engine's own counts
    a = json.loads(j.read_text())["results"][0]["perf"]["attention"]
    assert a["decode_path"] == "rule" and a["note"] is None
    assert sum(n for k, n in a["counts"].items() if k.startswith("decode ")) > 0
    assert a["counts"]["prefill is_causal"] >= 1 and set(a["counts"]) <= {
        "decode in-place", "decode gathered", "prefill is_causal", "prefill masked"}
    assert "attention (decode path rule): " in r.output


def test_eval_decode_attention_option(tiny_model_dir, tmp_path):
    """--decode-attention reaches the engine (the JSON reports the path every decode step took) and is refused,
    exit 2, where it cannot apply."""
    j = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["eval", str(tiny_model_dir), *FAST, "--decode-attention", "flex", "--json", str(j)])
    assert r.exit_code == 0, r.output
    a = json.loads(j.read_text())["results"][0]["perf"]["attention"]
    assert a["decode_path"] == "flex" and set(a["counts"]) & {"decode in-place", "decode gathered"} == set()
    assert a["counts"]["decode flex"] > 0
    for bad in (["--decode-attention", "paged"], ["--decode-attention", "gathered", "--engine", "hf"]):
        r = CliRunner().invoke(app, ["eval", str(tiny_model_dir), *FAST, *bad])
        assert r.exit_code == 2 and "--decode-attention" in r.output, r.output
