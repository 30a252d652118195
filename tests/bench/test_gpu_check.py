"""bench/gpu_check.py --dry-run: lists every step of the CUDA check and exits 0 on a CPU machine, running nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import STEPS


def test_dry_run_lists_every_step_and_the_imports(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--wheels",
                        str(tmp_path / "no-wheels"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    names = [s.name for s in STEPS]
    assert {"install", "pytest_gpu", "quantize_gptq", "quantize_awq", "quantize_w8a8", "runtime_decode", "engine",
            "eval_util", "distill", "sdpa_backends"} <= set(names)
    for name in names:
        assert f"  {name} " in r.stdout
    assert "no-wheels: ABSENT" in r.stdout
    for mod in ("torch", "transformers", "safetensors", "llmopt"):
        assert any(line.split()[:1] == [mod] and "resolves" in line for line in r.stdout.splitlines())
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_dry_run_sees_wheels_in_the_folder(tmp_path):
    (tmp_path / "nvidia_ml_py-13.0.0-py3-none-any.whl").write_bytes(b"")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--wheels", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "exists, 1 wheel(s)" in r.stdout
    pynvml = next(line for line in r.stdout.splitlines() if line.split()[:1] == ["pynvml"])
    assert "resolves" in pynvml or "nvidia_ml_py-13.0.0" in pynvml
