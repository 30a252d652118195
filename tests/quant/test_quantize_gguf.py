"""`llmopt quantize --format gguf`: the compressed-tensors checkpoint plus model.gguf beside it, equal to what
`llmopt export` writes from that checkpoint; exact mappings give back the checkpoint's weights; requantized ones
warn; what the export would refuse is refused before calibration, with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")

from llmopt.checkpoint.formats import read_checkpoint
from llmopt.cli.main import app
from tests.helpers.gguf_files import fp16_scale_reference, gguf_name, gguf_weights, hub_rows

runner = CliRunner()
FAST = ["--samples", "8", "--seq-len", "64", "--device", "cpu", "--no-evaluate"]
N_LINEARS = 14  # 2 decoder layers × 7 Linears of the tiny fixture model; the head stays float


def _quantize(model_dir, out, *args):
    return runner.invoke(app, ["quantize", str(model_dir), "--out", str(out), "--format", "gguf", *FAST, *args])


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def rtn_g32(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "rtn-g32"
    r = _quantize(tiny_model_dir, out, "--method", "rtn", "--group-size", "32")
    assert r.exit_code == 0, r.output
    return out, r.output


def test_rtn_sym_g32_is_exact_q4_0_with_the_checkpoints_weights(rtn_g32):
    out, output = rtn_g32
    assert (out / "model.gguf").is_file() and list(out.glob("*.safetensors"))  # both kept
    types = _types(out / "model.gguf")
    _, qweights, _ = read_checkpoint(out)  # the safetensors beside it
    weights = gguf_weights(out / "model.gguf")
    assert len(qweights) == N_LINEARS
    for module, qw in qweights.items():
        name = gguf_name(module)
        assert types[name] == "Q4_0"
        torch.testing.assert_close(hub_rows(name, weights[name], "llama"), fp16_scale_reference(qw),
                                   rtol=1e-6, atol=1e-7)
    assert types["output.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert f"wrote {out / 'model.gguf'}" in output and f"{N_LINEARS}× Q4_0 exact" in output
    assert "beside the compressed-tensors safetensors checkpoint" in output and "warning" not in output


def test_manifest_records_the_gguf_file(rtn_g32):
    out, _ = rtn_g32
    meta = json.loads((out / "llmopt.json").read_text())
    g = meta["gguf"]
    assert meta["format"] == "compressed-tensors" and meta["args"]["format"] == "gguf"
    assert g["file"] == "model.gguf" and g["bytes"] == (out / "model.gguf").stat().st_size
    assert g["float_type"] == "f16" and g["exact"] == N_LINEARS and g["requantized"] == 0
    assert g["requantized_tensors"] == [] and g["warning"] is None
    assert g["tensors"]["Q4_0 exact"] == N_LINEARS and sum(g["tensors"].values()) == len(_types(out / "model.gguf"))
    assert "gguf" in meta["timings"]


def test_equals_llmopt_export_of_the_same_checkpoint(rtn_g32, tmp_path):
    out, _ = rtn_g32
    r = runner.invoke(app, ["export", str(out), "--to", "gguf", "--out", str(tmp_path / "exported.gguf")])
    assert r.exit_code == 0, r.output
    mine, theirs = gguf.GGUFReader(out / "model.gguf"), gguf.GGUFReader(tmp_path / "exported.gguf")
    assert [(t.name, t.tensor_type, list(t.shape)) for t in mine.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in theirs.tensors]
    for a, b in zip(mine.tensors, theirs.tensors):
        assert np.array_equal(a.data, b.data), a.name
    fields = {k: f.contents() for k, f in mine.fields.items()}
    assert fields == {k: f.contents() for k, f in theirs.fields.items()}
    assert fields["general.name"] == out.name  # the output dir's name, not the temp dir's


def test_awq_asym_is_q4_1(tiny_model_dir, tmp_path):
    out = tmp_path / "awq"
    r = _quantize(tiny_model_dir, out, "--method", "awq", "--group-size", "32", "--awq-grid", "4")
    assert r.exit_code == 0, r.output
    types = _types(out / "model.gguf")
    assert {types[gguf_name(m)] for m in read_checkpoint(out)[1]} == {"Q4_1"}
    assert json.loads((out / "llmopt.json").read_text())["gguf"]["exact"] == N_LINEARS


def test_requantized_mapping_warns_that_the_evaluation_measured_the_safetensors(tiny_model_dir, tmp_path):
    out = tmp_path / "g16"  # 16-column groups: every 32-column block spans two
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--format", "gguf", "--method",
                            "rtn", "--group-size", "16", "--device", "cpu", "--eval-samples", "4",
                            "--eval-seq-len", "64"])
    assert r.exit_code == 0, r.output
    g = json.loads((out / "llmopt.json").read_text())["gguf"]
    assert g["exact"] == 0 and g["requantized"] == N_LINEARS and len(g["requantized_tensors"]) == N_LINEARS
    assert g["warning"].startswith(f"{N_LINEARS} of {N_LINEARS} quantized tensors were requantized")
    assert g["warning"].endswith("the quality table measured the safetensors checkpoint, not model.gguf")
    assert f"warning: {g['warning']}" in " ".join(r.output.split())


@pytest.fixture(scope="module")
def mistral_dir(tiny_model_dir, tmp_path_factory):
    """A random Mistral (an architecture gguf.py does not map) with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    cfg = MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("models") / "mistral-random"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("case,args,message", [
    ("w8a8", ["--method", "w8a8"], "W8A8 checkpoints quantize activations"),
    ("kv", ["--method", "rtn", "--kv-cache", "fp8"], "GGUF files carry no static KV-cache scales"),
    ("arch", ["--method", "gptq", "--group-size", "32"], "not model_type 'mistral'"),
    ("2-bit", ["--method", "gptq", "--bits", "2", "--group-size", "32"], "2-bit codes would take 4.5 bits"),
    ("3-bit", ["--method", "rtn", "--bits", "3", "--group-size", "32"], "3-bit codes would take 4.5 bits"),
])
def test_refused_before_calibration_exit_2_nothing_written(tiny_model_dir, mistral_dir, tmp_path, monkeypatch,
                                                            case, args, message):
    def no_calibration(*a, **k):
        raise AssertionError("calibration data loaded before the GGUF check")

    monkeypatch.setattr("llmopt.quant.api.load_data", no_calibration)
    r = _quantize(mistral_dir if case == "arch" else tiny_model_dir, tmp_path / "q", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
