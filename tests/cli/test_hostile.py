"""Hostile inputs and faults, each through the CLI: one line naming the file or option, exit 2, no traceback,
nothing at --out and no temp folder left beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app

runner = CliRunner()
QFAST = ["--samples", "4", "--seq-len", "32", "--eval-samples", "2", "--eval-seq-len", "32", "--device", "cpu"]
EFAST = ["--num-requests", "2", "--prompt-len", "8:12", "--output-len", "2:4", "--seq-len", "32",
         "--quality-tokens", "64", "--kv-budget", "4MiB", "--threads", "1"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_header(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x07" * 32  # the JSON header's start overwritten
    f.write_bytes(bytes(data))


def _huge_header(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes((2 ** 40).to_bytes(8, "little") + f.read_bytes()[8:])


def _empty(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"")


def _bad_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,,}')


def _missing_remote_code(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


CORRUPTIONS = {
    "truncated": (_truncate, "truncated"),
    "garbage-header": (_garbage_header, "header is not JSON"),
    "huge-header": (_huge_header, "truncated or garbage"),
    "empty": (_empty, "empty"),
    "config-not-json": (_bad_config, "is not valid JSON (line 1"),
    "remote-code-missing": (_missing_remote_code, "configuration_x.py"),
    "pickle-only": (_pickle_only, "pickle weights"),
}


def _check_one_line(r, code: int, fragment: str) -> None:
    assert r.exit_code == code, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in r.output and len(errors) == 1 and fragment in errors[0], r.output


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", CORRUPTIONS)
@pytest.mark.parametrize("command", ["quantize", "eval", "models-info"])
def test_corrupt_checkpoints(tiny_llama_random_dir, tmp_path, case, command):
    corrupt, fragment = CORRUPTIONS[case]
    model = _copy(tiny_llama_random_dir, tmp_path / "m")
    corrupt(model)
    out = tmp_path / "out"
    remote = ["--trust-remote-code"] if case == "remote-code-missing" else []
    if command == "quantize":
        r = runner.invoke(app, ["quantize", str(model), "--out", str(out), "--method", "rtn", *remote, *QFAST])
    elif command == "eval":
        r = runner.invoke(app, ["eval", str(model), "--json", str(out / "r.json"), *remote, *EFAST])
    else:
        r = runner.invoke(app, ["models", "info", str(model), *remote])
    _check_one_line(r, 2, fragment)
    _nothing_at(out)


def test_remote_code_prompt_without_a_terminal_is_one_line(tiny_llama_random_dir, tmp_path):
    """A real process with stdin closed: transformers must never get to prompt (EOFError)."""
    model = _copy(tiny_llama_random_dir, tmp_path / "m")
    _missing_remote_code(model)
    r = subprocess.run([sys.executable, "-m", "llmopt.cli.main", "models", "info", str(model)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode in (0, 2), r.stderr  # without --trust-remote-code the built-in class may serve it
    assert "Traceback" not in r.stderr and "EOFError" not in r.stderr


def _binary(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 8)


def _malformed_jsonl(p: Path) -> None:
    p.write_text('{"text": "fine"}\n{"text": broken\n')


def _not_objects(p: Path) -> None:
    p.write_text('["a", "b"]\n')


def _empty_file(p: Path) -> None:
    p.write_text("")


DATA = {
    "binary.jsonl": (_binary, "is binary"),
    "binary.txt": (_binary, "is binary"),
    "malformed.jsonl": (_malformed_jsonl, "line 2, is not valid JSON"),
    "arrays.jsonl": (_not_objects, "line 1, is not a JSON object"),
    "empty.jsonl": (_empty_file, "is empty"),
    "empty.csv": (_empty_file, "is empty"),
}


@pytest.mark.parametrize("name", DATA)
def test_bad_calibration_files(tiny_llama_random_dir, tmp_path, name):
    write, fragment = DATA[name]
    data = tmp_path / name
    write(data)
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(tiny_llama_random_dir), "--out", str(out), "--method", "gptq",
                            "--calib", str(data), *QFAST])
    _check_one_line(r, 2, fragment)
    assert str(data) in r.output
    _nothing_at(out)


def test_disk_full_while_writing(tiny_llama_random_dir, tmp_path, monkeypatch):
    """A full disk while the shards are written: the failure becomes one line that says how much had been
    written and where, and the partial checkpoint is gone."""
    import errno

    from llmopt.checkpoint.shards import ShardWriter

    real = ShardWriter._finish_shard

    def full(self):
        real(self)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_finish_shard", full)
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(tiny_llama_random_dir), "--out", str(out), "--method", "rtn", *QFAST])
    _check_one_line(r, 2, "no space left on the device holding")
    assert "MiB free there" in r.output and "MiB had been written, now removed" in r.output
    assert str(tmp_path) in r.output
    _nothing_at(out)


def test_stale_temp_folders_of_a_killed_run_are_removed(tiny_llama_random_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after kill -9
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    (stale / "half").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getppid()}-zzz"  # a running process's folder is not touched
    live.mkdir()
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(tiny_llama_random_dir), "--out", str(out), "--method", "rtn",
                            "--no-evaluate", *QFAST])
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists() and (out / "llmopt.json").exists()


@pytest.mark.parametrize("option", ["--seq-len", "--eval-seq-len"])
def test_quantize_seq_len_beyond_context(tiny_llama_random_dir, tmp_path, option):
    ctx = json.loads((tiny_llama_random_dir / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "out"
    args = {**dict(zip(QFAST[::2], QFAST[1::2])), option: str(ctx + 1)}
    r = runner.invoke(app, ["quantize", str(tiny_llama_random_dir), "--out", str(out), "--method", "rtn",
                            *[x for kv in args.items() for x in kv]])
    _check_one_line(r, 2, f"{option} {ctx + 1} exceeds")
    assert f"maximum context of {ctx}" in r.output
    _nothing_at(out)


def test_tables_keep_their_width_off_a_terminal(tiny_llama_random_dir):
    r = runner.invoke(app, ["models", "info", str(tiny_llama_random_dir)])  # CliRunner's stdout is no terminal
    assert r.exit_code == 0, r.output
    assert "…" not in r.output and str(tiny_llama_random_dir) in r.output
