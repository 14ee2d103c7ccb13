"""Tests for llmcompress/kernels/grouped_linear.py: the grouped (MoE expert) int4 / int8 ops against their
references, on uneven expert loads (an expert with no rows, rows past offs[-1]), per-expert act_scale, and the
input checks."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels.grouped_linear as grouped  # registers the grouped ops
from llmcompress.formats import quantized as formats
from llmcompress.testing.devices import DEVICE

W4 = torch.ops.llmcompress.grouped_linear_w4a16.default
W8 = torch.ops.llmcompress.grouped_linear_w8a16.default
E, N, K, T = 4, 40, 96, 37
# Expert 1 gets no rows; rows 33..36 are past offs[-1] (transformers pads there) and must come out zero.
OFFS = [11, 11, 24, 33]
TOLS = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, N, K, generator=g) / K**0.5


def _x(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(T, K, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)


@pytest.mark.parametrize("with_act_scale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_grouped_w4a16_matches_reference_and_float64(dtype, with_act_scale):
    w = _weights(0)
    parts = [formats.quantize_int4_rtn(w[e], 32) for e in range(E)]
    qweight, scales, zeros = (torch.stack(p).to(DEVICE) for p in zip(*parts))
    act = (0.5 + torch.rand(E, K, generator=torch.Generator().manual_seed(3))).to(DEVICE) if with_act_scale \
        else None
    offs = torch.tensor(OFFS, dtype=torch.int32, device=DEVICE)
    x = _x(dtype)
    y = W4(x, qweight, scales, zeros, 32, offs, act)
    ref = grouped.grouped_linear_w4a16_reference(x, qweight, scales, zeros, 32, offs, act)
    assert y.dtype == dtype and y.shape == (T, N)
    torch.testing.assert_close(y.float(), ref.float(), rtol=TOLS[dtype], atol=TOLS[dtype])
    # Independently, in float64: each expert's rows times its dequantized (and act-scaled) weight.
    start = 0
    for e, end in enumerate(OFFS):
        wq = formats.dequantize_int4(qweight[e].cpu(), scales[e].cpu(), zeros[e].cpu(), 32).double()
        xe = x[start:end].cpu().double() * (1.0 if act is None else act[e].cpu().double())
        torch.testing.assert_close(y[start:end].cpu().double(), xe @ wq.T, rtol=TOLS[dtype], atol=TOLS[dtype])
        start = end
    assert bool((y[OFFS[-1]:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_w8a16_matches_reference(dtype):
    w = _weights(1)
    parts = [formats.quantize_int8_per_channel(w[e]) for e in range(E)]
    qweight, scale = (torch.stack(p).to(DEVICE) for p in zip(*parts))
    offs = torch.tensor(OFFS, dtype=torch.int64, device=DEVICE)
    x = _x(dtype)
    y = W8(x, qweight, scale, offs)
    ref = grouped.grouped_linear_w8a16_reference(x, qweight, scale, offs)
    torch.testing.assert_close(y.float(), ref.float(), rtol=TOLS[dtype], atol=TOLS[dtype])
    assert bool((y[:OFFS[0]] != 0).any()) and bool((y[OFFS[-1]:] == 0).all())


def test_grouped_ops_reject_bad_inputs():
    w = _weights(2)
    parts = [formats.quantize_int4_rtn(w[e], 32) for e in range(E)]
    qweight, scales, zeros = (torch.stack(p).to(DEVICE) for p in zip(*parts))
    offs = torch.tensor(OFFS, dtype=torch.int32, device=DEVICE)
    x = _x(torch.float32)
    with pytest.raises(ValueError, match="act_scale"):
        W4(x, qweight, scales, zeros, 32, offs, torch.ones(E, K // 2, device=DEVICE))
    with pytest.raises(ValueError, match="offs"):
        W4(x, qweight, scales, zeros, 32, offs[:2], None)
    with pytest.raises(ValueError, match="tokens, K"):
        W4(x[None], qweight, scales, zeros, 32, offs, None)
