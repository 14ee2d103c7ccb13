"""Tests for llmcompress/kernels/lowrank_linear.py: the fused low-rank kernel against a float64 oracle (odd N, K, r),
the launcher's choice by rows, the reference, the custom op (CPU: two F.linear), compile, opcheck, cost, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import llmcompress.kernels.lowrank_linear as lr  # registers the op
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.testing.devices import (
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    dots_on_stored_dtype,
    needs_compiled_cuda,
    needs_triton,
)

OP = torch.ops.llmcompress.linear_lowrank.default

# Outputs O(1): fp16 ~4e-3 and bf16 ~3e-2 per ulp (the interpreter truncates bf16 casts); fp32 differs from float64
# only by fp32 sums (and the order of the atomics).
DTYPE_TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 3e-3, 3e-3), (torch.bfloat16, 2e-2, 1.6e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (M, N, K, r, bias): N, K, r multiples of none of the interpreter's BLOCK_N = 32, BLOCK_K = 32, BLOCK_R = 16;
# M across the row buckets (1, 2, 4 FMA rows, 16 tensor-core rows); r = 5 below one BLOCK_R.
FUSED_CASES = [(1, 33, 70, 19, False), (2, 47, 100, 5, True), (3, 33, 70, 37, True), (16, 47, 100, 19, True),
               (9, 65, 33, 17, False)]


def _factors(n, k, r, dtype, device=DEVICE, seed=0):
    """Random factors with y = U V x of O(1) for x ~ N(0, 1): V ~ N(0, 1/K), U ~ N(0, 1/r)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(r, k, generator=g) / k ** 0.5
    u = torch.randn(n, r, generator=g) / r ** 0.5
    return v.to(device, dtype), u.to(device, dtype)


