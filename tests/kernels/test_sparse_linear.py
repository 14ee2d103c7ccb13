"""Tests for llmcompress/kernels/sparse_linear.py: the 2:4 and int4 + 2:4 GEMV and GEMM against float64 oracles, the
launcher's choice by rows, the references, the custom ops (== masked dense linear), their costs and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import llmcompress.kernels.sparse_linear as s24  # registers the ops
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.formats.sparse import pack_2of4, pack_2of4_int4, unpack_2of4, unpack_2of4_int4
from llmcompress.testing.devices import (
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    dots_on_stored_dtype,
    needs_compiled_cuda,
    needs_triton,
)
from llmcompress.testing.numerics import random_2of4_mask

OP = torch.ops.llmcompress.linear_2of4.default
OP_W4 = torch.ops.llmcompress.linear_2of4_w4a16.default

# As test_int4_linear.py: outputs O(1), so fp16 ~4e-3 and bf16 ~3e-2 per ulp (the interpreter truncates bf16
# casts); fp32 differs from float64 only by fp32 sums.
DTYPE_TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 3e-3, 3e-3), (torch.bfloat16, 2e-2, 1.6e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (M, N, K, bias): N never a multiple of the interpreter's BLOCK_N = 32, K not a multiple of its BLOCK_K = 64 (and
# K % 8 == 4: a half-used last metadata byte), M across the GEMV buckets (1, 2, 4, 16 rows) and past 16.
GEMV_CASES = [(1, 33, 100, False), (2, 47, 132, True), (3, 33, 260, True), (16, 47, 196, False)]
GEMM_CASES = [(1, 33, 100, True), (17, 47, 260, False), (40, 33, 132, True)]
# int4 + 2:4: K a multiple of the group size, and of neither BLOCK_K nor 128 where the group allows.
W4_CASES = [(1, 33, 160, 32, False), (3, 47, 192, 64, True), (16, 33, 384, 128, True), (40, 47, 224, 32, True)]


def _sparse(n, k, dtype, device=DEVICE, seed=0):
    """A random 2:4 weight ~ N(0, 1/K) · 2, non-zero where kept (so outputs are O(1)), and its stored form."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (2 / k) ** 0.5
    w = torch.where(w == 0, 1e-3, w) * random_2of4_mask(n, k, seed)
    w = w.to(dtype)
    values, meta = pack_2of4(w)
    return w.to(device), values.to(device), meta.to(device)


