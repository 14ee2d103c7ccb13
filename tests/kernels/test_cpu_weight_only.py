"""Tests for llmcompress/kernels/cpu_weight_only.py: the packed CPU ops against their own reference, against the
references of the formats they were converted from (`linear_w8a16_reference`, `linear_w4a16_reference`) and a
float64 dequantized matmul; their errors; Inductor's lowering of them; their cost."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels  # noqa: F401  (registers the ops)
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.formats import cpu_packed
from llmcompress.formats import quantized as formats
from llmcompress.kernels.cpu_weight_only import linear_w4a16_cpu_reference, linear_w8a16_cpu_reference
from llmcompress.kernels.int4_linear import linear_w4a16_reference
from llmcompress.kernels.int8_linear import linear_w8a16_reference
from llmcompress.testing.numerics import random_activations

W8 = torch.ops.llmcompress.linear_w8a16_cpu.default
W4 = torch.ops.llmcompress.linear_w4a16_cpu.default

# Tolerance on max |y - y_ref| relative to max |y_ref|. Against the op's own reference (same stored scales) the
# kernels differ by the output's rounding, x * act_scale rounded to x's dtype and the bias added after rounding
# (bf16: 2**-8 each); against the source format's reference also by the scales held in x's dtype (bf16: 2**-9
# relative per scale; int4's zero_float = (8 - z) * s rounded too). fp32 differs only by the sum order over K.
DTYPE_TOLS = [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (N, K): N and K not multiples of 64; int8 needs K % 16 == 0, int4 N % 16 == 0 and K % group_size == 0.
W8_SHAPES = [(33, 80), (100, 208), (64, 2048)]
W4_SHAPES = [(48, 96, 32), (80, 192, 64), (16, 384, 128)]


def _close(y, ref, tol):
    y, ref = y.double(), ref.double()
    err = (y - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), (err, ref.abs().max().item())


def _w8(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = formats.quantize_int8_per_channel(torch.randn(n, k, generator=g) / k**0.5)
    return q, s, cpu_packed.pack_int8_for_cpu(q, s, dtype)


def _w4(n, k, group_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s, z = formats.quantize_int4_rtn(torch.randn(n, k, generator=g) / k**0.5, group_size)
    return (q, s, z), cpu_packed.pack_int4_for_cpu(q, s, z, group_size, dtype)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", W8_SHAPES)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias+act_scale"])
def test_w8a16_cpu_matches_references(n, k, m, dtype, tol, extras):
    q, s, (qp, sp) = _w8(n, k, dtype)
    x, bias, act = random_activations((m, k), dtype, extras, extras, n)
    y = W8(x, qp, sp, bias, act)
    assert y.dtype == dtype and y.shape == (m, n)
    _close(y, linear_w8a16_cpu_reference(x, qp, sp, bias, act), tol)
    _close(y, linear_w8a16_reference(x, q, s, bias, act), tol)
    h = x.double() * (act.double() if act is not None else 1)
    ref64 = h @ (q.double() * s.double()[:, None]).T + (bias.double() if bias is not None else 0)
    _close(y, ref64, tol)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k,group_size", W4_SHAPES)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias+act_scale"])
def test_w4a16_cpu_matches_references(n, k, group_size, m, dtype, tol, extras):
    (q, s, z), (qp, sz) = _w4(n, k, group_size, dtype)
    x, bias, act = random_activations((m, k), dtype, extras, extras, n)
    y = W4(x, qp, sz, group_size, bias, act)
    assert y.dtype == dtype and y.shape == (m, n)
    _close(y, linear_w4a16_cpu_reference(x, qp, sz, group_size, bias, act), tol)
    _close(y, linear_w4a16_reference(x, q, s, z, group_size, bias, act), tol)
    h = x.double() * (act.double() if act is not None else 1)
    w = formats.dequantize_int4(q, s, z, group_size).double()
    _close(y, h @ w.T + (bias.double() if bias is not None else 0), tol)


def test_leading_dims_and_empty_rows():
    _q, _s, (qp, sp) = _w8(33, 80, torch.bfloat16)
    x = torch.randn(2, 3, 80, dtype=torch.bfloat16)
    y = W8(x, qp, sp)
    assert y.shape == (2, 3, 33)
    _close(y, linear_w8a16_cpu_reference(x, qp, sp), 1.6e-2)
    assert W8(x[:, :0], qp, sp).shape == (2, 0, 33)


def test_w8_refuses_what_torch_kernel_cannot_take():
    q, s, (qp, sp) = _w8(33, 80, torch.bfloat16)
    x = torch.randn(1, 80, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scales must be in x's dtype"):
        W8(x, qp, s)  # float32 scale with bf16 x: torch's kernel wants x's dtype
    q7 = torch.randint(-127, 128, (33, 72), dtype=torch.int8)  # K = 72: 8 % 16
    with pytest.raises(ValueError, match="not a multiple of 16.*use linear_w8a16"):
        W8(torch.randn(1, 72, dtype=torch.bfloat16), q7, sp)
    with pytest.raises(ValueError, match="pack_int8_for_cpu: K=72"):
        cpu_packed.pack_int8_for_cpu(q7, s, torch.bfloat16)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        cpu_packed.pack_int8_for_cpu(q, s, torch.float64)


def test_w4_refuses_what_torch_kernel_cannot_take():
    (_q, _s, _z), (qp, sz) = _w4(48, 96, 32, torch.float32)
    x = torch.randn(1, 96)
    with pytest.raises(ValueError, match=r"scales_and_zeros must be \(K // group_size, N, 2\)"):
        W4(x, qp, sz[:, :, :1], 32)
    with pytest.raises(ValueError, match="group_size 48 must be one of"):
        W4(x, qp, sz, 48)
    (q40, s40, z40), _ = _w4(48, 96, 32, torch.float32)
    with pytest.raises(ValueError, match="N=40 is not a multiple of 16"):
        cpu_packed.pack_int4_for_cpu(q40[:40], s40[:40], z40[:40], 32, torch.float32)


def test_inductor_calls_torch_kernels_and_fuses_around_them():
    """Under torch.compile the ops' bodies are inlined: Inductor sees aten._weight_int8pack_mm (an extern call) and
    fuses the bias add with the next pointwise op; results equal eager's up to that fusion's skipped bf16 roundings."""
    from torch._inductor.utils import run_and_get_code

    _, _, (qp, sp) = _w8(48, 96, torch.bfloat16)
    (_, _, _), (q4, sz) = _w4(48, 96, 32, torch.bfloat16)
    x, bias, act = random_activations((3, 96), torch.bfloat16, True, True, 48)

    def f(x):
        return torch.relu(W8(x, qp, sp, bias, act)) + W4(x, q4, sz, 32, bias, None)

    out, (code, *_) = run_and_get_code(torch.compile(f, backend="inductor"), x)
    torch.testing.assert_close(out, f(x), atol=2e-2, rtol=1.6e-2)
    assert "_weight_int8pack_mm" in code and "_weight_int4pack_mm" in code
    assert "llmcompress" not in code.replace("linear_w8a16_cpu", "").replace("linear_w4a16_cpu", "")


def test_cost_counts_packed_bytes():
    """One decode row through a 2048 x 5632 weight: int8 counts N·K + 2N bytes of weight and bf16 scales, int4
    N·K/2 + (K/128)·N·2·2 of codes, scales and zeros; plus the bf16 activations in and out."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    n, k, e = 5632, 2048, 2
    with FakeTensorMode():
        x = torch.empty(1, k, dtype=torch.bfloat16)
        q8, s8 = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=torch.bfloat16)
        q4, sz = torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // 128, n, 2, dtype=torch.bfloat16)
        g8 = make_fx(lambda x, q, s: W8(x, q, s), tracing_mode="fake")(x, q8, s8)
        g4 = make_fx(lambda x, q, s: W4(x, q, s, 128), tracing_mode="fake")(x, q4, sz)
    model = CostModel(HARDWARE["cpu"])
    (c8,) = [model.node_cost(nd) for nd in g8.graph.nodes if nd.target is W8]
    (c4,) = [model.node_cost(nd) for nd in g4.graph.nodes if nd.target is W4]
    act = (k + n) * e
    assert int(c8.bytes) == n * k + n * e + act and int(c8.flops) == 2 * n * k
    assert int(c4.bytes) == n * k // 2 + (k // 128) * n * 2 * e + act and int(c4.flops) == 2 * n * k
