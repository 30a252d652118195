"""What every backend declares, and how llmopt runs a backend's worker in a Python of its own.

Stdlib only at import time: this module is imported inside the backends' own venvs (old transformers, no
rich/typer), where `python -m llmopt.backends.worker JOB.json` runs the library and writes RESULT.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import LlmoptError

# a worker exits with this code after writing {"error": "..."}: an expected, one-line failure
WORKER_ERROR = 3


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """An external quantization library that `llmopt quantize --backend NAME` can drive."""

    name: str  # CLI name (--backend NAME), also the venv folder under $LLMOPT_HOME/backends
    module: str  # import name of the library
    dist: str  # distribution name on PyPI
    version: str  # the version llmopt drives and tests (pip spec suffix, e.g. "==0.7.1")
    methods: dict[str, str]  # llmopt method → the checkpoint format this library writes for it
    # pip lines for the backend's own venv (`llmopt backends setup NAME`); torch is added as the running one
    requirements: tuple[str, ...]
    no_deps: bool  # install the library itself with --no-deps (its metadata pins a torch we do not want)
    own_venv: bool  # True: never imported in llmopt's environment (old-stack pins), always a subprocess venv
    transformers_max: str | None = None  # newest transformers the library imports with, None: no cap
    env: dict[str, str] = field(default_factory=dict)  # environment of every worker process
    cpu: str = ""  # what works on CPU, for doctor and the README
    gpu: str = ""  # what works on CUDA

    @property
    def extra(self) -> str:
        return self.name

    def install_hint(self) -> str:
        if self.own_venv:
            return f"run `llmopt backends setup {self.name}` (creates its own venv) or pass --backend-python"
        return (f"pip install 'llmopt[{self.extra}]', or `llmopt backends setup {self.name}` for a venv of its own "
                f"(then it is found automatically), or pass --backend-python")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_at_most(have: str, cap: str) -> bool:
    """'4.53.3' ≤ '4.53' compares on the cap's length (4.53.x all satisfy a 4.53 cap)."""
    h, c = _version_tuple(have), _version_tuple(cap)
    return h[:len(c)] <= c


def backends_home() -> Path:
    from llmopt.utils import llmopt_home

    return llmopt_home() / "backends"


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


@dataclass(frozen=True, slots=True)
class Interpreter:
    """The Python a backend runs in and why that one."""

    python: str
    origin: str  # "llmopt env", "venv <path>", "--backend-python"


def dist_version(dist: str) -> str | None:
    """A distribution's version in llmopt's own environment, or None (metadata only: importing is the probe's
    job, and importing some of these libraries takes tens of seconds)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def find_interpreter(spec: BackendSpec, backend_python: str | None = None) -> Interpreter:
    """Which Python runs `spec`'s worker: --backend-python, else llmopt's own env when the library is installed
    there and its pins allow it, else the venv `llmopt backends setup` made. One-line LlmoptError otherwise."""
    if backend_python:
        py = Path(backend_python).expanduser()
        if py.is_dir():
            py = venv_python(py)
        if not py.is_file() or not os.access(py, os.X_OK):
            raise LlmoptError(f"--backend-python {backend_python} is not an executable Python: give the venv's "
                              f"bin/python (or the venv folder)")
        return Interpreter(str(py), "--backend-python")
    reason = None
    if not spec.own_venv:
        have = dist_version(spec.dist)
        if have is not None:
            tf = dist_version("transformers")
            if spec.transformers_max and tf and not version_at_most(tf, spec.transformers_max):
                reason = (f"{spec.dist} {have} is installed here but needs transformers ≤{spec.transformers_max} "
                          f"(this environment has {tf})")
            else:
                return Interpreter(sys.executable, "llmopt env")
    venv = backends_home() / spec.name
    if venv_python(venv).is_file():
        return Interpreter(str(venv_python(venv)), f"venv {venv}")
    if reason is None:
        reason = (f"{spec.dist} is not installed" if not spec.own_venv else
                  f"{spec.dist}{spec.version} needs an old stack (transformers ≤{spec.transformers_max}) in a venv "
                  f"of its own, and {venv} does not exist")
    raise LlmoptError(f"backend {spec.name} is not usable: {reason}: {spec.install_hint()}")


def _package_root() -> Path:
    """A folder holding only a link named `llmopt` to this package, so a foreign venv imports llmopt's worker
    code without seeing llmopt's site-packages (which would shadow the venv's own torch/transformers)."""
    import llmopt

    pkg = Path(llmopt.__file__).resolve().parent
    import hashlib

    digest = hashlib.sha256(str(pkg).encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"llmopt-pkgroot-{os.getuid()}-{digest}"
    link = root / "llmopt"
    if not (link.is_symlink() and link.resolve() == pkg):
        root.mkdir(parents=True, exist_ok=True)
        tmp_link = root / f".llmopt-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(pkg, target_is_directory=True)
        tmp_link.replace(link)  # atomic: concurrent runs never see a missing link
    return root


def worker_env(spec: BackendSpec, interpreter: Interpreter) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("PYTHONHOME", None)
    if interpreter.origin != "llmopt env":
        env["PYTHONPATH"] = str(_package_root())  # only llmopt itself, never this venv's site-packages
        env.pop("VIRTUAL_ENV", None)
    return env


@dataclass(slots=True)
class WorkerRun:
    """A finished worker: its RESULT.json and the wall time of the whole process."""

    result: dict
    seconds: float


def run_worker(spec: BackendSpec, interpreter: Interpreter, job: dict, timeout: float | None = None) -> WorkerRun:
    """Run `python -m llmopt.backends.worker JOB.json` in a fresh temp working dir (libraries such as GPTQModel
    write logs/ into the cwd) and return its result; any failure becomes a one-line LlmoptError."""
    import time

    work = Path(tempfile.mkdtemp(prefix=f"llmopt-{spec.name}-"))
    job_path, result_path = work / "job.json", work / "result.json"
    log = work / "worker.log"
    job = {**job, "backend": spec.name, "result": str(result_path)}
    job_path.write_text(json.dumps(job))
    t = time.perf_counter()
    try:
        try:
            with open(log, "w") as fh:
                proc = subprocess.run([interpreter.python, "-m", "llmopt.backends.worker", str(job_path)], cwd=work,
                                      env=worker_env(spec, interpreter), stdout=fh, stderr=subprocess.STDOUT,
                                      timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise LlmoptError(f"backend {spec.name} did not finish within {timeout:.0f} s "
                              f"(log: {_keep(log, work)})") from None
        seconds = time.perf_counter() - t
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if proc.returncode == WORKER_ERROR and "error" in result:
            raise LlmoptError(f"backend {spec.name}: {result['error']}")
        if proc.returncode != 0 or "error" in result:
            raise LlmoptError(f"backend {spec.name} failed ({interpreter.origin}, exit {proc.returncode}): "
                              f"{_last_error_line(log)} — full log: {_keep(log, work)}")
        return WorkerRun(result, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the worker's cwd: library logs, job and result files


def _keep(log: Path, work: Path) -> Path:
    """Move a failed worker's log out of its temp dir (which is deleted) to a stable place."""
    dest = Path(tempfile.gettempdir()) / f"{work.name}.log"
    if log.is_file() and log.parent == work:
        shutil.move(str(log), dest)
        return dest
    return log


def _last_error_line(log: Path) -> str:
    """The exception line at the end of a traceback, else the last non-empty line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) or head in ("KeyboardInterrupt", "SystemExit"):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"
