"""`llmopt quantize --backend gptqmodel` end to end (skipped where GPTQModel is not installed): the library's
checkpoint lands in llmopt's layout with an llmopt.json that names backend, library and patches, and
llmopt's runtime reads it."""

import json

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

pytest.importorskip("gptqmodel")
runner = CliRunner()


def test_gptqmodel_gptq_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--backend", "gptqmodel", "--method", "gptq",
                            "--group-size", "32", "--samples", "4", "--seq-len", "32", "--eval-samples", "2",
                            "--eval-seq-len", "32", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "llmopt.json").read_text())
    assert meta["backend"] == "gptqmodel" and meta["library"].startswith("gptqmodel ")
    assert meta["patched"] is False and meta["patches"] == [] and meta["format"] == "gptq"
    assert meta["quantized_modules"] == 14 and meta["timings"]["quantize"] > 0
    assert meta["calibration"]["samples"] == 4 and len(meta["calibration"]["sha256"]) == 64
    q = meta["metrics"]["quantized"]
    assert meta["evaluated_with"] == "runtime" and 0 < q["kld_mean"] < 0.05 and q["top1_agreement"] > 0.9
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["group_size"] == 32 and cfg["bits"] == 4
    assert not (out / "logs").exists() and not (out / "quant_log.csv").exists()
