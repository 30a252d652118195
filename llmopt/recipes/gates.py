"""Gates: pass/fail checks on a recipe's eval results (a failed gate makes `llmopt run` exit 1).

A gate is one comparison, written as a string in the recipe's `gates:` list:

    gates:
      - gptq4.kld_mean < 0.02                          # NAME.METRIC against a number
      - gptq4.perplexity <= float.perplexity * 1.05    # against another model's metric
      - gptq4.tpot_p95_ms <= float * 1.10              # bare NAME: the same metric (tpot_p95_ms) of `float`
      - spec.output_tokens_per_s >= float * 1.5
      - student.tasks.cloze >= 0.9 * float.tasks.cloze  # lm-eval / builtin task scores

NAME is the name of an evaluated model: its key in an eval step's `model:` mapping
(`model: {float: builtin:tiny, gptq4: "${steps.gptq4.out}"}`), or the step name for an entry written
`${steps.NAME.out}` in a `model:` list (an eval step's baseline, when not one of its models, is named
`baseline`). Names are unique across eval steps. METRIC is a flat name from the eval report (see `METRICS`): quality (`perplexity`,
`kld_mean`, `kld_p99`, `top1_agreement`, `tasks.TASK`; with `prompts:` the prompt-set figures of
`quality.generation`: `refusal_rate`, `over_refusal_rate`, `refusal_drift_pp`, `answer_accuracy`,
`baseline_agreement`, `baseline_token_f1`, `baseline_rouge_l`, ... — see `GENERATION_METRICS`; with a quantized
`kv_dtype:` the cost of that KV cache vs float KV: `kv_kld_mean`, `kv_kld_p99`, `kv_top1`, `kv_perplexity`),
speed (`output_tokens_per_s`, `total_tokens_per_s`,
`requests_per_s`, `cost_per_1k_output_tokens`, `duration_s`, `ttft|tpot|itl|e2el` + `_mean|_p50|_p95|_p99`
+ `_ms`; utilisation during the timed runs: `cpu_percent|cpu_percent_per_thread|gpu_util_percent|gpu_mem_used_bytes`
+ `_mean|_p50|_p95`), memory (`weight_bytes`, `kv_bytes_allocated`, `kv_bytes_formula`, `kv_waste_bytes`, `kv_pool_bytes`,
`kv_peak_tokens`, `kv_preemptions`) and speculative decoding (`acceptance_rate`, `tokens_per_step`).

Grammar (parsed here, never with eval()):  gate := expr OP expr,  OP := < <= > >= == !=,
expr := numbers, NAME.METRIC, bare NAME, + - * / and parentheses. A value that was not measured (null)
fails its gate with "not measured".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llmopt.errors import LlmoptError
from llmopt.evaluate.utilization import FLAT_METRICS as UTILIZATION_METRICS
from llmopt.evaluate.utilization import flat as flat_utilization

_STAT_METRICS = ("ttft", "tpot", "itl", "e2el")
_STATS = ("mean", "p50", "p95", "p99")
# quality.generation (eval --prompts): rates are fractions, drifts percentage points vs the baseline
GENERATION_METRICS: tuple[str, ...] = (
    "refusal_rate", "over_refusal_rate", "refusal_drift_pp", "over_refusal_drift_pp", "refusal_flips",
    "answer_accuracy", "answer_exact_match", "answer_accuracy_drift_pp", "answer_flips",
    "baseline_agreement", "baseline_token_f1", "baseline_rouge_l", "output_tokens_mean",
)
METRICS: tuple[str, ...] = (
    # quality
    "perplexity", "kld_mean", "kld_p99", "top1_agreement", *GENERATION_METRICS,
    # eval --kv-dtype int8|fp8_e4m3|...: that KV vs the model's float KV through llmopt's engine
    "kv_kld_mean", "kv_kld_p99", "kv_top1", "kv_perplexity",
    # perf (medians over repeats)
    "output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "cost_per_1k_output_tokens", "duration_s",
    *(f"{m}_{s}_ms" for m in _STAT_METRICS for s in _STATS),
    # perf.utilization during the timed runs (llmopt/evaluate/utilization.py): cpu_percent_p95, gpu_util_percent_mean, ...
    *UTILIZATION_METRICS,
    # memory
    "weight_bytes", "kv_bytes_allocated", "kv_bytes_formula", "kv_waste_bytes", "kv_pool_bytes", "kv_peak_tokens",
    "kv_preemptions",
    # speculative decoding
    "acceptance_rate", "tokens_per_step",
)
TASK_PREFIX = "tasks."
OPS = {"<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__,
       "==": float.__eq__, "!=": float.__ne__}

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"|(?P<ref>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
                    r"|(?P<op><=|>=|==|!=|<|>|[-+*/()]))")


@dataclass(frozen=True, slots=True)
class Num:
    value: float


@dataclass(frozen=True, slots=True)
class Ref:
    name: str  # model name
    metric: str | None  # None: a bare NAME, filled with the gate's first metric


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str
    left: object
    right: object


@dataclass(frozen=True, slots=True)
class Neg:
    operand: object


@dataclass(frozen=True, slots=True)
class Gate:
    text: str
    left: object
    op: str
    right: object

    def refs(self) -> list[Ref]:
        return _refs(self.left) + _refs(self.right)


def parse_gate(text: str) -> Gate:
    """Parse `LEFT OP RIGHT`; raise LlmoptError (no location: the caller adds it) on a syntax error."""
    tokens = _tokenize(text)
    parser = _Parser(tokens, text)
    left = parser.expr()
    op = parser.next()
    if op not in OPS:
        raise LlmoptError(f"gate {text!r}: expected a comparison (< <= > >= == !=) after the left side, "
                          f"got {op or 'the end'!r}")
    right = parser.expr()
    if parser.peek() is not None:
        raise LlmoptError(f"gate {text!r}: unexpected {parser.peek()!r} after the right side")
    metric = next((r.metric for r in _refs(left) + _refs(right) if r.metric), None)
    if metric is None:
        raise LlmoptError(f"gate {text!r}: name a metric on at least one side, e.g. gptq4.kld_mean < 0.02")
    return Gate(text, _fill(left, metric), op, _fill(right, metric))


def check_metric(metric: str, tasks: set[str] | None) -> str | None:
    """Why `metric` is not a metric of the eval report, or None when it is."""
    if metric.startswith(TASK_PREFIX):
        task = metric[len(TASK_PREFIX):]
        if tasks is not None and task not in tasks:
            return f"task {task!r} is not evaluated by that eval step (its tasks: {', '.join(sorted(tasks)) or 'none'})"
        return None
    if metric in METRICS:
        return None
    return f"unknown metric {metric!r}: use one of {', '.join(METRICS)} or tasks.TASK"


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str
    left: float | None
    op: str
    right: float | None
    passed: bool
    note: str  # why it failed when a value is missing, else ""

    def to_dict(self) -> dict:
        return {"gate": self.gate, "left": self.left, "op": self.op, "right": self.right,
                "passed": self.passed, "note": self.note}


def evaluate_gate(gate: Gate, metrics: dict[str, dict[str, float | None]]) -> GateResult:
    """Compute both sides from flat per-model metrics and compare them."""
    missing: list[str] = []
    left = _value(gate.left, metrics, missing)
    right = _value(gate.right, metrics, missing)
    if missing or left is None or right is None:
        note = "not measured: " + ", ".join(dict.fromkeys(missing)) if missing else "undefined (division by zero)"
        return GateResult(gate.text, left, gate.op, right, False, note)
    return GateResult(gate.text, left, gate.op, right, bool(OPS[gate.op](left, right)), "")


def flatten_result(result: dict) -> dict[str, float | None]:
    """One model's eval report entry ({"quality": ..., "perf": ..., "memory": ...}) → {METRIC: value}.

    Only the figures in METRICS (and task scores) are kept: settings echoed in the report are not metrics."""
    flat: dict[str, float | None] = {}
    for section in ("quality", "perf", "memory", "speculative"):
        for key, value in (result.get(section) or {}).items():
            if key == "tasks":
                for task, score in (value or {}).items():
                    flat[TASK_PREFIX + task] = _task_score(score)
            elif key == "generation":
                for metric in GENERATION_METRICS:
                    flat[metric] = _number((value or {}).get(metric))
            elif key == "utilization":  # {cpu_percent: {mean, p50, p95}, ...} → cpu_percent_mean, ...
                flat.update(flat_utilization(value))
            elif isinstance(value, dict) and key.endswith("_ms"):  # ttft_ms: {mean, p50, ...} → ttft_p50_ms
                for stat, v in value.items():
                    flat[f"{key[:-3]}_{stat}_ms"] = _number(v)
            else:
                flat[key] = _number(value)
    return {k: v for k, v in flat.items() if k in METRICS or k.startswith(TASK_PREFIX)}


def _task_score(score: object) -> float | None:
    """A task score is a number, or lm-eval's metric dict (first of acc, acc_norm, exact_match, ... wins)."""
    if isinstance(score, dict):
        for key in ("acc", "acc_norm", "exact_match", "score", "accuracy"):
            if key in score:
                return _number(score[key])
        numbers = [v for v in score.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return float(numbers[0]) if numbers else None
    return _number(score)


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _value(node: object, metrics: dict[str, dict[str, float | None]], missing: list[str]) -> float | None:
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Ref):
        v = metrics.get(node.name, {}).get(node.metric)
        if v is None:
            missing.append(f"{node.name}.{node.metric}")
        return v
    if isinstance(node, Neg):
        v = _value(node.operand, metrics, missing)
        return None if v is None else -v
    assert isinstance(node, BinOp)
    a, b = _value(node.left, metrics, missing), _value(node.right, metrics, missing)
    if a is None or b is None:
        return None
    if node.op == "/":
        return a / b if b != 0 else None
    return {"+": a + b, "-": a - b, "*": a * b}[node.op]


