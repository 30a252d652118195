"""The recipes in recipes/: each validates with --dry-run against the real step kinds (no network, nothing run),
and the quickstart covers everything the README promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.models.builtin import get_recipe
from llmopt.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_promised_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "ci"} <= names
    hub = [p for p in RECIPES if "/" in str(load_recipe(p).steps[0].config.get("model")
                                             or load_recipe(p).steps[0].config.get("teacher"))]
    assert len(hub) >= 2, "at least two real-model recipes naming hub models"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_dry_run_validates_and_runs_nothing(path, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--outputs", str(out)])
    assert result.exit_code == 0, result.output
    for step in load_recipe(path).steps:
        assert step.name in result.output
    assert not out.exists()


def test_quickstart_covers_every_method_the_student_and_the_speculative_pair():
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    steps = {s.name: s for s in recipe.steps}
    quant = {s.name: s.args for s in recipe.steps if s.kind.name == "quantize"}
    methods = {(a.method, a.bits) for a in quant.values()}
    assert {("int8", 8), ("w8a8", 8), ("gptq", 4), ("awq", 4)} <= methods
    distill = [s for s in recipe.steps if s.kind.name == "distill"]
    assert len(distill) == 1 and distill[0].args.teacher == "builtin:tiny"
    assert distill[0].args.student_layers * 2 == get_recipe("tiny").num_layers
    student = distill[0]
    assert any(s.deps == [student.name] and s.args.bits == 4 for s in recipe.steps if s.kind.name == "quantize")
    evals = [s for s in recipe.steps if s.kind.name == "eval"]
    compare = next(s for s in evals if s.args.baseline == "builtin:tiny")
    assert set(compare.deps) == set(quant) | {student.name}  # every compressed model against the float one
    assert "builtin:tiny" in compare.args.model
    assert compare.args.prompts == "builtin"  # answer accuracy and agreement with float for every compressed model
    spec = next(s for s in evals if s.args.draft is not None)
    assert spec.args.model == ["builtin:tiny"] and spec.args.draft == str(steps[student.name].out)
    assert recipe.gates


def test_ci_recipe_has_strict_quality_gates():
    recipe = load_recipe(ROOT / "recipes" / "ci.yaml")
    texts = [pg.gate.text for pg in recipe.gates]
    assert "gptq4.kld_mean <= rtn4.kld_mean * 0.5" in texts
    assert any(t.startswith("int8.perplexity <=") for t in texts)


def test_the_documented_example_recipe_is_valid(tmp_path):
    import textwrap

    from llmopt.recipes import plan

    doc = plan.__doc__
    example = textwrap.dedent(doc[doc.index("A recipe (YAML):") + len("A recipe (YAML):"):doc.index("A step's options")])
    path = tmp_path / "example.yaml"
    path.write_text(example)
    recipe = load_recipe(path)
    assert [s.name for s in recipe.steps] == ["gptq4", "compare"]
    assert recipe.step("compare").model_names == {"builtin:tiny": "float", str(recipe.step("gptq4").out): "gptq4"}
    assert recipe.gates[0].gate.text == "gptq4.kld_mean < 0.02"
