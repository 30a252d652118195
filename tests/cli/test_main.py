"""The CLI shell: help, version, error → exit code and one-line message."""

from typer.testing import CliRunner

from llmopt import __version__
from llmopt.cli.main import app

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("quantize", "distill", "eval", "run", "models"):
        assert cmd in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_user_error_is_one_line_exit_2(tmp_path):
    r = runner.invoke(app, ["models", "info", str(tmp_path / "missing")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert "Traceback" not in r.output


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_DEBUG", "1")
    r = runner.invoke(app, ["models", "info", str(tmp_path / "missing")])
    assert r.exit_code != 0 and r.exception is not None


def test_usage_error_exit_2():
    r = runner.invoke(app, ["models", "info", "x", "--context", "notanint"])
    assert r.exit_code == 2
