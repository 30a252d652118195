"""Bit packing against independent references: compressed-tensors' own packer and hand-built words."""

from __future__ import annotations

import pytest
import torch

from llmopt.checkpoint.formats.packing import (awq_deinterleave, awq_interleave, pack_bits, pack_nibbles, unpack_bits,
                                          unpack_nibbles)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(5, 64), (7, 40), (3, 129)])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_and_matches_compressed_tensors(bits, shape, dim):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    torch.manual_seed(bits)
    q = torch.randint(0, 1 << bits, shape)
    packed = pack_bits(q, bits, dim)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_bits(packed, bits, shape[dim], dim).long(), q)
    ref = pack_to_int32((q - (1 << (bits - 1))).to(torch.int8), bits, packed_dim=dim)
    assert torch.equal(packed, ref)


def test_gptq_3bit_words_follow_10_1_10_1_10():
    torch.manual_seed(0)
    v = torch.randint(0, 8, (32,)).tolist()
    a = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] & 3) << 30)
    b = (v[10] >> 2) | sum(v[11 + j] << (3 * j + 1) for j in range(10)) | ((v[21] & 1) << 31)
    c = (v[21] >> 1) | sum(v[22 + j] << (3 * j + 2) for j in range(10))
    expect = [w - (1 << 32) if w >= 1 << 31 else w for w in (a, b, c)]
    packed = pack_bits(torch.tensor(v).view(32, 1), 3, dim=0)  # GPTQ packs along the input rows
    assert packed.view(-1).tolist() == expect


def test_gptq_4bit_symmetric_zero_word():
    zeros_minus_one = torch.full((1, 8), 7)  # v1 stores zero - 1 = 7 for 4-bit symmetric
    assert pack_bits(zeros_minus_one, 4, dim=1).item() == 0x77777777


def test_awq_interleave_order():
    cols = torch.arange(8).view(1, 8)
    word = pack_bits(awq_interleave(cols), 4, dim=1).item()
    assert word == 0x75316420  # nibble k holds column [0, 2, 4, 6, 1, 3, 5, 7][k]
    q = torch.randint(0, 16, (3, 32))
    assert torch.equal(awq_deinterleave(awq_interleave(q)), q)


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (4, 10), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_bad_codes_rejected():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([[16]]), 4, dim=1)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, 3, dtype=torch.int32), 4, 8, dim=1)
