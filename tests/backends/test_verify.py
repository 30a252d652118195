"""`llmopt verify`: llmopt's own checkpoints load in external loaders with the same logits.
transformers (compressed-tensors) always runs; GPTQModel (GPTQ, AWQ) where it is installed."""

import json

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

runner = CliRunner()
VERIFY = ["--prompts", "2", "--prompt-len", "32", "--device", "cpu", "--json"]


def _verify(path, loaders):
    r = runner.invoke(app, ["verify", str(path), "--with", loaders, *VERIFY])
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):])


def test_compressed_tensors_with_transformers(llmopt_checkpoints):
    res = _verify(llmopt_checkpoints["compressed-tensors"], "transformers")
    (c,) = res["checks"]
    assert res["passed"] and c["passed"] and c["loader"] == "transformers"
    assert c["top1_agreement"] >= 0.99 and 0 <= c["kld_mean"] <= 1e-3 and c["max_abs_diff"] < 0.1


def test_mismatch_exits_1(llmopt_checkpoints):
    # a tolerance no two different kernels meet: the check runs, fails and says where
    r = runner.invoke(app, ["verify", str(llmopt_checkpoints["compressed-tensors"]), "--with", "transformers",
                            "--kld-tol", "1e-30", *VERIFY[:-1]])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "logits differ from llmopt's runtime in transformers" in r.output


def test_wrong_loader_for_format(llmopt_checkpoints):
    r = runner.invoke(app, ["verify", str(llmopt_checkpoints["gptq"]), "--with", "transformers", *VERIFY])
    assert r.exit_code == 2 and "transformers does not load gptq checkpoints" in r.output
    r = runner.invoke(app, ["verify", str(llmopt_checkpoints["gptq"]), "--with", "vllm", *VERIFY])
    assert r.exit_code == 2 and "cannot verify with vllm" in r.output


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_gptq_awq_with_gptqmodel(llmopt_checkpoints, fmt):
    pytest.importorskip("gptqmodel")
    res = _verify(llmopt_checkpoints[fmt], "gptqmodel")
    (c,) = res["checks"]
    assert res["passed"] and c["loader"] == "gptqmodel" and "GPTQModel.load" in c["how"]
    assert c["top1_agreement"] >= 0.99 and c["kld_mean"] <= 1e-3
