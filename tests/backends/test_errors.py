"""External backends: every missing or unusable backend is a one-line error (exit 2) before any heavy work;
doctor, worker plumbing and the comparison math, all without the libraries themselves."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from llmopt.backends import get_spec
from llmopt.backends.base import Interpreter, find_interpreter, run_worker, version_at_most
from llmopt.backends.worker import compat_model_dir
from llmopt.cli.main import app
from llmopt.errors import CheckFailed, LlmoptError

runner = CliRunner()


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for n in needles:
        assert n in lines[0], lines[0]


def _quantize(tmp_path, *extra):
    # the model path need not exist: backend checks come before any loading
    return runner.invoke(app, ["quantize", str(tmp_path / "model"), "--out", str(tmp_path / "q"), *extra])


def test_unknown_backend(tmp_path):
    _one_line_error(_quantize(tmp_path, "--backend", "optimum"), "unknown --backend 'optimum'", "gptqmodel")


def test_old_stack_backend_without_venv(tmp_path):
    # LLMOPT_HOME is a fresh temp dir in tests: no backend venv exists there
    for name, method in (("auto-gptq", "gptq"), ("autoawq", "awq")):
        r = _quantize(tmp_path, "--backend", name, "--method", method)
        _one_line_error(r, f"backend {name} is not usable", f"llmopt backends setup {name}")
    assert not (tmp_path / "q").exists()


def test_backend_missing_from_env(tmp_path, monkeypatch):
    import llmopt.backends.base as base

    monkeypatch.setattr(base, "dist_version", lambda dist: None if dist == "gptqmodel" else "5.24.0")
    _one_line_error(_quantize(tmp_path, "--backend", "gptqmodel"), "gptqmodel is not installed",
                    "pip install 'llmopt[gptqmodel]'")


def test_pinned_backend_with_newer_transformers(monkeypatch):
    import llmopt.backends.base as base

    monkeypatch.setattr(base, "dist_version", lambda dist: {"llmcompressor": "0.14.0.1",
                                                             "transformers": "5.24.0"}[dist])
    with pytest.raises(LlmoptError, match=r"needs transformers ≤5.17 \(this environment has 5.24.0\)"):
        find_interpreter(get_spec("llmcompressor"))


def test_method_the_backend_does_not_run(tmp_path):
    _one_line_error(_quantize(tmp_path, "--backend", "autoawq", "--method", "gptq"),
                    "backend autoawq does not run --method gptq", "awq")
    _one_line_error(_quantize(tmp_path, "--backend", "gptqmodel", "--method", "gptq", "--format", "awq"),
                    "writes gptq as gptq, not awq")


def test_bad_backend_python(tmp_path):
    _one_line_error(_quantize(tmp_path, "--backend", "gptqmodel", "--backend-python", str(tmp_path / "nope")),
                    "is not an executable Python")


def test_worker_in_a_python_without_the_library():
    """A Python that lacks the library: the worker's import error comes back as one line, no traceback."""
    spec = get_spec("autoawq")  # never installed in llmopt's own environment
    with pytest.raises(LlmoptError) as e:
        run_worker(spec, Interpreter(sys.executable, "--backend-python"), {"kind": "probe"}, timeout=120)
    msg = str(e.value)
    assert msg.startswith("backend autoawq: cannot import awq") and "\n" not in msg


def test_doctor_quick_json():
    r = runner.invoke(app, ["backends", "doctor", "--quick", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert list(rows) == ["llmopt", "gptqmodel", "llmcompressor", "auto-gptq", "autoawq"]
    assert rows["llmopt"]["usable"]
    for name in ("auto-gptq", "autoawq"):
        assert not rows[name]["usable"] and f"llmopt backends setup {name}" in rows[name]["reason"]
    assert all(row["cpu"] and row["gpu"] for row in rows.values())


def test_setup_refuses_existing_path(tmp_path):
    (tmp_path / "venv").mkdir()
    r = runner.invoke(app, ["backends", "setup", "autoawq", "--path", str(tmp_path / "venv")])
    _one_line_error(r, "already exists", "--overwrite")
    _one_line_error(runner.invoke(app, ["backends", "setup", "optimum"]), "unknown --backend 'optimum'")


def test_version_cap():
    assert version_at_most("4.53.3", "4.53") and version_at_most("4.51.3", "4.53")
    assert not version_at_most("5.24.0", "5.17") and version_at_most("5.17.0", "5.17")


def test_compat_config_for_transformers_4(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32",
                                                 "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}))
    (src / "model.safetensors").write_bytes(b"x")
    dst = compat_model_dir(src, tmp_path / "dst")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["torch_dtype"] == "float32" and "rope_scaling" not in cfg
    assert (dst / "model.safetensors").resolve() == (src / "model.safetensors").resolve()


def test_compare_math():
    from llmopt.evaluate.verify import LoaderCheck, VerifyResult, check, compare

    torch.manual_seed(0)
    ref = torch.randn(2, 5, 7)
    assert compare(ref, ref.clone(), 0.0) == (0.0, 0.0, 0.0, 1.0, 1.0, 1.0)
    other = ref.clone()
    other[0, 0] = -ref[0, 0]  # flips that position's argmax
    max_abs, kld, kld_max, top1, top1_decided, decided = compare(ref, other, 0.0)
    p = torch.log_softmax(ref[0, 0].double(), -1)
    q = torch.log_softmax(other[0, 0].double(), -1)
    expected = (p.exp() * (p - q)).sum().item()
    assert kld_max == pytest.approx(expected) and kld == pytest.approx(expected / 10)
    assert top1 == pytest.approx(9 / 10) and max_abs == pytest.approx(2 * ref[0, 0].abs().max().item())
    assert top1_decided == top1 and decided == 1.0  # margin 0: every position is decided
    # a near-tie: position [1, 1]'s top two are 0.01 apart and the loader swaps them
    tie = ref.clone()
    top = tie[1, 1].topk(2)
    tie[1, 1, top.indices[1]] = top.values[0] - 0.01
    swapped = tie.clone()
    swapped[1, 1, top.indices[0]], swapped[1, 1, top.indices[1]] = tie[1, 1, top.indices[1]], tie[1, 1, top.indices[0]]
    _, _, _, top1, top1_decided, decided = compare(tie, swapped, 0.25)
    gaps = tie.topk(2, dim=-1).values
    n_decided = int(((gaps[..., 0] - gaps[..., 1]) >= 0.25).sum())
    assert top1 == pytest.approx(9 / 10) and top1_decided == 1.0 and decided == pytest.approx(n_decided / 10)
    res = VerifyResult("ck", "gptq", "llmopt runtime", 2, 5, [LoaderCheck("gptqmodel", "x", max_abs, kld, kld_max,
                                                                         top1, top1, 1.0, False, 0.1)])
    with pytest.raises(CheckFailed, match="gptqmodel"):
        check(res)


def test_verify_bad_input(tiny_llama_random_dir, tmp_path):
    _one_line_error(runner.invoke(app, ["verify", str(tiny_llama_random_dir)]), "is not a quantized checkpoint")
    _one_line_error(runner.invoke(app, ["verify", str(tmp_path / "nope")]), "does not exist")


def test_vllm_engine_without_vllm():
    from llmopt.evaluate import vllm_engine

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have vLLM")
    with pytest.raises(LlmoptError, match="vLLM|CUDA"):
        vllm_engine.check_available(1)
