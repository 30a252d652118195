"""`llmopt quantize` end to end on the tiny fixture model, and every bad input → one line, exit 2, nothing left."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmopt.cli.main import app

runner = CliRunner()
FAST = ["--samples", "16", "--seq-len", "64", "--eval-samples", "8", "--eval-seq-len", "64", "--device", "cpu"]


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


@pytest.mark.parametrize("method,extra", [("gptq", ["--group-size", "32", "--act-order", "--static-groups"]),
                                          ("gptq", ["--group-size", "32", "--calib-dtype", "model"]),
                                          ("w8a8", ["--smoothquant-alpha", "0.6"])])
def test_quantize_end_to_end(tiny_model_dir, tmp_path, method, extra):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", method, *extra, "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    assert "mean KLD" in r.output and "per-layer relative output error" in r.output
    meta = json.loads((out / "llmopt.json").read_text())
    assert meta["method"] == method and meta["args"]["samples"] == 16
    assert len(meta["calibration"]["sha256"]) == 64 and meta["calibration"]["source"] == "builtin"
    assert len(meta["layers"]) == 2 and all(layer["error"] > 0 for layer in meta["layers"])
    q, f = meta["metrics"]["quantized"], meta["metrics"]["float"]
    assert q["kld_mean"] > 0 and q["tokens"] == 8 * 63 and f["perplexity"] > 1
    assert meta["metrics"]["size_bytes"] < meta["metrics"]["float_size_bytes"]
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").exists() and not _leftovers(tmp_path, "q")


def test_json_output(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "64",
                            "--no-evaluate", "--json", "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["method"] == "rtn" and d["quant_args"]["group_size"] == 64 and d["evaluated_with"] is None
    # data-free: no calibration windows, no per-layer check, unless asked for
    assert d["calibration"]["source"] is None and all(layer["error"] is None for layer in d["layers"])
    assert {"load", "quantize", "write", "total"} <= set(d["timings"]) and "data" in d["timings"]
    assert d["memory"]["load"] == "memory" and d["memory"]["peak_rss_bytes"] > 0
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "64", "--layer-check",
                            "--no-evaluate", "--json", "--out", str(tmp_path / "q2"), *FAST])
    assert r.exit_code == 0, r.output
    checked = json.loads(r.stdout)
    assert all(layer["vs_rtn"] == 1.0 for layer in checked["layers"]) and checked["calibration"]["samples"] == 16


@pytest.fixture()
def nan_model(tiny_model_dir, tmp_path):
    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, bad)
    st = load_file(bad / "model.safetensors")
    key = next(k for k in st if k.endswith("mlp.up_proj.weight"))
    st[key][0, 0] = float("nan")
    save_file(st, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize("case,args,message", [
    ("group", ["--group-size", "48"], "does not divide"),
    ("bits", ["--method", "int8", "--bits", "4"], "does not support --bits 4"),
    ("awq-bits", ["--method", "awq", "--bits", "8"], "does not support --bits 8"),
    ("short", ["--samples", "100000"], "fewer than"),
    ("method", ["--method", "nf4"], "unknown --method"),
    ("calib-dtype", ["--calib-dtype", "float16"], "--calib-dtype must be auto, model or bfloat16"),
    ("scale-search", ["--method", "awq", "--scale-search"], "--scale-search is an option of llmopt's own GPTQ and RTN"),
])
def test_bad_input_exits_2_and_leaves_nothing(tiny_model_dir, tmp_path, case, args, message):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), *FAST, *args])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]  # one line (other stderr lines are loaders' progress bars)
    assert not out.exists() and not _leftovers(tmp_path, "q")


def test_nan_weights_refused(nan_model, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(nan_model), "--out", str(out), *FAST])
    assert r.exit_code == 2 and "NaN or Inf" in r.output and not out.exists()


def test_nan_activations_refused(tiny_model_dir, tmp_path):
    from llmopt.quant.walk import _check_finite
    from llmopt.errors import LlmoptError

    with pytest.raises(LlmoptError, match="NaN or Inf in the activations"):
        _check_finite(torch.tensor([1.0, float("inf")]), "decoder layer 0")


def test_existing_and_unwritable_out(tiny_model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), *FAST])
    assert r.exit_code == 2 and "--overwrite" in r.output and (out / "keep.txt").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(blocker / "q"), *FAST])
    assert r.exit_code == 2 and "cannot write" in r.output, r.output


def test_unknown_backend(tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--backend", "nope", *FAST])
    assert r.exit_code == 2 and "backend" in r.output


def test_calib_dtype_resolution():
    """auto = bf16 autocast only for an fp32 model where bf16 matmuls are fast; model = never; a bf16 model
    needs no autocast."""
    import torch

    from llmopt.quant.api import _calib_dtype
    from llmopt.utils import fast_bf16

    cpu = torch.device("cpu")
    assert _calib_dtype("auto", torch.float32, cpu) == (torch.bfloat16 if fast_bf16(cpu) else None)
    assert _calib_dtype("model", torch.float32, cpu) is None
    assert _calib_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    assert _calib_dtype("bfloat16", torch.bfloat16, cpu) is None

