"""`llmopt backends setup NAME`: a venv for one backend with its pinned stack, on the torch llmopt runs.

torch is pinned to the running version through a constraints file, so no backend's metadata can swap it
for another build; libraries whose metadata asks for a torch that is not needed are installed --no-deps
with their other requirements listed explicitly. The venv is deleted again if any step fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from llmopt.backends.base import Interpreter, backends_home, run_worker, venv_python
from llmopt.backends.doctor import BackendStatus
from llmopt.errors import LlmoptError


def _pip(python: Path, args: list[str], log: Path, step: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"\n$ pip {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
                              stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        from llmopt.backends.base import _last_error_line

        raise LlmoptError(f"{step} failed: {_last_error_line(log)} (log: {log})")


def setup(name: str, path: Path | None = None, overwrite: bool = False,
          progress: Callable[[str], None] | None = None) -> BackendStatus:
    import torch

    from llmopt.backends import get_spec

    spec = get_spec(name)
    venv = Path(path) if path is not None else backends_home() / spec.name
    if venv.exists():
        if not overwrite:
            raise LlmoptError(f"{venv} already exists: pass --overwrite to recreate it, or use it with "
                              f"--backend-python {venv_python(venv)}")
        shutil.rmtree(venv)
    say = progress or (lambda msg: None)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}-setup.log"
    log.write_text("")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    try:
        say(f"creating {venv}")
        proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LlmoptError(f"python -m venv {venv} failed: {proc.stderr.strip().splitlines()[-1:]}")
        py = venv_python(venv)
        constraints = venv / "llmopt-constraints.txt"
        constraints.write_text(torch_pin + "\n")
        say(f"installing {torch_pin} (log: {log})")
        _pip(py, [torch_pin], log, f"installing {torch_pin}")
        say(f"installing {spec.dist}'s requirements")
        _pip(py, ["-c", str(constraints), *spec.requirements], log, f"installing {spec.dist}'s requirements")
        say(f"installing {spec.dist}{spec.version}" + (" --no-deps" if spec.no_deps else ""))
        _pip(py, ["-c", str(constraints), *(["--no-deps"] if spec.no_deps else []), f"{spec.dist}{spec.version}"],
             log, f"installing {spec.dist}{spec.version}")
        say(f"importing {spec.module} in the new venv")
        res = run_worker(spec, Interpreter(str(py), f"venv {venv}"), {"kind": "probe"}, timeout=600).result
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    return BackendStatus(spec.name, True, res["library"], str(py), f"venv {venv}", res["patches"], spec.cpu, spec.gpu)
