"""The CLI shell: help, version, error → exit code and one-line message."""

import pytest
from typer.testing import CliRunner

from llmopt import __version__
from llmopt.cli.main import app
from llmopt.errors import LlmoptError

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    panel = r.output[r.output.index("Commands"):]
    names = [line.strip("│ ").split()[0] for line in panel.splitlines()[1:] if line.startswith("│ ") and line[2] != " "]
    assert names == ["quantize", "distill", "eval", "run", "verify", "export", "models", "backends"]


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_user_error_is_one_line_exit_2(tmp_path):
    r = runner.invoke(app, ["models", "info", str(tmp_path / "missing")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert "Traceback" not in r.output


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_raises_the_error_itself(tmp_path, monkeypatch, how):
    """LLMOPT_DEBUG=1 or --debug: the LlmoptError propagates with its traceback instead of the one-line message."""
    monkeypatch.setenv("LLMOPT_DEBUG", "1" if how == "env" else "0")  # --debug sets it to 1; undone after the test
    flag = ["--debug"] if how == "flag" else []
    r = runner.invoke(app, [*flag, "models", "info", str(tmp_path / "missing")])
    assert isinstance(r.exception, LlmoptError) and "does not exist" in str(r.exception)
    assert r.exc_info[2] is not None and "error:" not in r.output


def test_usage_error_exit_2_names_the_option():
    r = runner.invoke(app, ["models", "info", "x", "--context", "notanint"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    assert "Invalid value for '--context'" in r.output and "integer" in r.output
    assert "Traceback" not in r.output