def _x(m, k, n, dtype, bias, device=DEVICE, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, b


def _oracle(x, v, u, bias):
    y = (x.double() @ v.double().T) @ u.double().T
    return y if bias is None else y + bias.double()


def _check(path, m, n, k, r, has_bias, dtype, atol, rtol):
    v, u = _factors(n, k, r, dtype)
    x, bias = _x(m, k, n, dtype, has_bias)
    out = path(x, v, u, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.double(), _oracle(x, v, u, bias), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_kernel_matches_float64(case, dtype, atol, rtol):
    _check(lr._launch_fused, *case, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS[::2], ids=DTYPE_IDS[::2])
def test_fused_kernel_takes_u_as_a_transpose_view(dtype, atol, rtol):
    """U stored (r, N) and passed as its (N, r) transpose view: read with its strides, not copied."""
    m, n, k, r, _ = FUSED_CASES[3]
    v, u = _factors(n, k, r, dtype)
    u_t = u.T.contiguous().T
    assert u_t.stride() == (1, n)
    x, bias = _x(m, k, n, dtype, True)
    torch.testing.assert_close(lr._launch_fused(x, v, u_t, bias).double(), _oracle(x, v, u, bias), atol=atol,
                               rtol=rtol)
    torch.testing.assert_close(lr._launch_fused(x[:1], v, u_t, bias).double(), _oracle(x[:1], v, u, bias), atol=atol,
                               rtol=rtol)


@needs_triton
def test_fused_kernel_on_fp16_operands(monkeypatch):
    # tl.dot on fp16 operands as loaded (UPCAST off), the GPU's numerics: t split into hi + lo keeps fp16's tolerance.
    launched = dots_on_stored_dtype(monkeypatch)
    _check(lr._launch_fused, *FUSED_CASES[3], *DTYPE_TOLS[1])
    assert launched == ["_lowrank_fused_kernel"]
    # Rounded about once, as the reference: t in fp16 alone (no lo term) moves 42 % of the outputs by an ulp here.
    m, n, k, r, _ = FUSED_CASES[3]
    v, u = _factors(n, k, r, torch.float16)
    x, _ = _x(m, k, n, torch.float16, False)
    ref = lr.linear_lowrank_reference(x.cpu(), v.cpu(), u.cpu())
    assert (lr._launch_fused(x, v, u, None).cpu() != ref).float().mean() < 0.02


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
def test_two_linears_match_float64(dtype, atol, rtol):
    """Above fused_max_m: F.linear twice in x's dtype (t rounded once between: bf16 gets a wider tolerance)."""
    scale = 2 if dtype == torch.bfloat16 else 1
    _check(lr._two_linears, 40, 47, 100, 19, True, dtype, atol * scale, rtol * scale)


@needs_triton
@pytest.mark.parametrize("m,fused_max_m,expected", [(1, 16, "_launch_fused"), (16, 16, "_launch_fused"),
                                                    (5, 4, "_two_linears"), (17, 16, "_two_linears"),
                                                    (1, 0, "_two_linears")])
def test_launcher_picks_path_by_rows(monkeypatch, m, fused_max_m, expected):
    called = []
    for name in ("_launch_fused", "_two_linears"):
        real = getattr(lr, name)
        monkeypatch.setattr(lr, name, lambda *a, _n=name, _r=real: called.append(_n) or _r(*a))
    v, u = _factors(33, 68, 11, torch.float32)
    x, _ = _x(m, 68, 33, torch.float32, False)
    out = lr.linear_lowrank_triton(x.view(m, 1, 68), v, u, fused_max_m=fused_max_m)
    assert called == [expected] and out.shape == (m, 1, 33)
    torch.testing.assert_close(out.view(m, 33).double(), _oracle(x, v, u, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_is_two_linears_in_x_dtype(dtype):
    """On CPU the op runs torch's matmul twice in x's dtype, bit for bit, whatever fused_max_m says."""
    v, u = _factors(33, 132, 13, dtype, device="cpu")
    x, bias = _x(6, 132, 33, dtype, True, device="cpu")
    x = x.view(2, 3, 132)
    want = F.linear(F.linear(x, v), u, bias)
    assert torch.equal(OP(x, v, u, bias), want)
    assert torch.equal(torch.ops.llmcompress.linear_lowrank(x, v, u, bias=bias, fused_max_m=1), want)


def test_reference_is_float32_rounded_once():
    v, u = _factors(9, 68, 7, torch.bfloat16, device="cpu")
    x, bias = _x(4, 68, 9, torch.bfloat16, True, device="cpu")
    want = ((x.float() @ v.float().T) @ u.float().T + bias.float()).to(torch.bfloat16)
    assert torch.equal(lr.linear_lowrank_reference(x, v, u, bias), want)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_under_torch_compile_cpu(backend):
    v, u = _factors(33, 68, 9, torch.float32, device="cpu")
    x, bias = _x(3, 68, 33, torch.float32, True, device="cpu")
    out = torch.compile(lambda x: OP(x, v, u, bias, 4) * 2.0, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, lr.linear_lowrank_reference(x, v, u, bias) * 2.0)


def test_op_under_torch_compile_dynamic_rows():
    """A symbolic M (dynamic=True): one graph for 3 and 20 rows, either side of fused_max_m."""
    v, u = _factors(33, 68, 9, torch.bfloat16, device="cpu")
    fn = torch.compile(lambda x: OP(x, v, u, None, 16), backend="aot_eager", dynamic=True, fullgraph=True)
    for m in (3, 20):
        x, _ = _x(m, 68, 33, torch.bfloat16, False, device="cpu")
        assert torch.equal(fn(x), F.linear(F.linear(x, v), u))


def test_op_fake_impl_shape_and_dtype():
    with FakeTensorMode():
        x = torch.empty(2, 7, 256, dtype=torch.bfloat16)
        out = OP(x, torch.empty(24, 256, dtype=torch.bfloat16), torch.empty(100, 24, dtype=torch.bfloat16))
    assert out.shape == (2, 7, 100) and out.dtype == torch.bfloat16


def test_op_opcheck_and_backward():
    v, u = _factors(33, 68, 9, torch.float32, device="cpu")
    x, bias = _x(3, 68, 33, torch.float32, True, device="cpu")
    torch.library.opcheck(OP, (x.clone().requires_grad_(), v, u, bias.clone().requires_grad_()))
    xg = x.clone().requires_grad_()
    grad = torch.autograd.grad(OP(xg, v, u).sum(), xg)[0]
    torch.testing.assert_close(grad, (u @ v).sum(0).expand(3, 68))


def test_cost_is_the_factors_flops_and_bytes():
    """bf16 4096 x 4096 at r = 1024, M = 16, bias: 2·M·r·(K+N) + M·N FLOPs; bytes x + V + U + bias + y, no t."""
    m, n, k, r = 16, 4096, 4096, 1024
    args = (torch.empty(m, k, dtype=torch.bfloat16), torch.empty(r, k, dtype=torch.bfloat16),
            torch.empty(n, r, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16))
    gm = make_fx(lambda x, v, u, b: OP(x, v, u, b), tracing_mode="fake")(*args)
    node = next(n_ for n_ in gm.graph.nodes if n_.op == "call_function" and "linear_lowrank" in str(n_.target))
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(node)
    assert cost.kind == "custom" and cost.flops == 2 * m * r * (k + n) + m * n
    assert cost.bytes == 2 * (m * k + r * k + n * r + n + m * n)


def _bad(**overrides):
    v, u = _factors(8, 64, 4, torch.float16, device="cpu")
    args = {"x": torch.ones(2, 64, dtype=torch.float16), "v": v, "u": u, "bias": None}
    args.update(overrides)
    return args


BAD = {
    "x-int32": _bad(x=torch.ones(2, 64, dtype=torch.int32)), "v-dtype": _bad(v=torch.ones(4, 64)),
    "v-shape": _bad(v=torch.ones(4, 63, dtype=torch.float16)),
    "v-empty": _bad(v=torch.ones(0, 64, dtype=torch.float16)),
    "u-rank": _bad(u=torch.ones(8, 5, dtype=torch.float16)), "u-dtype": _bad(u=torch.ones(8, 4, dtype=torch.bfloat16)),
    "bias": _bad(bias=torch.ones(8)), "fused-max-m": _bad(fused_max_m=17),
}
MATCH = {"x-int32": "float16, bfloat16 or float32", "v-dtype": r"v must be \(r, K\) = \(r, 64\)",
         "v-shape": r"v must be \(r, K\)", "v-empty": "r >= 1", "u-rank": r"u must be \(N, r\) = \(N, 4\)",
         "u-dtype": "u must be .* in x's dtype", "bias": r"bias must be \(8,\) in x's dtype",
         "fused-max-m": r"fused_max_m must be in \[0, 16\]"}


@pytest.mark.parametrize("launcher", [True, False], ids=["launcher", "op"])
@pytest.mark.parametrize("which", BAD, ids=str)
def test_bad_inputs_raise_value_error(launcher, which):
    if launcher and not (HAS_CUDA or INTERPRET):
        pytest.skip("the launcher refuses CPU tensors without TRITON_INTERPRET=1")
    call = lr.linear_lowrank_triton if launcher else OP
    with pytest.raises(ValueError, match=MATCH[which]):
        call(**BAD[which])


@needs_compiled_cuda
@pytest.mark.parametrize("m", [1, 7, 16, 300])
def test_op_on_cuda_under_inductor(m):
    """Natively on a GPU: the op inside torch.compile (Inductor sees the kernel through wrap_triton) against the
    float64 oracle, fused and two-GEMM row counts, 4096-wide, r not a multiple of the blocks."""
    v, u = _factors(1000, 4096, 300, torch.bfloat16)
    x, bias = _x(m, 4096, 1000, torch.bfloat16, True)
    y = torch.compile(lambda x: OP(x, v, u, bias))(x)
    torch.testing.assert_close(y.double(), _oracle(x, v, u, bias), atol=3e-2, rtol=1.6e-2)