def _sparse_w4(n, k, group_size, device=DEVICE, seed=0):
    """Random int4 codes kept 2 of 4, scales ~ 1/(5 sqrt(K / 2)), zeros in [0, 15]; the stored form."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = ((0.5 + torch.rand(n, k // group_size, generator=g)) / (5 * (k / 2) ** 0.5)).half()
    zeros = torch.randint(0, 16, (n, k // group_size), generator=g).half()
    stored = pack_2of4_int4(codes, random_2of4_mask(n, k, seed), scales, zeros, group_size)
    return tuple(t.to(device) for t in stored)


def _x(m, k, n, dtype, bias, device=DEVICE, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, b


def _oracle(x, w, bias):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def _check(path, m, n, k, has_bias, dtype, atol, rtol):
    w, values, meta = _sparse(n, k, dtype)
    x, bias = _x(m, k, n, dtype, has_bias)
    out = path(x, values, meta, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.double(), _oracle(x, w, bias), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GEMV_CASES, ids=str)
def test_gemv_matches_float64(case, dtype, atol, rtol):
    _check(s24._gemv, *case, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GEMM_CASES, ids=str)
def test_gemm_matches_float64(case, dtype, atol, rtol):
    _check(s24._gemm, *case, dtype, atol, rtol)


def _check_w4(path, m, n, k, group_size, has_bias, dtype, atol, rtol):
    qvalues, meta, scales, zeros = _sparse_w4(n, k, group_size)
    x, bias = _x(m, k, n, dtype, has_bias)
    out = path(x, qvalues, meta, scales, zeros, group_size, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    w = unpack_2of4_int4(qvalues.cpu(), meta.cpu(), scales.cpu(), zeros.cpu(), group_size, k, torch.float64)
    torch.testing.assert_close(out.double(), _oracle(x, w.to(x.device), bias), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("path,case", [("_gemv_w4", c) for c in W4_CASES if c[0] <= 16]
                         + [("_gemm_w4", c) for c in W4_CASES], ids=str)
def test_w4_paths_match_float64(path, case, dtype, atol, rtol):
    _check_w4(getattr(s24, path), *case, dtype, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
def test_dense_paths_match_float64(dtype, atol, rtol):
    """M >= dense_min_m: the weight expanded to x's dtype, then F.linear (both formats)."""
    _check(s24._dense, *GEMM_CASES[2], dtype, atol, rtol)
    _check_w4(s24._dense_w4, *W4_CASES[3], dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("path,case", [("_gemv", GEMV_CASES[3]), ("_gemm", GEMM_CASES[1])], ids=str)
def test_tensor_core_paths_on_fp16_operands(monkeypatch, path, case):
    # tl.dot on fp16 operands as rounded (UPCAST off): the GPU's numerics under the interpreter.
    launched = dots_on_stored_dtype(monkeypatch)
    _check(getattr(s24, path), *case, *DTYPE_TOLS[1])
    assert launched == [f"_s24{path}_kernel"]


@needs_triton
@pytest.mark.parametrize("m,gemv_max_m,dense_min_m,expected", [
    (1, 16, 2**62, "_gemv"), (16, 16, 2**62, "_gemv"), (5, 4, 2**62, "_gemm"), (17, 16, 2**62, "_gemm"),
    (1, 0, 2**62, "_gemm"), (17, 16, 17, "_dense"), (40, 16, 20, "_dense"), (19, 16, 20, "_gemm")])
def test_launcher_picks_kernel_by_rows(monkeypatch, m, gemv_max_m, dense_min_m, expected):
    called = []
    for name in ("_gemv", "_gemm", "_dense"):
        real = getattr(s24, name)
        monkeypatch.setattr(s24, name, lambda *a, _n=name, _r=real: called.append(_n) or _r(*a))
    w, values, meta = _sparse(33, 68, torch.float32)
    x, _ = _x(m, 68, 33, torch.float32, False)
    out = s24.linear_2of4_triton(x.view(m, 1, 68), values, meta, gemv_max_m=gemv_max_m, dense_min_m=dense_min_m)
    assert called == [expected] and out.shape == (m, 1, 33)
    torch.testing.assert_close(out.view(m, 33).double(), _oracle(x, w, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_equals_masked_dense_linear(dtype):
    """The compressed op computes what the masked dense linear computes (fp32 math, one rounding), on CPU bit for
    bit, for both formats."""
    w, values, meta = _sparse(33, 132, dtype, device="cpu")
    x, bias = _x(6, 132, 33, dtype, True, device="cpu")
    x = x.view(2, 3, 132)
    want = F.linear(x.float(), w.float(), bias.float()).to(dtype)
    assert torch.equal(OP(x, values, meta, bias), want)
    assert torch.equal(torch.ops.llmcompress.linear_2of4(x, values, meta, bias=bias, gemv_max_m=1), want)
    qvalues, meta4, scales, zeros = _sparse_w4(33, 128, 32, device="cpu")
    x4, _ = _x(6, 128, 33, dtype, False, device="cpu")
    w4 = unpack_2of4_int4(qvalues, meta4, scales, zeros, 32, 128)
    assert torch.equal(OP_W4(x4, qvalues, meta4, scales, zeros, 32, bias), F.linear(x4.float(), w4,
                                                                                     bias.float()).to(dtype))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_under_torch_compile_cpu(backend):
    _w, values, meta = _sparse(33, 68, torch.float32, device="cpu")
    x, bias = _x(3, 68, 33, torch.float32, True, device="cpu")
    out = torch.compile(lambda x: OP(x, values, meta, bias, 4) * 2.0, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, s24.linear_2of4_reference(x, values, meta, bias) * 2.0)


def test_op_fake_impl_shape_and_dtype():
    with FakeTensorMode():
        x = torch.empty(2, 7, 256, dtype=torch.bfloat16)
        out = OP(x, torch.empty(100, 128, dtype=torch.bfloat16), torch.empty(100, 32, dtype=torch.uint8))
        out4 = OP_W4(x, torch.empty(100, 64, dtype=torch.uint8), torch.empty(100, 32, dtype=torch.uint8),
                     torch.empty(100, 2, dtype=torch.float16), torch.empty(100, 2, dtype=torch.float16), 128)
    assert out.shape == out4.shape == (2, 7, 100) and out.dtype == out4.dtype == torch.bfloat16


def test_ops_opcheck_and_backward():
    w, values, meta = _sparse(33, 68, torch.float32, device="cpu")
    x, bias = _x(3, 68, 33, torch.float32, True, device="cpu")
    torch.library.opcheck(OP, (x.clone().requires_grad_(), values, meta, bias.clone().requires_grad_()))
    qvalues, meta4, scales, zeros = _sparse_w4(33, 64, 32, device="cpu")
    x4, _ = _x(3, 64, 33, torch.float32, False, device="cpu")
    torch.library.opcheck(OP_W4, (x4.requires_grad_(), qvalues, meta4, scales, zeros, 32, bias.requires_grad_()))
    xg = x.clone().requires_grad_()
    grad = torch.autograd.grad(OP(xg, values, meta).sum(), xg)[0]
    torch.testing.assert_close(grad, w.sum(0).expand(3, 68))


def _cost(fn, *args):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "linear_2of4" in str(n.target))
    return CostModel(HARDWARE["h100-sxm"]).node_cost(node)


def test_cost_counts_stored_bytes():
    """At fp16, 4096 x 4096, M = 1: values N·K/2 · 2 B + metadata N·K/8 B = 0.5625 of the dense weight's bytes."""
    m, n, k = 1, 4096, 4096
    x = torch.empty(m, k, dtype=torch.float16)
    values, meta = torch.empty(n, k // 2, dtype=torch.float16), torch.empty(n, k // 8, dtype=torch.uint8)
    cost = _cost(lambda x, v, mt: OP(x, v, mt), x, values, meta)
    assert cost.kind == "custom" and cost.flops == 2 * m * n * k
    weight = int(cost.bytes) - (m * k * 2 + m * n * 2)
    assert weight == n * k + n * k // 8 and weight / (n * k * 2) == 0.5625
    bias = torch.empty(n, dtype=torch.float16)
    q, s = torch.empty(n, k // 4, dtype=torch.uint8), torch.empty(n, k // 128, dtype=torch.float16)
    cost = _cost(lambda x, q, mt, s, z, b: OP_W4(x, q, mt, s, z, 128, bias=b), x, q, meta, s, s.clone(), bias)
    assert cost.flops == 2 * m * n * k + m * n
    assert cost.bytes == m * k * 2 + n * k // 4 + n * k // 8 + 2 * n * (k // 128) * 2 + n * 2 + m * n * 2


def _bad(**overrides):
    _, values, meta = _sparse(8, 64, torch.float16, device="cpu")
    args = {"x": torch.ones(2, 64, dtype=torch.float16), "values": values, "meta": meta, "bias": None}
    args.update(overrides)
    return args


def _bad_w4(**overrides):
    qvalues, meta, scales, zeros = _sparse_w4(8, 64, 32, device="cpu")
    args = {"x": torch.ones(2, 64, dtype=torch.float16), "qvalues": qvalues, "meta": meta, "scales": scales,
            "zeros": zeros, "group_size": 32}
    args.update(overrides)
    return args


BAD = {
    "x-int32": ("2of4", _bad(x=torch.ones(2, 64, dtype=torch.int32)), "float16, bfloat16 or float32"),
    "k-not-4": ("2of4", _bad(x=torch.ones(2, 66, dtype=torch.float16)), r"K=66 must be a multiple of 4"),
    "values-dtype": ("2of4", _bad(values=torch.ones(8, 32)), r"values must be \(N, K // 2\) in x's dtype"),
    "values-shape": ("2of4", _bad(values=torch.ones(8, 64, dtype=torch.float16)), r"= \(N, 32\) for K=64"),
    "meta-shape": ("2of4", _bad(meta=torch.zeros(8, 16, dtype=torch.uint8)), r"meta must be uint8 .* = \(8, 8\)"),
    "bias": ("2of4", _bad(bias=torch.ones(8)), r"bias must be \(8,\) in x's dtype"),
    "w4-group": ("w4", _bad_w4(group_size=16), r"group_size must be one of \(32, 64, 128\)"),
    "w4-qvalues": ("w4", _bad_w4(qvalues=torch.zeros(8, 32, dtype=torch.uint8)),
                   r"qvalues must be uint8 \(N, K // 4\)"),
    "w4-scales": ("w4", _bad_w4(scales=torch.ones(8, 2)), r"scales must be float16 \(N, K // group_size\)"),
    "w4-meta": ("w4", _bad_w4(meta=torch.zeros(8, 8, dtype=torch.int32)), r"meta must be uint8"),
}


@pytest.mark.parametrize("launcher", [True, False], ids=["launcher", "op"])
@pytest.mark.parametrize("which,args,match", BAD.values(), ids=BAD.keys())
def test_bad_inputs_raise_value_error(launcher, which, args, match):
    if launcher and not (HAS_CUDA or INTERPRET):
        pytest.skip("the launchers refuse CPU tensors without TRITON_INTERPRET=1")
    if which == "2of4":
        call = s24.linear_2of4_triton if launcher else OP
    else:
        call = s24.linear_2of4_w4a16_triton if launcher else OP_W4
    with pytest.raises(ValueError, match=match):
        call(**args)


def test_references_unpack_the_formats():
    w, values, meta = _sparse(9, 68, torch.bfloat16, device="cpu")
    assert torch.equal(unpack_2of4(values, meta, 68), w)
    x, _ = _x(4, 68, 9, torch.bfloat16, False, device="cpu")
    assert torch.equal(s24.linear_2of4_reference(x, values, meta), (x.float() @ w.float().T).to(torch.bfloat16))


@needs_compiled_cuda
@pytest.mark.parametrize("m", [1, 7, 300])
def test_ops_on_cuda_under_inductor(m):
    """Natively on a GPU: both ops inside torch.compile (Inductor sees the kernels through wrap_triton) against the
    float64 oracle, at GEMV and GEMM row counts, 4096-wide."""
    w, values, meta = _sparse(1000, 4096, torch.bfloat16)
    qvalues, meta4, scales, zeros = _sparse_w4(1000, 4096, 128)
    x, bias = _x(m, 4096, 1000, torch.bfloat16, True)
    fn = torch.compile(lambda x: (OP(x, values, meta, bias), OP_W4(x, qvalues, meta4, scales, zeros, 128, bias)))
    y, y4 = fn(x)
    w4 = unpack_2of4_int4(qvalues.cpu(), meta4.cpu(), scales.cpu(), zeros.cpu(), 128, 4096, torch.float64).cuda()
    torch.testing.assert_close(y.double(), _oracle(x, w, bias), atol=3e-2, rtol=1.6e-2)
    torch.testing.assert_close(y4.double(), _oracle(x, w4, bias), atol=3e-2, rtol=1.6e-2)
