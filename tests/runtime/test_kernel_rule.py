"""The kernel choice is a rule, not a timing: the same kernel for a shape whatever the clock says, in every
process; the opt-in timed choice (LLMOPT_KERNEL_TUNE=1) is measured once and read back from kernels.json."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers.rtn import rtn

from llmopt.runtime import build_linear, clear_kernel_cache
from llmopt.runtime import linear, vnni
from llmopt.runtime.linear import ANY_M, TUNE_ENV, VNNI_ENV, rule_kernel

CPU = torch.device("cpu")
MS = (1, 3, 16, 40, 64, 100, 128, 129, 300, 1000)

# one module per kind and kernel-table variant: int4 with/without int4pack (N % 16), int8 per channel/grouped,
# w8a8, and a 3-bit layer (dequant only)
VARIANTS = {"int4": (64, 4, 32, None), "int4 odd N": (24, 4, 32, None), "int8 per-ch": (64, 8, -1, None),
            "int8 g32": (64, 8, 32, None), "w8a8": (64, 8, -1, 8), "3-bit": (64, 3, 32, None)}


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """These tests pin torch's kernel tables; tests/runtime/test_runtime_vnni.py covers the vnni rows."""
    monkeypatch.setenv(VNNI_ENV, "0")


def _module(variant: str):
    n, bits, gs, act_bits = VARIANTS[variant]
    torch.manual_seed(0)
    return build_linear(rtn(torch.randn(n, 256) * 0.05, bits, gs, True, act_bits=act_bits), CPU, torch.float32)


def _choices(module) -> dict[int, str]:
    for m in MS:
        module(torch.randn(m, module.in_features))
    return dict(module.used)


@pytest.fixture
def random_clock(monkeypatch):
    """Every timing a random number: a choice that depended on timing would change from call to call."""
    rng = random.Random(0)
    monkeypatch.setattr(linear, "_time", lambda fn, device: rng.random())
    monkeypatch.delenv(TUNE_ENV, raising=False)
    monkeypatch.delenv("LLMOPT_KERNEL", raising=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_choice_ignores_the_clock(variant, random_clock):
    first = _choices(_module(variant))
    clear_kernel_cache()
    assert _choices(_module(variant)) == first
    module = _module(variant)
    for bucket, name in first.items():
        assert name == rule_kernel(module.kind, module.device_class, bucket, module.table(), module.reference_kernel())


def test_rule_picks_a_kernel_of_the_table_for_every_kind_and_bucket():
    for variant in VARIANTS:
        module = _module(variant)
        table, ref = module.table(), module.reference_kernel()
        for device in ("cpu", "cpu-slow-bf16"):
            for bucket in (1 << e for e in range(14)):
                name = rule_kernel(module.kind, device, bucket, table, ref)
                assert name in table and (name != ref or len(table) == 1), (variant, device, bucket, name)


def test_rule_rows_name_real_kernels(monkeypatch):
    """A misspelt kernel in _RULES would silently fall through to the fallback: every name must exist."""
    names: dict[str, set[str]] = {}
    for setting in ("0", "1"):  # torch's tables, and vnni's where this CPU runs it
        monkeypatch.setenv(VNNI_ENV, setting)
        for variant in VARIANTS:
            module = _module(variant)
            names.setdefault(module.kind, set()).update(module.table())
    if vnni.unavailable() is None:
        assert {"int4", "int8", "w8a8"} <= {kind for kind, ks in names.items() if "vnni" in ks}
    else:  # the rows cannot be checked against a module here
        names = {kind: ks | {"vnni"} for kind, ks in names.items()}
    for (kind, device), rows in linear._RULES.items():
        assert device in ("cpu", "cpu-slow-bf16", "cuda")
        assert rows[-1][0] == ANY_M, (kind, device)  # the last row covers every M: no bucket left to the fallback
        for _, name in rows:
            assert name in names[kind], (kind, device, name)


@pytest.mark.parametrize("bf16_fast", [True, False])
def test_decode_and_prefill_kernels_on_cpu(bf16_fast, monkeypatch):
    """The measured CPU rule (bench/kernel_choice.py): the low-bit kernel for decode; bf16 dequant for long
    prefills only where bf16 matmuls are fast."""
    monkeypatch.setattr(linear, "fast_bf16", lambda device: bf16_fast)
    prefill = "dequant-bf16" if bf16_fast else None
    for variant, low_bit in (("int4", "int4pack"), ("int8 per-ch", "int8pack")):
        used = _choices(_module(variant))
        assert used[1] == low_bit and used[1024] == (prefill or low_bit), (variant, used)
    assert set(_choices(_module("w8a8")).values()) == {"int_mm"}


def test_same_choice_in_another_process(random_clock):
    code = ("import json, torch; from tests.runtime.test_kernel_rule import _module, _choices; "
            "print(json.dumps({v: _choices(_module(v)) for v in ('int4', 'int8 per-ch', 'w8a8')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2]).stdout
    theirs = {v: {int(b): k for b, k in c.items()} for v, c in json.loads(out).items()}
    assert theirs == {v: _choices(_module(v)) for v in theirs}


def test_tuned_choice_is_timed_once_and_read_back(monkeypatch, tmp_path, random_clock):
    monkeypatch.setenv("LLMOPT_HOME", str(tmp_path))
    monkeypatch.setenv(TUNE_ENV, "1")
    clear_kernel_cache()
    first = _choices(_module("int4"))
    stored = json.loads((tmp_path / "kernels.json").read_text())
    assert len(stored) == len({linear._bucket(m) for m in MS}) and set(stored.values()) <= set(first.values())
    clear_kernel_cache()  # a new process: the file, not memory, must give the same answer under another clock
    monkeypatch.setattr(linear, "_time", lambda fn, device: random.random())
    assert _choices(_module("int4")) == first
    clear_kernel_cache()
