"""Decode reading the cache in place (attention.KeyRun, PagedKVCache.attend_in_place) against independent
references: slots from the positional block table one position at a time, attention in float64 over keys gathered
position by position and dequantized with kv_format.dequantize; and the rule that picks the read path."""

from __future__ import annotations

import random

import pytest
import torch

from llmopt.engine.attention import KeyRun, LayerSpec, PagedKVCache, key_runs
from llmopt.engine.kv_format import dequantize, fp8_dtype, resolve_kv_format
from llmopt.engine.model_runner import IN_PLACE_MIN_CONTEXT, read_in_place
from tests.helpers.attention import reference_attention, slots_of

FORMATS = ["float32", "bfloat16", "int8"] + (["fp8_e4m3"] if fp8_dtype() is not None else [])


@pytest.mark.parametrize("seed", range(200))
def test_key_runs_cover_exactly_the_visible_slots(seed):
    rng = random.Random(seed)
    bs, nb = rng.choice([1, 2, 4, 16]), rng.randint(1, 12)
    table = rng.sample(range(3 * nb), nb) if seed % 2 else list(range(5, 5 + nb))
    if nb > 2 and seed % 3 == 0:  # a run of consecutive blocks in the middle of a scattered table
        table[nb // 2] = table[nb // 2 - 1] + 1 if table[nb // 2 - 1] + 1 not in table else table[nb // 2]
    last = rng.randrange(nb * bs)
    first = rng.randint(0, last)
    runs = key_runs(table, bs, first, last)
    assert [s for r in runs for s in range(r.slot, r.slot + r.length)] == slots_of(table, bs, first, last)
    # maximal: two runs never join up
    assert all(a.slot + a.length != b.slot for a, b in zip(runs, runs[1:]))


def test_one_prefilled_sequence_is_one_run_plus_its_grown_block():
    table = list(range(10, 18)) + [40]  # prefilled into 8 consecutive blocks, then grew by block 40
    assert key_runs(table, 4, 0, 32) == [KeyRun(40, 32), KeyRun(160, 1)]
    assert key_runs(table, 4, 30, 32) == [KeyRun(70, 2), KeyRun(160, 1)]  # a window of 3 keys


def stored(cache: PagedKVCache, kv: int, layer: int, slots: list[int]) -> torch.Tensor:
    """The float64 values the cache holds at these flat slots, dequantized by the reference dequantize."""
    pool = (cache.k, cache.v)[kv][layer]
    flat = pool.view(-1, *pool.shape[2:])[slots]  # [S, Hkv, D]
    if not cache.fmt.scaled:
        return flat.double()
    scales = (cache.k_scale, cache.v_scale)[kv][layer]
    factor = 1.0 if cache.static is None else cache.static[layer][kv]
    return dequantize(flat, scales.view(-1, scales.shape[2])[slots], torch.float64, factor)


@pytest.mark.parametrize("kv, static", [(f, False) for f in FORMATS] + [(f, True) for f in FORMATS[2:]])
@pytest.mark.parametrize("heads, kv_heads, dk, dv", [(4, 2, 16, 16), (3, 3, 8, 8), (4, 1, 12, 6)])  # GQA, MHA, MLA
@pytest.mark.parametrize("softcap", [None, 0.5])
def test_in_place_attention_equals_float64_over_gathered_keys(kv, static, heads, kv_heads, dk, dv, softcap):
    torch.manual_seed(0)
    fmt, bs = resolve_kv_format(kv, torch.float32), 4
    spec = LayerSpec(kv_heads, dk, dv, softcap=softcap)
    scales = [(0.05, 0.04)] if static else None
    cache = PagedKVCache.allocate([spec], 24, bs, fmt, torch.device("cpu"), scales)
    table = [7, 8, 9, 2, 3, 15, 20]  # three runs of blocks
    n = 26  # positions 0..25
    slots = torch.tensor(slots_of(table, bs, 0, n - 1))
    cache.write(0, slots, torch.randn(n, kv_heads, dk), torch.randn(n, kv_heads, dv))
    q = torch.randn(heads, dk)
    for first in (0, 9, 25):  # all keys, a window inside the second run, only the newest key
        runs = key_runs(table, bs, first, n - 1)
        got = cache.attend_in_place(0, q, runs, dk ** -0.5, softcap)  # [H, Dv]
        keep = slots_of(table, bs, first, n - 1)
        want = reference_attention(q.double(), stored(cache, 0, 0, keep), stored(cache, 1, 0, keep), dk ** -0.5,
                                   softcap)
        assert got.shape == (heads, dv) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_read_path_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert read_in_place(cpu, [10])  # one sequence: nothing to batch
    assert read_in_place(cpu, [IN_PLACE_MIN_CONTEXT] * 8)
    assert not read_in_place(cpu, [IN_PLACE_MIN_CONTEXT - 1] * 8)
    assert not read_in_place(cuda, [4096] * 16)
    assert read_in_place(cpu, [IN_PLACE_MIN_CONTEXT * 2 - 10, 10])  # the mean decides
