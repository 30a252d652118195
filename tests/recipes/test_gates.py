"""Gate parsing and evaluation: arithmetic checked against a direct computation, metric names, missing values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.errors import LlmoptError
from llmopt.evaluate.utilization import FIELDS as UTILIZATION_FIELDS
from llmopt.recipes.gates import (GENERATION_METRICS, METRICS, BinOp, Num, Ref, check_metric, evaluate_gate, flatten_result,
                                  parse_gate)

M = {"gptq4": {"kld_mean": 0.01, "perplexity": 10.3, "tpot_p95_ms": 5.0, "tasks.cloze": 0.4},
     "float": {"kld_mean": 0.0, "perplexity": 10.0, "tpot_p95_ms": 8.0, "tasks.cloze": 0.5},
     "spec": {"output_tokens_per_s": 150.0, "kld_mean": None}}


@pytest.mark.parametrize("text, passed, left, right", [
    ("gptq4.kld_mean < 0.02", True, 0.01, 0.02),
    ("gptq4.kld_mean<0.005", False, 0.01, 0.005),
    ("gptq4.perplexity <= float.perplexity * 1.05", True, 10.3, 10.5),
    ("gptq4.perplexity <= float * 1.02", False, 10.3, 10.2),  # bare name: same metric
    ("gptq4.tpot_p95_ms <= float * 1.10", True, 5.0, 8.8),
    ("float * 1.10 >= gptq4.tpot_p95_ms", True, 8.8, 5.0),  # bare name on the left takes the right's metric
    ("gptq4.tasks.cloze >= 0.9 * float.tasks.cloze", False, 0.4, 0.45),
    ("gptq4.perplexity - float.perplexity < 0.5", True, pytest.approx(0.3), 0.5),
    ("(gptq4.perplexity - float.perplexity) / float.perplexity <= 5e-2", True, pytest.approx(0.03), 0.05),
    ("-gptq4.kld_mean > -1", True, -0.01, -1.0),
    ("gptq4.kld_mean == 0.01", True, 0.01, 0.01),
    ("gptq4.kld_mean != 0.01", False, 0.01, 0.01),
    ("1 + 2 * 3 == gptq4.kld_mean * 700", True, 7.0, 7.0),  # precedence: * before +
    ("8 / 4 / 2 == gptq4.kld_mean * 100", True, 1.0, 1.0),  # left-associative
])
def test_gate_values_and_verdicts(text, passed, left, right):
    result = evaluate_gate(parse_gate(text), M)
    assert (result.passed, result.left, result.right) == (passed, left, right)
    assert result.note == ""


def test_unmeasured_value_fails_with_a_note():
    r = evaluate_gate(parse_gate("spec.kld_mean < 1"), M)
    assert not r.passed and r.note == "not measured: spec.kld_mean"
    r = evaluate_gate(parse_gate("gptq4.perplexity < nothere * 2"), M)
    assert not r.passed and "nothere.perplexity" in r.note


def test_division_by_zero_fails_not_crashes():
    r = evaluate_gate(parse_gate("gptq4.kld_mean / float.kld_mean < 2"), M)
    assert not r.passed and "division by zero" in r.note


@pytest.mark.parametrize("text, message", [
    ("gptq4.kld_mean", "expected a comparison"),
    ("gptq4.kld_mean < ", "expected a number or NAME.METRIC"),
    ("gptq4.kld_mean < 0.02 0.03", "unexpected '0.03'"),
    ("(gptq4.kld_mean < 0.02", "missing ')'"),
    ("gptq4.kld_mean < __import__('os').system('x')", "cannot read"),
    ("gptq4.kld_mean ** 2 < 1", "expected a number or NAME.METRIC"),
    ("1 < 2", "name a metric on at least one side"),
    ("gptq4.kld_mean = 0.01", "cannot read"),
])
def test_syntax_errors(text, message):
    with pytest.raises(LlmoptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_gate(text)


def test_metric_names_follow_the_eval_report_schema():
    assert check_metric("tpot_p95_ms", None) is None
    assert check_metric("output_tokens_per_s", None) is None
    assert check_metric("tasks.anything", None) is None
    assert check_metric("tasks.cloze", {"cloze"}) is None
    assert "not evaluated" in check_metric("tasks.mmlu", {"cloze"})
    assert "unknown metric" in check_metric("tpot_p95", None)
    generation = {m: 0.5 for m in GENERATION_METRICS} | {"detector": "phrases:builtin", "prompts": 48}
    entry = {"model": "m", "quality": {"perplexity": 10.0, "kld_mean": None, "kld_p99": 0.1, "top1_agreement": 0.9,
                                       "tasks": {"cloze": {"acc": 0.5, "acc_stderr": 0.01}, "x": 0.25},
                                       "generation": generation, "kv_dtype": "int8", "kv_kld_mean": 1e-4,
                                       "kv_kld_p99": 1e-3, "kv_top1": 0.99, "kv_perplexity": 10.1},
             "perf": {"output_tokens_per_s": 100.0, "total_tokens_per_s": 300.0, "requests_per_s": 2.0,
                      "engine": "llmopt", "cost_per_1k_output_tokens": None, "duration_s": 1.5, "spread": {"x": [1, 2]},
                      **{f"{m}_ms": {"mean": 1.0, "p50": 2.0, "p95": 3.0, "p99": 4.0} for m in ("ttft", "tpot", "itl", "e2el")},
                      "utilization": {"device": "cuda:0", "samples": 9, "interval_s": 0.1, "threads": 1,
                                      **{f: {"mean": 1.0, "p50": 2.0, "p95": 3.0} for f in UTILIZATION_FIELDS}}},
             "memory": {"weight_bytes": 10, "kv_bytes_allocated": 5, "kv_bytes_formula": 4, "kv_waste_bytes": 1,
                        "kv_pool_bytes": 64, "kv_peak_tokens": 3, "kv_preemptions": 0, "kv_block_size": 16},
             "speculative": {"acceptance_rate": 0.7, "tokens_per_step": 2.5, "draft": "d", "spec_tokens": 4}}
    flat = flatten_result(entry)
    assert flat["tpot_p95_ms"] == 3.0 and flat["e2el_mean_ms"] == 1.0 and flat["tasks.cloze"] == 0.5
    assert flat["tasks.x"] == 0.25 and flat["kld_mean"] is None and flat["acceptance_rate"] == 0.7
    assert "engine" not in flat and "kv_block_size" not in flat and "spec_tokens" not in flat  # settings, not metrics
    assert flat["baseline_rouge_l"] == 0.5 and "detector" not in flat and "prompts" not in flat
    assert flat["gpu_util_percent_p95"] == 3.0 and "samples" not in flat and "interval_s" not in flat
    # Every metric the schema documents is produced by flattening a full report entry, and nothing else.
    assert {k for k in flat if not k.startswith("tasks.")} == set(METRICS)


# Property: parsing the text of a random arithmetic tree gives the value computed from the tree itself.
leaves = st.one_of(st.integers(0, 50).map(lambda v: Num(float(v))),
                   st.sampled_from([Ref("gptq4", "perplexity"), Ref("float", "tpot_p95_ms")]))
trees = st.recursive(leaves, lambda sub: st.builds(BinOp, st.sampled_from("+-*/"), sub, sub), max_leaves=8)


def _render(node) -> str:
    if isinstance(node, Num):
        return repr(node.value)
    if isinstance(node, Ref):
        return f"{node.name}.{node.metric}"
    return f"({_render(node.left)} {node.op} {_render(node.right)})"


def _direct(node) -> float | None:
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Ref):
        return M[node.name][node.metric]
    a, b = _direct(node.left), _direct(node.right)
    if a is None or b is None or (node.op == "/" and b == 0):
        return None
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[node.op]


@settings(max_examples=200, deadline=None)
@given(trees, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
def test_parsed_arithmetic_matches_direct_computation(tree, op):
    text = f"gptq4.kld_mean {op} {_render(tree)}"
    result = evaluate_gate(parse_gate(text), M)
    expected = _direct(tree)
    if expected is None:
        assert not result.passed and result.note
    else:
        assert result.right == pytest.approx(expected, rel=1e-12, abs=1e-12)
        compare = {"<": 0.01 < expected, "<=": 0.01 <= expected, ">": 0.01 > expected,
                   ">=": 0.01 >= expected, "==": 0.01 == expected, "!=": 0.01 != expected}[op]
        assert result.passed == compare


def test_gates_on_prompt_set_metrics():
    metrics = flatten_result({"quality": {"generation": {"refusal_rate": 0.8, "refusal_drift_pp": -12.5,
                                                         "baseline_agreement": 0.58, "answer_accuracy": None}}})
    names = {"gptq4": metrics, "float": {"refusal_rate": 0.9}}
    assert evaluate_gate(parse_gate("gptq4.refusal_drift_pp >= -5"), names).passed is False
    assert evaluate_gate(parse_gate("gptq4.refusal_rate >= float - 0.15"), names).passed
    assert evaluate_gate(parse_gate("gptq4.baseline_agreement > 0.5"), names).passed
    r = evaluate_gate(parse_gate("gptq4.answer_accuracy >= 0.1"), names)  # no answerable prompts: not measured
    assert not r.passed and r.note == "not measured: gptq4.answer_accuracy"
    for metric in ("refusal_rate", "over_refusal_rate", "answer_accuracy_drift_pp", "baseline_token_f1"):
        assert check_metric(metric, None) is None
