"""Bad recipes: a one-line error naming file, line and key, exit code 2, and nothing run or written."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

GOOD_STEPS = """\
steps:
  q4:
    kind: fake_quantize
    model: base
  compare:
    kind: fake_eval
    baseline: float
    models: {float: base, q4: "${steps.q4.out}"}
"""

CASES = {
    # name: (recipe text, line, text the message must contain)
    "unknown top-level key": ("outputs: OUT\nstepz: {}\n" + GOOD_STEPS, 2, "stepz: unknown key"),
    "unknown step option": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: base\n    bitz: 4\n",
                            6, "steps.q4.bitz: unknown option for a fake_quantize step"),
    "unknown step kind": ("outputs: OUT\nsteps:\n  q4:\n    kind: quantise\n    model: base\n",
                          4, "unknown step kind 'quantise'"),
    "missing kind": ("outputs: OUT\nsteps:\n  q4:\n    model: base\n", 3, "steps.q4: missing `kind:`"),
    "kind not a name": ("outputs: OUT\nsteps:\n  q4:\n    kind: [quantize]\n    model: base\n", 4, "unknown step kind ['quantize']"),
    "missing step reference": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: ${steps.gptq.out}\n",
                               5, "no step named 'gptq'"),
    "cycle": ("outputs: OUT\nsteps:\n  a:\n    kind: fake_quantize\n    model: ${steps.b.out}\n"
              "  b:\n    kind: fake_quantize\n    model: ${steps.a.out}\n", 3, "cycle: a → b → a"),
    "self reference": ("outputs: OUT\nsteps:\n  a:\n    kind: fake_quantize\n    model: ${steps.a.out}\n",
                       5, "cycle a → a"),
    "reference to an eval step": ("outputs: OUT\n" + GOOD_STEPS + "  q8:\n    kind: fake_quantize\n"
                                  "    model: ${steps.compare.out}\n", 12, "writes no model"),
    "unknown variable": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: ${vars.base}\n",
                         5, "no variable 'base'"),
    "unknown reference form": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: ${env.HOME}\n",
                               5, "unknown reference ${env.HOME}"),
    "gate on unknown metric": ("outputs: OUT\n" + GOOD_STEPS + "gates:\n  - q4.kld_man < 0.02\n",
                               11, "unknown metric 'kld_man'"),
    "gate on unknown model": ("outputs: OUT\n" + GOOD_STEPS + "gates:\n  - gptq4.kld_mean < 0.02\n",
                              11, "'gptq4' is not an evaluated model"),
    "gate without a model": ("outputs: OUT\n" + GOOD_STEPS + "gates:\n  - kld_mean < q4.kld_mean\n",
                             11, "to check a metric write NAME.kld_mean"),
    "gate syntax": ("outputs: OUT\n" + GOOD_STEPS + "gates:\n  - q4.kld_mean < __import__('os')\n",
                    11, "cannot read"),
    "gate on a task not evaluated": ("outputs: OUT\n" + GOOD_STEPS + "gates:\n  - q4.tasks.mmlu > 0.5\n",
                                     11, "task 'mmlu' is not evaluated"),
    "invalid YAML": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n   model: [base\n", 5, "invalid YAML"),
    "duplicate key": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: a\n    model: b\n",
                      6, "steps.q4.model: duplicate key"),
    "wrong type": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: base\n    bits: four\n",
                   6, "steps.q4.bits: expected an integer, got 'four'"),
    "option the runner sets": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: base\n"
                               "    out: /tmp/x\n", 6, "'out' is set by the runner"),
    "Args validation": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    model: base\n    bits: 3\n",
                        3, "steps.q4: --bits 3 is not supported"),
    "missing required option": ("outputs: OUT\nsteps:\n  q4:\n    kind: fake_quantize\n    bits: 4\n",
                                3, "missing option(s) for a fake_quantize step: model"),
    "unknown default": ("outputs: OUT\ndefaults:\n  bogus: 1\n" + GOOD_STEPS, 3, "defaults.bogus: unknown option"),
    "bad step name": ("outputs: OUT\nsteps:\n  gptq-4:\n    kind: fake_quantize\n    model: base\n",
                      3, "step name 'gptq-4' must be letters"),
    "duplicate model name across evals": ("outputs: OUT\n" + GOOD_STEPS + "  again:\n    kind: fake_eval\n"
                                          "    models: {q4: base}\n", 10, "model name 'q4' is also used"),
    "empty recipe": ("", 1, "the recipe is empty"),
    "no steps": ("outputs: OUT\n", 1, "a recipe needs a `steps:` mapping"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_one_line_error_exit_2_nothing_run(case, tmp_path, fakes, monkeypatch):
    text, line, expected = CASES[case]
    out = tmp_path / "out"
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("OUT", str(out)))
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_CALL_LOG", str(calls))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert re.search(rf"{re.escape(str(path))}:{line}: ", message), message
    assert expected in message, message
    assert not out.exists() and not calls.exists()


def test_bad_set_value_names_the_set(demo, tmp_path):
    result = CliRunner().invoke(app, ["run", str(demo), "--set", "steps.q4.bits=3", "--dry-run"])
    assert result.exit_code == 2
    assert "steps.q4: --bits 3 is not supported" in result.output


def test_set_of_wrong_type_is_located_at_the_set(demo):
    result = CliRunner().invoke(app, ["run", str(demo), "--set", "steps.q4.bits=four"])
    assert result.exit_code == 2
    assert "--set steps.q4.bits=four: steps.q4.bits: expected an integer" in result.output


@pytest.mark.parametrize("assignment, expected", [
    ("steps.gptq.bits=4", "steps.gptq does not exist"),
    ("steps", "expected KEY=VALUE"),
    ("gates.7=q4.kld_mean < 1", "use an index 0..4"),
    ("name.x=1", "name is a value, not a mapping"),
])
def test_bad_set(demo, assignment, expected):
    result = CliRunner().invoke(app, ["run", str(demo), "--set", assignment])
    assert result.exit_code == 2
    assert expected in result.output


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
