"""--engine llamacpp: one clear LlmoptError in preflight without llama-cpp-python; the quality phase scores the GGUF
file through llama.cpp's logits (a fake llama_cpp here, checked against a hand-computed perplexity and KLD; the
real library where it is installed)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.errors import LlmoptError
from llmopt.evaluate.engines import ENGINE_MODULES, check_engine

QUALITY = ["--quality-only", "--seq-len", "64", "--stride", "64", "--quality-tokens", "256", "--threads", "1"]


def test_registered():
    assert ENGINE_MODULES["llamacpp"] == "llmopt.evaluate.engines.llamacpp"


@pytest.mark.parametrize("quality_only", [False, True])  # quality scores the GGUF through llama.cpp too
def test_missing_llama_cpp_python_is_one_line(monkeypatch, quality_only):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(LlmoptError, match="pip install llama-cpp-python") as e:
        check_engine("llamacpp", SimpleNamespace(quality_only=quality_only))
    assert "\n" not in str(e.value)


def _fake_llama_cpp(model: torch.nn.Module, seen: dict) -> ModuleType:
    """llama_cpp whose Llama returns `model`'s logits × 0.8 (a stand-in for a lossy file) for the tokens it is fed,
    with llama-cpp-python's eval/scores/reset contract; records the path, kwargs and every window."""

    class Llama:
        def __init__(self, path, **kw):
            seen.update(path=path, kw=kw)
            seen.setdefault("windows", [])
            self.scores = np.zeros((kw["n_ctx"], model.config.vocab_size), dtype=np.float32)
            self.n_tokens = 0

        def reset(self):
            self.n_tokens = 0

        def eval(self, tokens):
            assert self.n_tokens == 0, "each window must start from an empty cache"
            seen["windows"].append(list(tokens))
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0] * 0.8  # [L, V]
            self.scores[: len(tokens)] = logits.numpy()
            self.n_tokens = len(tokens)

    module = ModuleType("llama_cpp")
    module.Llama = Llama
    sub = ModuleType("llama_cpp.llama")
    sub.llama_cpp = SimpleNamespace(llama_model_default_params=lambda: SimpleNamespace(use_extra_bufts=True))
    module.llama = sub
    return module


def test_quality_scores_the_gguf_through_llama_cpp(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seen: dict = {}
    fake = _fake_llama_cpp(model, seen)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama", fake.llama)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "model.gguf").write_bytes(b"GGUF")  # the checkpoint's own file is used, not exported again
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["eval", str(ckpt), "--baseline", str(tiny_model_dir), "--engine", "llamacpp",
                                 *QUALITY, "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert seen["path"] == str(ckpt / "model.gguf") and seen["kw"]["logits_all"] and seen["kw"]["n_ctx"] == 64
    result = {e["model"]: e for e in json.loads(out.read_text())["results"]}[str(ckpt)]
    q = result["quality"]
    assert result["memory"]["weight_bytes"] == 4 and result["memory"]["checkpoint_weight_bytes"] > 10 ** 6

    # By hand, from the windows llama.cpp was fed: position p's logits predict token p + 1.
    nll, kld, agree, n = 0.0, 0.0, 0, 0
    windows = seen["windows"][len(seen["windows"]) // 2:]  # the baseline's GGUF was scored first
    assert len(windows) == 4 and all(len(w) == 64 for w in windows)
    with torch.no_grad():
        for w in windows:
            base = torch.log_softmax(model(torch.tensor([w])).logits[0, :-1].double(), -1)  # [63, V]
            lp = torch.log_softmax(base * 0.8, -1)  # log_softmax(logits·0.8) = log_softmax(log_softmax·0.8)
            nll -= lp[torch.arange(63), torch.tensor(w[1:])].sum().item()
            kld += (base.exp() * (base - lp)).sum().item()
            agree += (base.argmax(-1) == lp.argmax(-1)).sum().item()
            n += 63
    assert q["source"] == "gguf (llama.cpp)" and q["tokens"] == n
    assert q["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert q["kld_mean"] == pytest.approx(kld / n, rel=1e-4) and q["kld_mean"] > 1e-3
    assert q["top1_agreement"] == pytest.approx(agree / n)
    # the checkpoint's own scores (the safetensors weights, equal to the baseline's) stay beside them
    assert q["checkpoint"]["kld_mean"] < 1e-9 and q["checkpoint"]["perplexity"] < q["perplexity"]


def test_real_llama_cpp_scores_an_int8_gguf_close_to_the_checkpoint(tiny_model_dir, tmp_path):
    """Where llama-cpp-python is installed (not in CI): the Q8_0 file's perplexity is within 1% of the int8
    checkpoint's, and its KLD vs float is small but not zero (F16 embeddings, 8-bit activations in llama.cpp)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    ckpt = tmp_path / "int8"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--method", "int8", "--out", str(ckpt),
                                 "--no-evaluate", "--samples", "8", "--seq-len", "64", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["eval", str(ckpt), "--baseline", str(tiny_model_dir), "--engine", "llamacpp",
                                 *QUALITY, "--json", str(out)])
    assert r.exit_code == 0, r.output
    q = {e["model"]: e["quality"] for e in json.loads(out.read_text())["results"]}[str(ckpt)]
    assert q["perplexity"] == pytest.approx(q["checkpoint"]["perplexity"], rel=0.01)
    assert 0 < q["kld_mean"] < 1e-2 and q["top1_agreement"] > 0.9
