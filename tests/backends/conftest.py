"""A session's worth of llmopt checkpoints for the backend tests."""

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

FAST = ["--samples", "8", "--seq-len", "64", "--device", "cpu", "--group-size", "32"]


@pytest.fixture(scope="session")
def llmopt_checkpoints(tiny_model_dir, tmp_path_factory):
    """llmopt's GPTQ (compressed-tensors, gptq) and AWQ (awq) outputs of the trained tiny model."""
    base = tmp_path_factory.mktemp("verify")
    out = {}
    for method, fmt in (("gptq", "compressed-tensors"), ("gptq", "gptq"), ("awq", "awq")):
        path = base / f"{method}-{fmt}"
        r = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--method", method, "--format", fmt,
                                     "--out", str(path), "--no-evaluate", *FAST])
        assert r.exit_code == 0, r.output
        out[fmt] = path
    return out


