"""Tests for llmcompress/formats/cpu_packed.py: our int8 / int4 formats converted to torch's CPU layouts dequantize
to the same weights (exactly in float32), the unpacking inverts the packing, and refused shapes say why."""

from __future__ import annotations

import pytest
import torch

from llmcompress.formats import cpu_packed
from llmcompress.formats import quantized as formats


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (80, 160), (128, 256)])
def test_int4_unpack_inverts_torch_packing(n, k):
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    ones, zeros = torch.ones(n, k // 32, dtype=torch.float16), torch.zeros(n, k // 32, dtype=torch.float16)
    packed, _ = cpu_packed.pack_int4_for_cpu(formats.pack_int4(q), ones, zeros, 32, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert torch.equal(cpu_packed.unpack_int4_for_cpu(packed, n, k), q)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_zero_conversion_is_exact_in_float32(group_size):
    """Ours: (q - zero) * scale; torch's: (q - 8) * scale + zero_float, zero_float = (8 - zero) * scale."""
    n, k = 48, 384
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    q, s, z = formats.quantize_int4_rtn(w, group_size)
    assert z.min() < 8 < z.max()  # zeros on both sides of torch's 8
    packed, sz = cpu_packed.pack_int4_for_cpu(q, s, z, group_size, torch.float32)
    assert sz.shape == (k // group_size, n, 2) and sz.dtype == torch.float32
    assert torch.equal(cpu_packed.dequantize_int4_cpu(packed, sz, group_size),
                       formats.dequantize_int4(q, s, z, group_size))


def test_int4_scales_in_bfloat16_round_once():
    n, k, gs = 32, 128, 32
    q, s, z = formats.quantize_int4_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(1)), gs)
    _, sz = cpu_packed.pack_int4_for_cpu(q, s, z, gs, torch.bfloat16)
    exact = torch.stack((s.float(), (8 - z.float()) * s.float()), dim=-1).transpose(0, 1)
    assert torch.equal(sz, exact.to(torch.bfloat16))


def test_int8_keeps_codes_and_casts_scale():
    q, s = formats.quantize_int8_per_channel(torch.randn(33, 48))
    qp, sp = cpu_packed.pack_int8_for_cpu(q, s, torch.float16)
    assert torch.equal(qp, q) and sp.dtype == torch.float16 and torch.equal(sp, s.to(torch.float16))


def test_unsupported_shapes_say_why():
    assert cpu_packed.int8_cpu_unsupported(33, 80) is None
    assert "multiple of 16" in cpu_packed.int8_cpu_unsupported(33, 72)
    assert cpu_packed.int4_cpu_unsupported(48, 96, 32) is None
    assert "N=40" in cpu_packed.int4_cpu_unsupported(40, 96, 32)
    assert "group_size 64" in cpu_packed.int4_cpu_unsupported(48, 96, 64)