def _refs(node: object) -> list[Ref]:
    if isinstance(node, Ref):
        return [node]
    if isinstance(node, Neg):
        return _refs(node.operand)
    if isinstance(node, BinOp):
        return _refs(node.left) + _refs(node.right)
    return []


def _fill(node: object, metric: str) -> object:
    if isinstance(node, Ref) and node.metric is None:
        return Ref(node.name, metric)
    if isinstance(node, Neg):
        return Neg(_fill(node.operand, metric))
    if isinstance(node, BinOp):
        return BinOp(node.op, _fill(node.left, metric), _fill(node.right, metric))
    return node


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise LlmoptError(f"gate {text!r}: cannot read {text[pos:].strip()!r}: "
                              "use NAME.METRIC, numbers, + - * / ( ) and one of < <= > >= == !=")
        tokens.append(m.group(m.lastgroup))
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent: expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*."""

    def __init__(self, tokens: list[str], text: str) -> None:
        self.tokens, self.pos, self.text = tokens, 0, text

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def next(self) -> str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> object:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = BinOp(self.next(), node, self.term())
        return node

    def term(self) -> object:
        node = self.factor()
        while self.peek() in ("*", "/"):
            node = BinOp(self.next(), node, self.factor())
        return node

    def factor(self) -> object:
        tok = self.next()
        if tok == "-":
            return Neg(self.factor())
        if tok == "(":
            node = self.expr()
            if self.next() != ")":
                raise LlmoptError(f"gate {self.text!r}: missing ')'")
            return node
        if tok is not None and (tok[0].isdigit() or tok[0] == "."):
            return Num(float(tok))
        if tok is not None and (tok[0].isalpha() or tok[0] == "_"):
            name, _, metric = tok.partition(".")
            return Ref(name, metric or None)
        raise LlmoptError(f"gate {self.text!r}: expected a number or NAME.METRIC, got {tok or 'the end'!r}")
