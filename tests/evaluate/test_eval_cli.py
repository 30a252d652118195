"""`llmopt eval` end to end on the tiny fixture models, and its one-line errors (exit 2)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

FAST = ["--num-requests", "4", "--prompt-len", "8:24", "--output-len", "4:8", "--seq-len", "64",
        "--quality-tokens", "512", "--kv-budget", "4MiB", "--threads", "1"]
DISTS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def run(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def check_schema(entry):
    assert set(entry) >= {"model", "quality", "perf", "memory"}
    assert set(entry["quality"]) >= {"perplexity", "kld_mean", "kld_p99", "top1_agreement", "tasks"}
    assert set(entry["perf"]) >= {"output_tokens_per_s", "total_tokens_per_s", "requests_per_s", *DISTS}
    assert set(entry["memory"]) >= {"weight_bytes", "kv_bytes_allocated", "kv_bytes_formula", "kv_waste_bytes"}
    for d in DISTS:
        assert entry["perf"][d] is None or set(entry["perf"][d]) == {"mean", "p50", "p95", "p99"}


def test_two_models_with_baseline_tasks_and_all_outputs(tiny_model_dir, tiny_qwen2_dir, tmp_path):
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    r = run(tiny_qwen2_dir, "--baseline", tiny_model_dir, *FAST, "--repeats", "2", "--tasks", "llmopt_cloze",
            "--task-limit", "4", "--price-per-hour", "2", "--json", j, "--csv", c, "--plot", p)
    assert r.exit_code == 0, r.output
    d = json.loads(j.read_text())
    assert [e["model"] for e in d["results"]] == [str(tiny_model_dir), str(tiny_qwen2_dir)]  # baseline first
    for e in d["results"]:
        check_schema(e)
        assert e["quality"]["perplexity"] > 1
        assert "acc" in e["quality"]["tasks"]["llmopt_cloze"]
        assert e["perf"]["repeats"] == 2 and e["perf"]["output_tokens_per_s"] > 0
        assert e["perf"]["cost_per_1k_output_tokens"] > 0
        lo, hi = e["perf"]["spread"]["output_tokens_per_s"]
        assert lo <= e["perf"]["output_tokens_per_s"] <= hi
        m = e["memory"]
        assert m["kv_bytes_allocated"] == m["kv_bytes_formula"] + m["kv_waste_bytes"] and m["kv_waste_bytes"] >= 0
    base, other = d["results"]
    assert base["quality"]["kld_mean"] == 0.0 and base["quality"]["top1_agreement"] == 1.0
    assert other["quality"]["kld_mean"] > 0.01 and other["quality"]["top1_agreement"] < 1.0  # a random model
    assert c.read_text().count("\n") == 3 and p.read_bytes()[:4] == b"\x89PNG"
    assert "TTFT" in r.output


def test_hf_engine_perf_only_and_speculative(tiny_model_dir, tmp_path):
    j = tmp_path / "hf.json"
    r = run(tiny_model_dir, *FAST, "--repeats", "1", "--engine", "hf", "--perf-only", "--json", j)
    assert r.exit_code == 0, r.output
    e = json.loads(j.read_text())["results"][0]
    check_schema(e)
    assert e["quality"]["perplexity"] is None and e["memory"]["kv_bytes_allocated"] is None
    assert e["perf"]["engine"] == "hf" and e["perf"]["tpot_ms"]["p50"] > 0
    j2 = tmp_path / "spec.json"
    r = run(tiny_model_dir, *FAST, "--repeats", "1", "--perf-only", "--draft", tiny_model_dir, "--spec-tokens", "3",
            "--json", j2)
    assert r.exit_code == 0, r.output
    spec = json.loads(j2.read_text())["results"][0]["speculative"]
    assert spec["acceptance_rate"] == 1.0  # the model drafting for itself
    assert "acceptance" in r.output


@pytest.fixture(scope="module")
def other_tokenizer_dir(tiny_llama_random_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "other-tok"
    shutil.copytree(tiny_llama_random_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(["<llmopt-extra-token>"])
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["tokenizer", "empty", "context", "kv_tiny", "kv_none", "vllm", "plot_half"])
def test_bad_input_is_one_line_exit_2(case, tiny_model_dir, other_tokenizer_dir, tmp_path):
    args = {
        "tokenizer": [other_tokenizer_dir, "--baseline", tiny_model_dir, "--quality-only"],
        "empty": [tiny_model_dir, "--num-requests", "0"],
        "context": [tiny_model_dir, "--perf-only", "--prompt-len", "1000:1000", "--output-len", "100"],
        "kv_tiny": [tiny_model_dir, "--perf-only", "--kv-budget", "40000", "--prompt-len", "40", "--output-len", "8",
                    "--num-requests", "1"],
        "kv_none": [tiny_model_dir, "--perf-only", "--kv-budget", "1000", "--num-requests", "1"],
        "vllm": [tiny_model_dir, "--perf-only", "--engine", "vllm"],
        "plot_half": [tiny_model_dir, "--perf-only", "--plot", tmp_path / "x.png"],
    }[case]
    expect = {"tokenizer": "tokenizer", "empty": "empty workload", "context": "maximum context",
              "kv_tiny": "KV budget too small for one request", "kv_none": "holds no KV block",
              "vllm": "vllm", "plot_half": "--plot"}[case]
    r = run(*args, "--repeats", "1", "--no-warmup")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1 and expect in r.output.replace("\n", " ")
    assert not (tmp_path / "x.png").exists()
