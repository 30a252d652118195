"""The recipe executor on fake steps: order, report, gates, skip-unchanged, --set, --dry-run, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

ROOT = str(Path(__file__).resolve().parents[2])  # the repository root: tests.helpers


def run(args: list[str], calls: Path, monkeypatch) -> tuple[int, str]:
    monkeypatch.setenv("FAKE_CALL_LOG", str(calls))
    result = CliRunner().invoke(app, ["run", *args])
    return result.exit_code, result.output


def called(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_runs_in_dependency_order_and_writes_the_report(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    code, output = run([str(demo)], calls, monkeypatch)
    assert code == 0, output
    assert [c.split()[:2] for c in called(calls)] == [
        ["quantize", "q4"], ["distill", "student"], ["quantize", "student_q4"], ["eval", "compare"], ["eval", "spec"]]
    # The student-derived checkpoint really was made from the student's output.
    assert (out / "student_q4" / "model" / "lineage.txt").read_text() == "base-model|kd2|gptq4"
    rep = report(out)
    rows = {r["name"]: r for r in rep["table"]}
    assert set(rows) == {"float", "q4", "student", "student_q4", "spec"}
    assert rows["float"]["baseline"] and not rows["q4"]["baseline"]
    assert rows["q4"]["perplexity"] == pytest.approx(10.2)
    assert rows["q4"]["delta_ppl_pct"] == pytest.approx(2.0)
    assert rows["q4"]["tpot_p95_ms"] == pytest.approx(1100 / 150)
    assert rows["spec"]["acceptance_rate"] == 0.75
    gates = {g["gate"]: g for g in rep["gates"]}
    assert gates["q4.kld_mean < 0.05"]["left"] == pytest.approx(0.002)
    assert gates["q4.perplexity <= float * 1.05"]["right"] == pytest.approx(10.5)
    assert gates["student.tasks.cloze >= 0.3"]["left"] == pytest.approx(0.5 - 0.01)
    assert rep["passed"] and all(g["passed"] for g in rep["gates"])
    md = (out / "report.md").read_text()
    assert "| q4 |" in md and "10.200" in md and "![quality vs throughput](report.png)" in md
    assert (out / "report.png").stat().st_size > 10_000
    for step in ("q4", "student", "student_q4", "compare", "spec"):
        saved = json.loads((out / step / "step.json").read_text())
        assert saved["hash"] == next(s["hash"] for s in rep["steps"] if s["name"] == step)
        assert not (out / step / "attempt.json").exists()
    assert json.loads((out / "q4" / "step.json").read_text())["config"] == {
        "group_size": 128, "model": "base-model", "bits": 4}
    assert "gates" in output and "pass" in output and "10.200" in output


def test_rerun_skips_unchanged_steps_with_the_same_result(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    assert run([str(demo)], calls, monkeypatch)[0] == 0
    first = report(out)
    calls.unlink()
    code, output = run([str(demo)], calls, monkeypatch)
    assert code == 0 and called(calls) == []
    assert output.count("skipped") >= 5
    second = report(out)
    assert second["table"] == first["table"] and second["gates"] == first["gates"]
    assert [s["status"] for s in second["steps"]] == ["skipped"] * 5


def test_set_reruns_the_changed_step_and_what_depends_on_it(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    assert run([str(demo)], calls, monkeypatch)[0] == 0
    calls.unlink()
    code, output = run([str(demo), "--set", "steps.student.student_layers=3"], calls, monkeypatch)
    assert code == 0, output
    assert [c.split()[1] for c in called(calls)] == ["student", "student_q4", "compare", "spec"]
    assert (out / "student_q4" / "model" / "lineage.txt").read_text() == "base-model|kd3|gptq4"
    assert {s["name"]: s["status"] for s in report(out)["steps"]}["q4"] == "skipped"


def test_vars_override_changes_every_use(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    assert run([str(demo), "--set", "vars.base=other"], calls, monkeypatch)[0] == 0
    assert (out / "q4" / "model" / "lineage.txt").read_text() == "other|gptq4"
    assert {r["name"]: r["model"] for r in report(out)["results"]}["float"] == "other"


def test_impossible_gate_exits_1_and_prints_the_gate_table(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    code, output = run([str(demo), "--set", "gates.0=q4.kld_mean < 1e-9"], calls, monkeypatch)
    assert code == 1, output
    assert "FAIL" in output and "q4.kld_mean < 1e-9" in output and "0.002" in output and "1e-09" in output
    assert "1 of 5 gates failed" in output
    rep = report(out)
    assert not rep["passed"] and [g["passed"] for g in rep["gates"]] == [False, True, True, True, True]
    assert "**FAIL**" in (out / "report.md").read_text()


def test_gate_on_a_metric_not_measured_fails_with_a_note(demo, tmp_path, monkeypatch):
    code, output = run([str(demo), "--set", "gates.0=spec.kld_mean < 1"], tmp_path / "c.log", monkeypatch)
    assert code == 1
    assert "not measured: spec.kld_mean" in output


def test_failing_step_stops_the_run_with_its_error(demo, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    # q4's output folder cannot be created: the fake's atomic_dir refuses, like a real core would.
    (tmp_path / "out" / "q4").write_text("a file where the step dir should be")
    code, output = run([str(demo)], tmp_path / "c.log", monkeypatch)
    assert code != 0
    assert called(tmp_path / "c.log") == []


def test_dry_run_prints_the_plan_and_runs_nothing(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    code, output = run([str(demo), "--dry-run"], calls, monkeypatch)
    assert code == 0, output
    assert not out.exists() and called(calls) == []
    for text in ("q4", "student_q4", "fake_distill", "teacher: base-model", "q4.kld_mean < 0.05", str(out / "student")):
        assert text in output
    assert "skip (unchanged)" not in output
    assert run([str(demo)], calls, monkeypatch)[0] == 0
    code, output = run([str(demo), "--dry-run", "--set", "steps.q4.bits=8"], calls, monkeypatch)
    assert output.count("skip (unchanged)") == 3  # student, student_q4, spec; q4 and compare (reads q4) would run


def _spawn(recipe: Path, env: dict) -> subprocess.Popen:
    script = (f"import sys; sys.path.insert(0, {ROOT!r}); from tests.helpers.recipe_fakes import register_fakes; "
              f"register_fakes(); from llmopt.cli.main import main; sys.argv = ['llmopt', 'run', {str(recipe)!r}]; main()")
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the point where it was to be killed"
        assert time.monotonic() < deadline, "timed out waiting for the slow step"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_mid_run_then_rerun_skips_finished_steps_same_result(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    env = {**os.environ, "FAKE_CALL_LOG": str(calls), "FAKE_SLOW": "student_q4"}
    proc = _spawn(demo, env)
    _kill_when(proc, lambda: any((out / "student_q4").glob(".model.tmp-*")))
    assert (out / "q4" / "step.json").exists() and (out / "student" / "step.json").exists()
    assert not (out / "student_q4" / "step.json").exists() and not (out / "student_q4" / "model").exists()
    calls.unlink()
    code, output = run([str(demo)], calls, monkeypatch)
    assert code == 0, output
    assert [c.split()[1] for c in called(calls)] == ["student_q4", "compare", "spec"]
    assert not list((out / "student_q4").glob(".model.tmp-*"))  # the killed attempt's leftovers are gone
    resumed = report(out)
    assert {s["name"]: s["status"] for s in resumed["steps"]} == {
        "q4": "skipped", "student": "skipped", "student_q4": "ran", "compare": "ran", "spec": "ran"}
    straight_out = tmp_path / "straight"
    assert run([str(demo), "--set", f"outputs={straight_out}"], tmp_path / "c2.log", monkeypatch)[0] == 0
    straight = report(straight_out)
    assert resumed["table"] == straight["table"] and resumed["gates"] == straight["gates"]


def test_kill_9_in_a_resumable_step_resumes_from_its_checkpoint(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    env = {**os.environ, "FAKE_CALL_LOG": str(calls), "FAKE_SLOW": "student"}
    proc = _spawn(demo, env)
    # The fake sleeps right after writing its step-4 checkpoint.
    _kill_when(proc, lambda: (out / "student" / "checkpoints" / "step-000004" / "state.json").exists())
    calls.unlink()
    code, output = run([str(demo)], calls, monkeypatch)
    assert code == 0, output
    assert "distill student from=4" in called(calls)
    assert json.loads((out / "student" / "step.json").read_text())["result"]["metrics"]["resumed_from"] == 4


def test_unusable_checkpoint_restarts_the_step_afresh(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    env = {**os.environ, "FAKE_CALL_LOG": str(calls), "FAKE_SLOW": "student"}
    proc = _spawn(demo, env)
    _kill_when(proc, lambda: (out / "student" / "checkpoints" / "step-000004" / "state.json").exists())
    for ckpt in (out / "student" / "checkpoints").iterdir():
        ckpt.rename(ckpt.with_name("damaged-" + ckpt.name))
    calls.unlink()
    code, output = run([str(demo)], calls, monkeypatch)
    assert code == 0, output
    assert "cannot resume" in output
    assert "distill student from=0" in called(calls)


def test_a_second_run_on_the_same_outputs_is_refused(demo, tmp_path, monkeypatch):
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    proc = _spawn(demo, {**os.environ, "FAKE_CALL_LOG": str(calls), "FAKE_SLOW": "q4"})
    try:
        deadline = time.monotonic() + 90
        while not any((out / "q4").glob(".model.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        code, output = run([str(demo)], tmp_path / "second.log", monkeypatch)
        assert code == 2 and "another llmopt run is using" in output
        assert called(tmp_path / "second.log") == []
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_changed_local_input_file_reruns_the_step(demo, tmp_path, monkeypatch):
    calls = tmp_path / "calls.log"
    base = tmp_path / "base"
    base.mkdir()
    (base / "weights.bin").write_bytes(b"1234")
    args = [str(demo), "--set", f"vars.base={base}"]
    assert run(args, calls, monkeypatch)[0] == 0
    calls.unlink()
    assert run(args, calls, monkeypatch)[0] == 0 and called(calls) == []
    (base / "weights.bin").write_bytes(b"12345")  # the user's checkpoint changed: everything reading it re-runs
    assert run(args, calls, monkeypatch)[0] == 0
    assert [c.split()[1] for c in called(calls)] == ["q4", "student", "student_q4", "compare", "spec"]


def test_a_same_size_edit_with_the_old_mtime_reruns_the_step(demo, tmp_path, monkeypatch):
    """A prompt set or data file edited in place (same size, mtime put back, as `touch -r` or some sync tools
    leave it) still changes the hash: small files are fingerprinted by their bytes."""
    calls = tmp_path / "calls.log"
    base = tmp_path / "base"
    base.mkdir()
    f = base / "weights.bin"
    f.write_bytes(b"1234")
    args = [str(demo), "--set", f"vars.base={base}"]
    assert run(args, calls, monkeypatch)[0] == 0
    calls.unlink()
    st = f.stat()
    f.write_bytes(b"4321")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run(args, calls, monkeypatch)[0] == 0
    assert [c.split()[1] for c in called(calls)] == ["q4", "student", "student_q4", "compare", "spec"]
