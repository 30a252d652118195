"""The recipe executor on the real quantize, distill and eval cores, on the test-sized trained model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.recipes.gates import GENERATION_METRICS, METRICS

RECIPE = """\
name: real
outputs: {out}
vars: {{model: "{model}"}}
defaults: {{device: cpu, seed: 0}}
steps:
  rtn4:
    kind: quantize
    model: ${{vars.model}}
    method: rtn
    bits: 4
    group_size: 64
    samples: 4
    seq_len: 64
    evaluate: false
  student:
    kind: distill
    teacher: ${{vars.model}}
    student_layers: 1
    steps: 2
    batch_size: 2
    seq_len: 32
    eval_samples: 2
  compare:
    kind: eval
    baseline: float
    model: {{float: "${{vars.model}}", rtn4: "${{steps.rtn4.out}}", student: "${{steps.student.out}}"}}
    num_requests: 3
    prompt_len: "8:16"
    output_len: "4:8"
    repeats: 1
    seq_len: 64
    quality_tokens: 512
    threads: 1
    prompts: builtin
    gen_tokens: 4
  spec:
    kind: eval
    model: {{spec: "${{vars.model}}"}}
    draft: ${{steps.student.out}}
    num_requests: 2
    prompt_len: "8:16"
    output_len: "8:12"
    repeats: 1
    perf_only: true
    threads: 1
gates:
  - rtn4.kld_mean > 0
  - rtn4.weight_bytes < float.weight_bytes * 0.6
  - student.perplexity > float.perplexity
  - spec.acceptance_rate >= 0
"""


def test_recipe_on_real_steps_measures_gates_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "real.yaml"
    recipe.write_text(RECIPE.format(out=out, model=tiny_model_dir))
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"float", "rtn4", "student", "spec"}
    assert rows["float"]["baseline"] and rows["float"]["metrics"]["kld_mean"] < 1e-9
    assert rows["rtn4"]["raw"]["method"] == "rtn"
    # Every metric gates can name is measured by the real eval (quality ones where quality ran).
    quality = {"perplexity", "kld_mean", "kld_p99", "top1_agreement", *GENERATION_METRICS}
    # only with --price-per-hour; only with a lossy kv_dtype (tests/evaluate/test_kv_quality.py gates on those)
    optional = {"cost_per_1k_output_tokens", "kv_kld_mean", "kv_kld_p99", "kv_top1", "kv_perplexity"}
    optional |= {m for m in METRICS if m.startswith("gpu_")}  # NVML utilisation: CUDA only
    for name in ("rtn4", "spec"):
        measured = {k for k, v in rows[name]["metrics"].items() if v is not None}
        expected = set(METRICS) - optional - ({"acceptance_rate", "tokens_per_step"} if name == "rtn4" else quality)
        assert expected <= measured, expected - measured
    assert 0 <= rows["spec"]["metrics"]["acceptance_rate"] <= 1
    assert report["passed"] and len(report["gates"]) == 4
    student = json.loads((out / "student" / "step.json").read_text())["result"]
    assert student["metrics"]["student_ppl"] > 0 and (out / "student" / "model" / "llmopt.json").exists()
    assert (out / "rtn4" / "model" / "config.json").exists() and (out / "compare" / "eval.json").exists()
    assert (out / "compare" / "eval.flips.jsonl").exists()  # the prompt-set flips land beside the step's report

    again = CliRunner().invoke(app, ["run", str(recipe)])
    assert again.exit_code == 0, again.output
    rerun = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in rerun["steps"]] == ["skipped"] * 4
    assert rerun["table"] == report["table"]
