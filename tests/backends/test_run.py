"""run_backend's own part, without any library: a stand-in worker writes a GPTQ checkpoint the way AutoGPTQ
does (settings only in quantize_config.json, no tokenizer); llmopt must declare it in config.json, add the
tokenizer, evaluate it through its runtime and describe backend, library and patches in llmopt.json."""

import json
import shutil
import sys
from pathlib import Path

import pytest

import llmopt.quant.external as run_mod
from llmopt.backends.base import Interpreter, WorkerRun
from llmopt.quant.api import QuantizeArgs, quantize


def test_library_checkpoint_lands_in_llmopt_layout(llmopt_checkpoints, tiny_model_dir, tmp_path, monkeypatch):
    src = llmopt_checkpoints["gptq"]
    jobs = []

    def fake_worker(spec, interp, job, timeout=None):
        jobs.append(job)
        out = Path(job["out"])
        for f in src.glob("*.safetensors"):
            shutil.copy(f, out / f.name)
        config = json.loads((src / "config.json").read_text())
        qc = config.pop("quantization_config")
        (out / "config.json").write_text(json.dumps(config))
        legacy = {k: v for k, v in qc.items() if k not in ("quant_method", "checkpoint_format")}
        (out / "quantize_config.json").write_text(json.dumps({**legacy, "is_marlin_format": False}))
        calib = json.loads(Path(job["calib"]).read_text())
        assert len(calib) == 4 and all(len(w) == 32 for w in calib)
        return WorkerRun({"library": "auto-gptq 0.7.1", "patches": ["p1", "p2"], "format": "gptq",
                          "timings": {"load": 0.1, "quantize": 1.5, "save": 0.2}, "library_config": {"bits": 4}}, 2.0)

    monkeypatch.setattr(run_mod, "find_interpreter", lambda spec, py=None: Interpreter(sys.executable, "test"))
    monkeypatch.setattr(run_mod, "run_worker", fake_worker)
    out = tmp_path / "q"
    res = quantize(QuantizeArgs(model=str(tiny_model_dir), out=out, method="gptq", group_size=32, samples=4,
                                seq_len=32, eval_samples=2, eval_seq_len=32, device="cpu", backend="auto-gptq"))
    (job,) = jobs
    assert job["method"] == "gptq" and job["group_size"] == 32 and job["bits"] == 4 and job["device"] == "cpu"
    meta = json.loads((out / "llmopt.json").read_text())
    assert meta["backend"] == "auto-gptq" and meta["library"] == "auto-gptq 0.7.1"
    assert meta["patched"] is True and meta["patches"] == ["p1", "p2"] and meta["format"] == "gptq"
    assert meta["timings"]["quantize"] == 1.5 and meta["timings"]["backend_process"] == 2.0
    assert meta["evaluated_with"] == "runtime" and meta["quantized_modules"] == 14
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and "is_marlin_format" not in qc
    assert (out / "tokenizer.json").exists()
    q = res.metrics["quantized"]
    assert 0 < q["kld_mean"] < 0.05 and q["top1_agreement"] > 0.9 and res.quant_args["patched"] is True
    assert res.quant_args["backend"] == "auto-gptq" and res.format == "gptq"


def test_library_failure_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from llmopt.errors import LlmoptError

    def failing_worker(spec, interp, job, timeout=None):
        (Path(job["out"]) / "partial.safetensors").write_bytes(b"x")
        raise LlmoptError("backend auto-gptq failed (test, exit 1): RuntimeError: boom")

    monkeypatch.setattr(run_mod, "find_interpreter", lambda spec, py=None: Interpreter(sys.executable, "test"))
    monkeypatch.setattr(run_mod, "run_worker", failing_worker)
    with pytest.raises(LlmoptError, match="boom"):
        quantize(QuantizeArgs(model=str(tiny_model_dir), out=tmp_path / "q", method="gptq", samples=4, seq_len=32,
                              evaluate=False, device="cpu", backend="auto-gptq"))
    assert list(tmp_path.iterdir()) == []
