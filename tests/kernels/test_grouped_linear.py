"""Tests for llmcompress/kernels/grouped_linear.py: the grouped (MoE expert) int4 / int8 ops against a float64
computation from each expert's dequantized weight (formats/quantized.py), through the CPU op and through the
Triton launchers (the interpreter on CPU), on uneven expert loads (an expert with no rows, one on the FMA GEMV,
one on the tensor-core GEMV, one on the GEMM, rows past offs[-1]), per-expert act_scale, and the input checks."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import llmcompress.kernels.grouped_linear as grouped  # registers the grouped ops
from llmcompress.formats import quantized as formats
from llmcompress.kernels import int4_linear, int8_linear
from llmcompress.testing.devices import DEVICE, HAS_CUDA, needs_triton

W4 = torch.ops.llmcompress.grouped_linear_w4a16.default
W8 = torch.ops.llmcompress.grouped_linear_w8a16.default
E, N, K = 4, 40, 96  # N, K not multiples of the interpreter's blocks (BLOCK_N 32, BLOCK_K 64 / 32)
# Rows per expert 3 (GEMV on FMAs), 0, 19 (GEMM), 11 (GEMV padded to 16 rows, tl.dot); rows 33..36 are past
# offs[-1] (transformers pads there) and must come out zero.
OFFS = [3, 3, 22, 33]
T = 37
# Outputs ~N(0, 1), |y| <= ~4. fp32: sums over K = 96 in fp32. fp16/bf16: one rounding of the output, and on the
# tensor-core paths of x * act_scale and the dequantized weight to x.dtype. Under TRITON_INTERPRET=1 tl.dot runs
# on operands upcast to fp32 (linear_common.dot_fp32) where a GPU runs fp16/bf16 tensor cores, and the interpreter
# truncates fp32 -> bf16 (a GPU rounds to nearest): up to one more bf16 ulp (1.6e-2 at 2..4).
TOLS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, N, K, generator=g) / K**0.5


def _x(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(T, K, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)


def _route(monkeypatch, path: str) -> list:
    """path "op": the op as it runs here (the reference on CPU, the kernels on a GPU). "triton": the single-matrix
    ops' CPU kernels call the Triton launchers instead of their references, so the grouped op runs the kernels under
    the interpreter; returns the list the launchers' calls are recorded in."""
    calls: list = []
    if path == "op":
        return calls
    if HAS_CUDA:
        pytest.skip("on a GPU the op runs the Triton launchers already")
    for module, name, launcher in ((int4_linear, "linear_w4a16_reference", int4_linear.linear_w4a16_triton),
                                   (int8_linear, "linear_w8a16_reference", int8_linear.linear_w8a16_triton)):
        reference = getattr(module, name)

        def route(x, *args, _reference=reference, _launcher=launcher):
            if isinstance(x, FakeTensor):
                return _reference(x, *args)
            calls.append(x.shape[0])
            return _launcher(x, *args)

        monkeypatch.setattr(module, name, route)
    return calls


def _check_by_expert(y, x, dequantized, act, dtype):
    """Each expert's rows against x_e (* act_scale[e]) @ W_e.T in float64; the rows past offs[-1] exactly zero."""
    assert y.dtype == dtype and y.shape == (T, N)
    start = 0
    for e, end in enumerate(OFFS):
        xe = x[start:end].cpu().double() * (1.0 if act is None else act[e].cpu().double())
        expected = xe @ dequantized[e].double().T
        torch.testing.assert_close(y[start:end].cpu().double(), expected, rtol=TOLS[dtype], atol=TOLS[dtype],
                                   msg=lambda m, e=e: f"expert {e}: {m}")
        start = end
    assert bool((y[OFFS[-1]:] == 0).all())


@pytest.mark.parametrize("path", ["op", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("with_act_scale", [False, True], ids=["plain", "act_scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grouped_w4a16_matches_float64_per_expert(monkeypatch, dtype, with_act_scale, path):
    calls = _route(monkeypatch, path)
    w = _weights(0)
    parts = [formats.quantize_int4_rtn(w[e], 32) for e in range(E)]
    qweight, scales, zeros = (torch.stack(p).to(DEVICE) for p in zip(*parts))
    act = (0.5 + torch.rand(E, K, generator=torch.Generator().manual_seed(3))).to(DEVICE) if with_act_scale \
        else None
    offs = torch.tensor(OFFS, dtype=torch.int32, device=DEVICE)
    x = _x(dtype)
    y = W4(x, qweight, scales, zeros, 32, offs, act)
    dequantized = [formats.dequantize_int4(*(t[e].cpu() for t in (qweight, scales, zeros)), 32) for e in range(E)]
    _check_by_expert(y, x, dequantized, act, dtype)
    assert calls == ([] if path == "op" else [3, 19, 11])  # one launch per expert with rows
    if path == "op":
        ref = grouped.grouped_linear_w4a16_reference(x, qweight, scales, zeros, 32, offs, act)
        _check_by_expert(ref, x, dequantized, act, dtype)


@pytest.mark.parametrize("path", ["op", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grouped_w8a16_matches_float64_per_expert(monkeypatch, dtype, path):
    calls = _route(monkeypatch, path)
    w = _weights(1)
    parts = [formats.quantize_int8_per_channel(w[e]) for e in range(E)]
    qweight, scale = (torch.stack(p).to(DEVICE) for p in zip(*parts))
    offs = torch.tensor(OFFS, dtype=torch.int64, device=DEVICE)
    x = _x(dtype)
    y = W8(x, qweight, scale, offs)
    dequantized = [formats.dequantize_int8(qweight[e].cpu(), scale[e].cpu()) for e in range(E)]
    _check_by_expert(y, x, dequantized, None, dtype)
    assert calls == ([] if path == "op" else [3, 19, 11])
    if path == "op":
        _check_by_expert(grouped.grouped_linear_w8a16_reference(x, qweight, scale, offs), x, dequantized, None,
                         dtype)


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
