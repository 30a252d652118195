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
    # decided positions: GPTQModel's kernels and llmopt's round differently, so raw top-1 flips on near-ties
    assert c["top1_decided"] >= 0.99 and c["top1_agreement"] >= 0.95 and c["kld_mean"] <= 1e-3


def test_a_misread_checkpoint_fails_despite_the_tie_margin(llmopt_checkpoints, monkeypatch):
    """A reader bug (int4 codes unpacked in reversed nibble order) must fail verify: it moves logits by whole
    units, far past the near-tie margin, so decided top-1 and KL both catch it."""
    import llmopt.checkpoint.formats.compressed_tensors as ct

    real = ct.unpack_bits

    def reversed_nibbles(words, bits, n, dim):
        codes = real(words, bits, n, dim)
        return codes.flip(dim) if bits == 4 else codes

    monkeypatch.setattr(ct, "unpack_bits", reversed_nibbles)
    r = runner.invoke(app, ["verify", str(llmopt_checkpoints["compressed-tensors"]), "--with", "transformers",
                            *VERIFY])
    assert r.exit_code == 1, r.output
    res = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])
    (c,) = res["checks"]
    assert not c["passed"] and (c["kld_mean"] > 1e-3 or c["top1_decided"] < 0.99)
