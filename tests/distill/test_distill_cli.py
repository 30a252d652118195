"""`llmopt distill` through the CLI: end to end on the test model, and bad input → one line, exit 2, no output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

runner = CliRunner()


def _base(teacher, out, data):
    return ["distill", "--teacher", str(teacher), "--out", str(out), "--data", str(data), "--steps", "4",
            "--seq-len", "32", "--batch-size", "4", "--eval-samples", "2", "--device", "cpu"]


def test_cli_end_to_end(tiny_model_dir, distill_text, tmp_path):
    from llmopt.models import ModelSpec, load_model

    out = tmp_path / "student"
    res = runner.invoke(app, _base(tiny_model_dir, out, distill_text)
                        + ["--student-layers", "1", "--loss", "jsd", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["metrics"]["student_ppl"] > 1 and payload["steps"] == 4
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "llmopt.json",
                                               "loss_curve.csv", "loss_curve.png"}
    meta = json.loads((out / "llmopt.json").read_text())
    assert meta["distill"]["args"]["loss"] == "jsd" and meta["metrics"] == payload["metrics"]
    loaded = load_model(ModelSpec(str(out), device="cpu"))  # a normal HF checkpoint with the teacher's tokenizer
    teacher = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    assert loaded.config.num_hidden_layers == 1
    assert loaded.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    # The table view renders too.
    res = runner.invoke(app, _base(tiny_model_dir, out, distill_text) + ["--student-layers", "1", "--overwrite"])
    assert res.exit_code == 0 and "student after KD" in res.stdout


def _bad_inputs(tiny_model_dir, tmp_path):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "wide_vocab.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 8}))
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "exists").mkdir()
    broken = tmp_path / "broken.ckpt" / "step-000002"
    broken.mkdir(parents=True)
    (broken / "state.json").write_text("{}")
    return {
        "vocab": (["--student-config", str(tmp_path / "wide_vocab.json")], "vocabulary"),
        "layers_too_many": (["--student-layers", "2"], "--student-layers"),
        "layers_zero": (["--student-layers", "0"], "--student-layers"),
        "empty_data": (["--student-layers", "1", "--data", str(tmp_path / "empty.txt")], "no non-empty text"),
        "corrupt_resume": (["--student-layers", "1", "--resume", str(tmp_path / "broken.ckpt")], "corrupt"),
    }


@pytest.mark.parametrize("case", ["vocab", "layers_too_many", "layers_zero", "empty_data", "corrupt_resume",
                                  "out_exists"])
def test_bad_input_is_one_line_exit_2_no_output(tiny_model_dir, distill_text, tmp_path, case):
    if case == "out_exists":
        out = tmp_path / "exists"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        extra, match = ["--student-layers", "1"], "already exists"
    else:
        out = tmp_path / "out"
        extra, match = _bad_inputs(tiny_model_dir, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, _base(tiny_model_dir, out, distill_text) + extra)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and match in lines[-1], res.stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (no out, no temp dirs)
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
