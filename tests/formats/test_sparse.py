"""Tests for llmcompress/formats/sparse.py: 2:4 and int4 + 2:4 pack/unpack round trips, the metadata layout, errors."""

from __future__ import annotations

import pytest
import torch

from llmcompress.formats import quantized as q4
from llmcompress.formats.sparse import meta_columns, pack_2of4, pack_2of4_int4, unpack_2of4, unpack_2of4_int4
from llmcompress.testing.numerics import random_2of4_mask

# N odd; K with K % 8 == 4 (a half-filled last metadata byte) and K % 8 == 0.
SHAPES = [(1, 4), (7, 12), (33, 64), (5, 100)]


def _pruned(n, k, dtype, seed=0, keep_fewer=False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) + 0.1).to(dtype)  # + 0.1: no kept value rounds to exactly 0
    w[w == 0] = 1.0
    return w * random_2of4_mask(n, k, seed, keep_fewer)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keep_fewer", [False, True])
def test_round_trip(n, k, dtype, keep_fewer):
    w = _pruned(n, k, dtype, keep_fewer=keep_fewer)
    values, meta = pack_2of4(w)
    assert values.dtype == dtype and tuple(values.shape) == (n, k // 2)
    assert meta.dtype == torch.uint8 and tuple(meta.shape) == (n, meta_columns(k)) == (n, (k + 4) // 8)
    assert torch.equal(unpack_2of4(values, meta, k), w)
    # The kept values are the non-zeros, in K order.
    if not keep_fewer:
        assert torch.equal(values, w[w != 0].reshape(n, k // 2))


@pytest.mark.parametrize("n,k", SHAPES)
def test_every_row_keeps_exactly_two_of_four(n, k):
    """A layer pruned to exactly 2 of 4 comes back from its stored form with exactly two non-zeros per group."""
    w = _pruned(n, k, torch.bfloat16, seed=3)
    dense = unpack_2of4(*pack_2of4(w), k)
    assert ((dense.reshape(n, k // 4, 4) != 0).sum(-1) == 2).all()


def test_metadata_layout():
    """Group 0 keeps positions 1, 3 (nibble 0b1101 = 13, low), group 1 keeps 0, 2 (0b1000 = 8, high); group 2 keeps
    only position 2, so its nibble fills the lowest free position 0: (0, 2) -> 8, in the next byte's low nibble."""
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 5.0, 0.0]])
    values, meta = pack_2of4(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0, 0.0, 5.0]]
    assert meta.tolist() == [[13 | (8 << 4), 8]]


def test_errors():
    with pytest.raises(ValueError, match=r"K must be a multiple of 4 .* got K=6"):
        pack_2of4(torch.ones(2, 6))
    w = _pruned(3, 16, torch.float32)
    w[1, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 1, group 2 \(k = 8..11\) has 3 non-zeros; at most 2"):
        pack_2of4(w)
    with pytest.raises(ValueError, match=r"w must be a 2-D \(N, K\) tensor of"):
        pack_2of4(torch.ones(2, 8, dtype=torch.int32))
    values, meta = pack_2of4(_pruned(3, 16, torch.float32))
    with pytest.raises(ValueError, match=r"meta must be uint8 \(N, ceil\(K / 8\)\) = \(3, 2\)"):
        unpack_2of4(values, meta[:, :1], 16)
    with pytest.raises(ValueError, match=r"K must be a multiple of 4"):
        unpack_2of4(values, meta, 18)


def _int4_case(n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    mask = random_2of4_mask(n, k, seed)
    scales = (0.5 + torch.rand(n, k // group_size, generator=g)).half()
    zeros = torch.randint(0, 16, (n, k // group_size), generator=g).half()
    return codes, mask, scales, zeros


@pytest.mark.parametrize("n,k,group_size", [(1, 32, 32), (7, 128, 64), (33, 384, 128), (5, 96, 32)])
def test_int4_round_trip(n, k, group_size):
    codes, mask, scales, zeros = _int4_case(n, k, group_size)
    qvalues, meta, s, z = pack_2of4_int4(codes, mask, scales, zeros, group_size)
    assert qvalues.dtype == torch.uint8 and tuple(qvalues.shape) == (n, k // 4)
    assert s is scales and z is zeros
    # Oracle: the int4 format's own dequantization of all codes, masked.
    want = q4.dequantize_int4(q4.pack_int4(codes), scales, zeros, group_size) * mask
    for dtype in (torch.float32, torch.bfloat16):
        got = unpack_2of4_int4(qvalues, meta, scales, zeros, group_size, k, dtype)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    # Same metadata as the float format for the same mask; codes in K order, the first in the low nibble.
    assert torch.equal(meta, pack_2of4(mask.float())[1])
    kept = codes[mask].reshape(n, k // 4, 2)
    assert torch.equal(qvalues, kept[..., 0] | (kept[..., 1] << 4))


def test_int4_errors():
    codes, mask, scales, zeros = _int4_case(3, 64, 32)
    bad = mask.clone()
    bad[2, 4:8] = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError, match=r"exactly 2 of every 4: row 2, group 1 keeps 3"):
        pack_2of4_int4(codes, bad, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales must be float16 \(N, K // group_size\) = \(3, 2\)"):
        pack_2of4_int4(codes, mask, scales.float(), zeros, 32)
    with pytest.raises(ValueError, match=r"group_size must be one of"):
        pack_2of4_int4(codes, mask, scales, zeros, 16)
    with pytest.raises(ValueError, match=r"kept codes must be in \[0, 15\]"):
        pack_2of4_int4(codes.int() + 16 * mask, mask, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"K must be a multiple of 4"):
        pack_2of4_int4(codes[:, :62], mask[:, :62], scales, zeros, 32)
    with pytest.raises(ValueError, match=r"codes must be a 2-D \(N, K\) integer tensor"):
        pack_2of4_int4(codes.float(), mask, scales, zeros, 32)
