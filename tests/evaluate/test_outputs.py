import csv
import json

from llmopt.evaluate.api import EvalResult, ModelReport
from llmopt.evaluate.outputs import GENERATION_METRICS, finite, pareto_front, sidecar, table, to_csv, write_reports


def _report(name, ppl, kld, tps):
    q = {"perplexity": ppl, "kld_mean": kld, "kld_p99": kld, "top1_agreement": 0.9, "tasks": None}
    dist = {"mean": 1.0, "p50": 1.0, "p95": 2.0, "p99": 3.0}
    p = {"engine": "llmopt", "output_tokens_per_s": tps, "total_tokens_per_s": tps * 3, "requests_per_s": 1.0,
         "ttft_ms": dist, "tpot_ms": dist, "itl_ms": dist, "e2el_ms": dist, "cost_per_1k_output_tokens": None}
    m = {"weight_bytes": 1000, "kv_bytes_allocated": 200, "kv_bytes_formula": 190, "kv_waste_bytes": 10}
    return ModelReport(name, "float", q, p, m)


def test_pareto_front():
    pts = [(10.0, 0.5), (20.0, 0.6), (15.0, 0.7), (5.0, 0.1), (20.0, 0.9)]
    assert pareto_front(pts) == [3, 0, 1]  # sorted by throughput


def test_outputs(tmp_path):
    """Each file carries the models' numbers: the JSON as given, one CSV row per model with the flattened names,
    the table's cells formatted (sizes in units, Δppl against the baseline "a")."""
    res = EvalResult([_report("a", 10.0, 0.0, 100.0), _report("b", 11.0, 0.02, 150.0)], {"seed": 0}, "a")
    write_reports(res, tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png")
    d = json.loads((tmp_path / "r.json").read_text())
    assert [r["model"] for r in d["results"]] == ["a", "b"] and d["baseline"] == "a"
    assert d["results"][1]["quality"]["perplexity"] == 11.0 and d["results"][1]["perf"]["ttft_ms"]["p99"] == 3.0
    rows = list(csv.DictReader((tmp_path / "r.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["a", "b"]
    assert {k: rows[1][k] for k in ("perplexity", "kld_mean", "output_tokens_per_s", "total_tokens_per_s",
                                    "ttft_p95_ms", "e2el_p99_ms", "kv_waste_bytes", "cost_per_1k_output_tokens")} == {
        "perplexity": "11.0", "kld_mean": "0.02", "output_tokens_per_s": "150.0", "total_tokens_per_s": "450.0",
        "ttft_p95_ms": "2.0", "e2el_p99_ms": "3.0", "kv_waste_bytes": "10", "cost_per_1k_output_tokens": ""}
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    t = table(d)
    cells = {c.header: list(c.cells) for c in t.columns}
    assert cells["model"] == ["a", "b"] and cells["Δppl"] == ["+0.00%", "+10.00%"]
    assert cells["size"] == ["1000 B", "1000 B"] and cells["KLD"] == ["0", "0.02"]
    assert cells["TTFT ms p50/p95/p99"] == ["1.0 / 2.0 / 3.0"] * 2 and cells["tok/s"] == ["100.0", "150.0"]
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_non_finite_numbers_become_null():
    assert finite({"a": float("inf"), "b": [1.0, float("nan")]}) == {"a": None, "b": [1.0, None]}


def test_prompt_set_columns_csv_and_sidecar_files(tmp_path):
    a, b = _report("a", 10.0, 0.0, 100.0), _report("b", 11.0, 0.02, 150.0)
    b.quality["generation"] = {m: 0.25 for m in GENERATION_METRICS} | {"refusal_drift_pp": -12.5}
    res = EvalResult([a, b], {}, "a", generations=[{"model": "b", "output": "x"}],
                     flips=[{"model": "b", "kind": "refusal"}])
    write_reports(res, tmp_path / "r.json", None, None)
    d = json.loads((tmp_path / "r.json").read_text())
    assert "generations" not in d and d["results"][1]["quality"]["generation"]["refusal_rate"] == 0.25
    assert sidecar(tmp_path / "r.json", "flips") == tmp_path / "r.flips.jsonl"
    assert [json.loads(x)["kind"] for x in (tmp_path / "r.flips.jsonl").read_text().splitlines()] == ["refusal"]
    assert (tmp_path / "r.generations.jsonl").read_text().count("\n") == 1
    header, row_a, row_b = to_csv(d).splitlines()
    assert set(GENERATION_METRICS) <= set(header.split(","))
    cols = header.split(",")
    assert row_b.split(",")[cols.index("refusal_drift_pp")] == "-12.5"
    assert row_a.split(",")[cols.index("refusal_rate")] == ""  # a model without a prompt set: empty cells
    t = table(d)
    assert "refusal / over" in [c.header for c in t.columns]
    assert "25.0% / 25.0% (-12.5 pp)" in list(t.columns[[c.header for c in t.columns].index("refusal / over")].cells)


def test_pareto_front_skips_nan_points():
    # a NaN quality (a failed measurement) must not claim a place on the front nor hide the points it "beats"
    assert pareto_front([(10.0, float("nan")), (5.0, 0.2), (8.0, 0.3)]) == [1, 2]


def test_recipe_report_plot_is_the_eval_plot(tmp_path):
    from llmopt.recipes.summary import plot

    table_rows = [{"name": "float", "output_tokens_per_s": 100.0, "kld_mean": 0.0, "perplexity": 10.0},
                  {"name": "int4", "output_tokens_per_s": 180.0, "kld_mean": 0.02, "perplexity": 10.4}]
    assert plot(table_rows, tmp_path / "p.png", "r")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot(table_rows[:1], tmp_path / "q.png")  # one point: nothing to compare
