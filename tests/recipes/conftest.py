"""Fixtures for recipe tests: fake step kinds registered for the test, a demo recipe writer."""

from __future__ import annotations

from pathlib import Path

import pytest


from tests.helpers.recipe_fakes import register_fakes, unregister_fakes

DEMO = """\
name: demo
outputs: {out}
vars:
  base: base-model
defaults:
  group_size: 128
steps:
  q4:
    kind: fake_quantize
    model: ${{vars.base}}
    bits: 4
  student:
    kind: fake_distill
    teacher: ${{vars.base}}
    save_every: 2
  student_q4:
    kind: fake_quantize
    model: ${{steps.student.out}}
  compare:
    kind: fake_eval
    baseline: float
    tasks: [cloze]
    models:
      float: ${{vars.base}}
      q4: ${{steps.q4.out}}
      student: ${{steps.student.out}}
      student_q4: ${{steps.student_q4.out}}
  spec:
    kind: fake_eval
    models: {{spec: "${{vars.base}}"}}
    draft: ${{steps.student.out}}
gates:
  - q4.kld_mean < 0.05
  - q4.perplexity <= float * 1.05
  - student_q4.output_tokens_per_s >= float.output_tokens_per_s * 1.5
  - spec.acceptance_rate > 0.5
  - student.tasks.cloze >= 0.3
"""


@pytest.fixture
def fakes():
    register_fakes()
    yield
    unregister_fakes()


@pytest.fixture
def demo(tmp_path, fakes) -> Path:
    """The demo recipe file; its outputs go to tmp_path/out."""
    path = tmp_path / "demo.yaml"
    path.write_text(DEMO.format(out=tmp_path / "out"))
    return path
