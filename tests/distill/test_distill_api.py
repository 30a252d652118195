"""distill() end to end on the test-sized model: outputs, resume equivalence, corrupt checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmopt.distill.api import DistillArgs, distill
from llmopt.errors import LlmoptError


class _Stop(Exception):
    """Injected interruption (stands in for a killed process)."""


def _args(teacher: Path, out: Path, data: Path, **kw) -> DistillArgs:
    base = dict(teacher=str(teacher), out=out, data=str(data), student_layers=1, steps=6, seq_len=32, batch_size=4,
                eval_samples=2, device="cpu", warmup=2, lr=3e-3)
    return DistillArgs(**{**base, **kw})


def _stop_at(step: int):
    def cb(event):
        if event.task == "distill" and event.done == step:  # a training step's Event (messages have done None)
            raise _Stop
    return cb


_KILLED_RUN = """
import os, signal, sys, torch
from pathlib import Path
from llmopt.distill.api import DistillArgs, distill
torch.set_num_threads(int(sys.argv[1]))

def die(event):  # SIGKILL: no exception handlers, no cleanup, exactly like a killed job
    if event.task == "distill" and event.done == 5:
        os.kill(os.getpid(), signal.SIGKILL)

distill(DistillArgs(**eval(sys.argv[2])), progress=die)
"""


def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, distill_text, tmp_path):
    import signal
    import subprocess
    import sys

    kw = dict(save_every=2, on_policy_ratio=0.5, on_policy_tokens=8, top_k=16, hidden_weight=0.5, alpha=0.7,
              grad_accum=2)
    straight = distill(_args(tiny_model_dir, tmp_path / "straight", distill_text, **kw))
    cut = _args(tiny_model_dir, tmp_path / "cut", distill_text, **kw).to_dict()
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(torch.get_num_threads()), repr(cut)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = tmp_path / "cut.ckpt"
    assert not (tmp_path / "cut").exists()  # nothing half-written
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    resumed = distill(_args(tiny_model_dir, tmp_path / "cut", distill_text, resume=ckpts, **kw))
    assert resumed.resumed_from == 4
    # a finished run deletes its step checkpoints (each holds the student and the optimizer state)
    assert not ckpts.exists() and not (tmp_path / "straight.ckpt").exists()
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["student_ppl"] == straight.metrics["student_ppl"]
    curve = lambda p: [r.split(",")[:8] for r in (p / "loss_curve.csv").read_text().splitlines()]  # noqa: E731
    assert curve(tmp_path / "straight") == curve(tmp_path / "cut")  # same loss curve, step by step
    # Training moved the weights (an untrained or restarted-from-init resume would be caught above).
    assert straight.metrics["student_ppl"] != straight.metrics["student_init_ppl"]


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tiny_model_dir, distill_text, tmp_path):
    ckpts = tmp_path / "run.ckpt"
    with pytest.raises(_Stop):
        distill(_args(tiny_model_dir, tmp_path / "run", distill_text, save_every=2), progress=_stop_at(3))
    step = ckpts / "step-000002"
    with pytest.raises(LlmoptError, match="other arguments"):
        distill(_args(tiny_model_dir, tmp_path / "run", distill_text, save_every=2, lr=1e-2, resume=ckpts))
    data = bytearray((step / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (step / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(LlmoptError, match="corrupt"):
        distill(_args(tiny_model_dir, tmp_path / "run", distill_text, save_every=2, resume=ckpts))
    (step / "manifest.json").unlink()
    with pytest.raises(LlmoptError, match="corrupt"):
        distill(_args(tiny_model_dir, tmp_path / "run", distill_text, save_every=2, resume=step))
    assert not (tmp_path / "run").exists()


def test_keep_checkpoints_keeps_them(tiny_model_dir, distill_text, tmp_path):
    distill(_args(tiny_model_dir, tmp_path / "run", distill_text, save_every=2, keep_checkpoints=True))
    assert (tmp_path / "run.ckpt" / "step-000002" / "manifest.json").exists()


@pytest.mark.parametrize("kw", [dict(student_layers=0), dict(alpha=1.5), dict(beta=1.0), dict(loss="kl"),
                                dict(on_policy_ratio=2.0), dict(on_policy_tokens=32), dict(student="x"),
                                dict(steps=0)])
def test_args_validation(tiny_model_dir, distill_text, tmp_path, kw):
    with pytest.raises(LlmoptError):
        _args(tiny_model_dir, tmp_path / "o", distill_text, **kw)


def test_scratch_comparison_and_metrics(tiny_model_dir, distill_text, tmp_path):
    res = distill(_args(tiny_model_dir, tmp_path / "o", distill_text, compare_scratch=True, steps=8))
    meta = json.loads((tmp_path / "o" / "llmopt.json").read_text())
    assert set(meta["metrics"]) >= {"teacher_ppl", "student_init_ppl", "student_ppl", "scratch_ppl"}
    assert meta["metrics"] == res.metrics
    assert meta["distill"]["student"]["teacher_layers"] == [0]
    rows = (tmp_path / "o" / "loss_curve.csv").read_text().splitlines()
    assert sum(r.startswith("distill,") for r in rows) == 8 and sum(r.startswith("scratch,") for r in rows) == 8
    # Copied layers start far better than random init, and 8 steps of scratch training cannot catch up.
    assert res.metrics["student_ppl"] < res.metrics["scratch_ppl"]


@pytest.mark.gpu
def test_distill_on_cuda_with_mixed_precision(tiny_model_dir, distill_text, tmp_path):
    res = distill(_args(tiny_model_dir, tmp_path / "o", distill_text, device="cuda", mixed_precision="bf16",
                        on_policy_ratio=0.5, hidden_weight=0.5, top_k=16, steps=8))
    meta = json.loads((tmp_path / "o" / "llmopt.json").read_text())
    assert meta["distill"]["mixed_precision"] == "bf16" and meta["distill"]["device"].startswith("cuda")
    # bf16 autocast + a bf16 teacher must not derail training (NaNs, divergence): same bar as fp32 would meet.
    assert math.isfinite(res.metrics["student_ppl"])
    assert res.metrics["student_ppl"] < res.metrics["student_init_ppl"] * 1.5
