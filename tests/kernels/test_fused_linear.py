"""Tests for llmcompress/kernels/fused_linear.py: the GEMV and GEMM paths with every prologue/epilogue option
against an independent float64 oracle (F.linear in double, the activations written out, gate rows first), the
launcher's choice of path, the tensor-core paths on fp16 operands (not upcast) under the interpreter, the
reference's numerics, the custom op (eager CPU, torch.compile with Inductor, make_fx with fake tensors), its cost,
and the errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import llmcompress.kernels.fused_linear as fl  # registers torch.ops.llmcompress.fused_linear
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.kernels.fused_linear import fused_linear_reference, fused_linear_triton
from llmcompress.kernels.rms_norm import rms_norm_reference
from llmcompress.testing.devices import (
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    dots_on_stored_dtype,
    needs_compiled_cuda,
    needs_triton,
)

OP = torch.ops.llmcompress.fused_linear.default

# Outputs are O(1)..O(5) (weights ~ N(0, 1/K), unit bias and residual). fp16/bf16 outputs round once (the
# interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: up to one whole bf16 ulp); fp32 differs from
# float64 only by fp32 sums over K = 72. Under TRITON_INTERPRET=1 the kernels upcast tl.dot's fp16/bf16 operands to
# fp32 (linear_common.dot_fp32: the interpreter multiplies bf16 as raw bits), where a GPU runs fp16/bf16 tensor
# cores: exact products and fp32 sums either way, so these tolerances hold for both;
# test_tensor_core_paths_on_fp16_operands runs the GPU's fp16 operands under the interpreter.
DTYPE_TOLS = [
    (torch.float32, 2e-5, 2e-5),
    (torch.float16, 3e-3, 3e-3),
    (torch.bfloat16, 2e-2, 1.6e-2),
]
DTYPE_TOL_IDS = ["fp32", "fp16", "bf16"]
K, N = 72, 40  # neither a multiple of the interpreter's blocks (BLOCK_K 64 / 32, BLOCK_N 32)

# (lead shape of x, activation, gated, bias, residual, rms_eps): every option on and off, each activation, gated
# with and without bias, across the GEMV buckets (1, 2-4 rows on FMAs, 5-16 on tensor cores) and past them.
CASES = [
    ((1,), "none", False, False, False, None),
    ((1,), "silu", True, False, True, 1e-6),
    ((1, 1), "gelu_tanh", False, True, True, None),
    ((3,), "relu", False, True, False, 1e-5),
    ((3,), "gelu", True, True, False, None),
    ((2, 7), "silu", False, False, True, None),
    ((17,), "silu", True, True, True, 1e-6),
    ((17,), "gelu", False, False, False, 1e-6),
    ((2, 20), "none", False, True, True, None),
    ((40,), "gelu_tanh", True, False, False, 1e-5),
    ((40,), "relu", True, True, True, None),
]
CASE_IDS = [f"{'x'.join(map(str, c[0]))}-{c[1]}{'-gated' if c[2] else ''}{'-bias' if c[3] else ''}"
            f"{'-res' if c[4] else ''}{'-rms' if c[5] else ''}" for c in CASES]


def _problem(lead, activation, gated, has_bias, has_res, rms_eps, dtype, device=DEVICE, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_w = 2 * n if gated else n
    x = torch.randn(*lead, k, generator=g)
    if rms_eps is not None:
        x = x * 3.0  # an RMS scale far from 1, so a missing or wrong normalization shows
    w = torch.randn(n_w, k, generator=g) / k**0.5
    b = torch.randn(n_w, generator=g) if has_bias else None
    r = torch.randn(*lead, n, generator=g) if has_res else None

    def move(t):
        return None if t is None else t.to(device, dtype)

    return dict(x=move(x), w=move(w), bias=move(b), residual=move(r), activation=activation, gated=gated,
                rms_eps=rms_eps)


# The activations as their definitions, in float64 (not the reference's torch.nn.functional calls).
_ORACLE_ACTIVATIONS = {
    "none": lambda v: v,
    "silu": lambda v: v / (1.0 + torch.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0))),
    "gelu_tanh": lambda v: 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))),
    "relu": lambda v: torch.where(v > 0, v, torch.zeros_like(v)),
}


def _oracle(args):
    """The op's semantics in float64 on CPU, written independently of fused_linear_reference: x RMS-normalized
    over K, F.linear, then act(gate) * up with the gate in w's first N rows, then the residual; no rounding."""
    x, w = args["x"].cpu().double(), args["w"].cpu().double()
    if args["rms_eps"] is not None:
        x = x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + args["rms_eps"])
    bias = None if args["bias"] is None else args["bias"].cpu().double()
    act = _ORACLE_ACTIVATIONS[args["activation"]]
    if args["gated"]:
        n = w.shape[0] // 2
        gate = torch.nn.functional.linear(x, w[:n], None if bias is None else bias[:n])
        up = torch.nn.functional.linear(x, w[n:], None if bias is None else bias[n:])
        y = act(gate) * up
    else:
        y = act(torch.nn.functional.linear(x, w, bias))
    return y if args["residual"] is None else y + args["residual"].cpu().double()


def _check(out, args, dtype, atol, rtol, out_dtype=None):
    lead = args["x"].shape[:-1]
    assert out.shape == (*lead, N) and out.dtype == (out_dtype or dtype) and out.device == args["x"].device
    torch.testing.assert_close(out.cpu().double(), _oracle(args), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_launcher_matches_float64(case, dtype, atol, rtol):
    # The launcher's default gemv_max_m=16: the GEMV below 17 rows, the GEMM from 17.
    args = _problem(*case, dtype)
    _check(fused_linear_triton(**args), args, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ((1,), (3,))], ids=str)
def test_gemm_path_at_few_rows(case, dtype, atol, rtol):
    # gemv_max_m=0 sends 1 and 3 rows to the GEMM: most of its BLOCK_M=16 tile masked.
    args = _problem(*case, dtype)
    _check(fused_linear_triton(**args, gemv_max_m=0), args, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ((2, 7), (17,))], ids=str)
def test_tensor_core_paths_on_fp16_operands(monkeypatch, case):
    # The GPU's numerics under the interpreter: tl.dot on fp16 operands as loaded (UPCAST off), for the GEMV padded
    # to 16 rows and the GEMM. bf16 cannot run this way: the Triton 3.9 interpreter multiplies bf16 as raw bits.
    launched = dots_on_stored_dtype(monkeypatch)
    dtype, atol, rtol = DTYPE_TOLS[1]
    args = _problem(*case, dtype)
    _check(fused_linear_triton(**args), args, dtype, atol, rtol)
    assert launched == ["_fused_gemv_kernel" if args["x"].numel() // K <= 16 else "_fused_gemm_kernel"]


@needs_triton
@pytest.mark.parametrize("m,gemv_max_m,expected", [(1, 16, "_gemv"), (16, 16, "_gemv"), (17, 16, "_gemm"),
                                                   (4, 3, "_gemm"), (1, 0, "_gemm")])
def test_launcher_picks_kernel_by_rows(monkeypatch, m, gemv_max_m, expected):
    calls = []
    for name in ("_gemv", "_gemm"):
        fn = getattr(fl, name)
        monkeypatch.setattr(fl, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    dtype, atol, rtol = DTYPE_TOLS[1]
    args = _problem((m, 1), "silu", True, True, True, 1e-6, dtype)  # x (m, 1, K): the kernels see (m, K)
    out = fused_linear_triton(**args, gemv_max_m=gemv_max_m)
    assert calls == [expected]
    _check(out, args, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("path", ["_gemv", "_gemm"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_out_dtype_rounds_once(path, out_dtype):
    # fp16 in, the cast fused into the store: fp32 out is the accumulator itself (no fp16 rounding on the way).
    args = _problem((3,), "silu", True, True, True, None, torch.float16)
    m = args["x"].shape[0]
    out = getattr(fl, path)(args["x"].view(m, K), args["w"], args["bias"], args["residual"], "silu", True, None,
                            out_dtype)
    atol, rtol = (2e-5, 2e-5) if out_dtype == torch.float32 else DTYPE_TOLS[2][1:]
    _check(out, args, torch.float16, atol, rtol, out_dtype=out_dtype)


@needs_triton
@pytest.mark.parametrize("shape", [(0, K), (2, 0, K)])
def test_launcher_empty_rows(shape):
    x = torch.ones(shape, device=DEVICE)
    out = fused_linear_triton(x, torch.ones(2 * N, K, device=DEVICE), gated=True, activation="silu",
                              out_dtype=torch.float16)
    assert out.shape == (*shape[:-1], N) and out.dtype == torch.float16


@needs_triton
def test_launcher_non_contiguous_inputs():
    # x with a row stride of 2K (read in place) and transposed (copied); a transposed residual.
    dtype, atol, rtol = DTYPE_TOLS[0]
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE)
    for x in (torch.randn(6, 2 * K, generator=g)[::2, :K], torch.randn(K, 5, generator=g).t()):
        x = x.to(DEVICE)
        r = torch.randn(N, x.shape[0], generator=g).to(DEVICE).t()
        assert not x.is_contiguous() and not r.is_contiguous()
        args = dict(x=x, w=w, bias=None, residual=r, activation="relu", gated=False, rms_eps=1e-6)
        _check(fused_linear_triton(**args), args, dtype, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_is_fp32_rounded_once(dtype):
    # Equal to the rounded float64 result except where fp32 sum order flips a rounding (rare next to an ulp);
    # rounding h, the gate or the sum before the residual to dtype would not be.
    args = _problem((7, 3), "silu", True, True, True, 1e-6, dtype, device="cpu")
    out = fused_linear_reference(**args)
    assert out.shape == (7, 3, N) and out.dtype == dtype
    assert (out == _oracle(args).to(dtype)).float().mean() > 0.95


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
def test_reference_rms_prologue_is_hf_rmsnorm_without_weight(dtype, atol, rtol):
    # HF rounds the normalized row to x.dtype before the matmul; the fused op does not (module docstring): equal up
    # to that one rounding of x'.
    args = _problem((5,), "none", False, True, False, 1e-6, dtype, device="cpu")
    normed = rms_norm_reference(args["x"], torch.ones(K, dtype=dtype), 1e-6)
    hf = torch.nn.functional.linear(normed.double(), args["w"].double(), args["bias"].double())
    torch.testing.assert_close(fused_linear_reference(**args).double(), hf, atol=atol, rtol=rtol)


def test_op_cpu_equals_reference():
    args = _problem((2, 3), "gelu_tanh", True, True, True, 1e-5, torch.bfloat16, device="cpu")
    expected = fused_linear_reference(**args)
    assert torch.equal(OP(**args), expected)
    assert torch.equal(torch.ops.llmcompress.fused_linear(*args.values(), 1), expected)
    plain = torch.nn.functional.linear(args["x"].float(), args["w"].float()).bfloat16()
    assert torch.equal(OP(args["x"], args["w"]), plain)
    assert OP(args["x"], args["w"], out_dtype=torch.float32).dtype == torch.float32


def test_op_under_torch_compile_inductor_cpu():
    args = _problem((3,), "silu", True, True, True, 1e-6, torch.float32, device="cpu")

    def fn(x):
        return OP(x, args["w"], args["bias"], args["residual"], "silu", True, 1e-6, 16) * 2.0

    out = torch.compile(fn, backend="inductor", fullgraph=True)(args["x"])
    torch.testing.assert_close(out, fused_linear_reference(**args) * 2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_make_fx_fake(dtype):
    with FakeTensorMode():
        x, w = torch.empty(2, 7, K, dtype=dtype), torch.empty(2 * N, K, dtype=dtype)
        b, r = torch.empty(2 * N, dtype=dtype), torch.empty(2, 7, N, dtype=dtype)
        gm = make_fx(lambda x, w, b, r: OP(x, w, b, r, "silu", True, 1e-6, 4, torch.float32))(x, w, b, r)
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    val = node.meta["val"]
    assert val.shape == (2, 7, N) and val.dtype == torch.float32


def test_op_opcheck():
    # Schema, fake impl and AOT dispatch.
    args = _problem((3,), "relu", True, True, True, 1e-6, torch.float32, device="cpu")
    torch.library.opcheck(OP, tuple(args.values()))


def test_cost_hand_counted():
    m, n, k = 1, 4096, 4096
    x, w = torch.empty(m, k, dtype=torch.bfloat16), torch.empty(2 * n, k, dtype=torch.bfloat16)
    b, r = torch.empty(2 * n, dtype=torch.bfloat16), torch.empty(m, n, dtype=torch.bfloat16)
    gm = make_fx(lambda x, w, b, r: OP(x, w, b, r, "silu", True, 1e-6), tracing_mode="fake")(x, w, b, r)
    node = next(n_ for n_ in gm.graph.nodes if n_.target is OP)
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(node)
    assert cost.kind == "custom"
    # matmul; x² and its sum + the row scale; bias; activation on the gate half; gate product; residual.
    assert cost.flops == 2 * m * 2 * n * k + (2 * m * k + m * 2 * n) + m * 2 * n + m * n + m * n + m * n
    # x, W (the bulk: 64 MiB), bias, residual, output; all bf16.
    assert cost.bytes == 2 * (m * k + 2 * n * k + 2 * n + m * n + m * n)


def test_cost_plain_linear_is_a_matmul():
    x, w = torch.empty(5, 64), torch.empty(32, 64)
    gm = make_fx(lambda x, w: OP(x, w), tracing_mode="fake")(x, w)
    node = next(n_ for n_ in gm.graph.nodes if n_.target is OP)
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(node)
    assert cost.flops == 2 * 5 * 32 * 64 and cost.bytes == 4 * (5 * 64 + 32 * 64 + 5 * 32)


def _bad(**overrides):
    args = _problem((2,), "silu", True, True, True, 1e-6, torch.float16, device="cpu")
    args.update(overrides)
    return args


BAD_INPUTS = {
    "x-int32": (_bad(x=torch.ones(2, K, dtype=torch.int32)), "float16, bfloat16 or float32"),
    "x-float64": (_bad(x=torch.ones(2, K, dtype=torch.float64)), "float16, bfloat16 or float32"),
    "x-0d": (_bad(x=torch.tensor(1.0, dtype=torch.float16)), r"x must be \(\.\.\., K\)"),
    "k-zero": (_bad(x=torch.ones(2, 0, dtype=torch.float16), w=torch.ones(2 * N, 0, dtype=torch.float16)),
               "K >= 1"),
    "w-dtype": (_bad(w=torch.ones(2 * N, K)), r"w must be 2-D \(N_w, K\) = \(N_w, 72\) in x's dtype"),
    "w-k": (_bad(w=torch.ones(2 * N, K + 1, dtype=torch.float16)), r"w must be 2-D \(N_w, K\)"),
    "w-3d": (_bad(w=torch.ones(2, N, K, dtype=torch.float16)), r"w must be 2-D"),
    "activation": (_bad(activation="tanh"), "activation must be one of 'none', 'silu', 'gelu', 'gelu_tanh', 'relu'"),
    "gated-no-act": (_bad(activation="none"), "gated=True needs an activation other than 'none'"),
    "gated-odd": (_bad(w=torch.ones(2 * N + 1, K, dtype=torch.float16), bias=None, residual=None),
                  "gated=True needs an even number of weight rows"),
    "bias-dtype": (_bad(bias=torch.ones(2 * N)), r"bias must be \(N_w,\) = \(80,\) in x's dtype"),
    "bias-half": (_bad(bias=torch.ones(N, dtype=torch.float16)), r"bias must be \(N_w,\) = \(80,\)"),
    "residual-broadcast": (_bad(residual=torch.ones(1, N, dtype=torch.float16)),
                           r"residual must be the output's shape \(2, 40\) .* \(no broadcasting\)"),
    "residual-dtype": (_bad(residual=torch.ones(2, N)), "residual must be the output's shape"),
    "rms-eps-negative": (_bad(rms_eps=-1.0), "rms_eps must be None or a finite float >= 0"),
    "gemv-max-m": (_bad(gemv_max_m=32), r"gemv_max_m must be in \[0, 16\]"),
    "out-dtype": (_bad(out_dtype=torch.int8), "out_dtype must be float16, bfloat16 or float32"),
    "mixed-devices": (_bad(bias=torch.ones(2 * N, dtype=torch.float16, device="meta")), "one device"),
}


@pytest.mark.parametrize("call", [fused_linear_triton, OP], ids=["launcher", "op"])
@pytest.mark.parametrize("args,match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_value_error(call, args, match):
    if call is fused_linear_triton and not (HAS_CUDA or INTERPRET):
        pytest.skip("the launcher refuses CPU tensors without TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match=match):
        call(**args)


GPU_SHAPES = [(4096, 4096), (2 * 11008, 4096), (4096, 11008)]  # (N_w, K): Llama-2-7B q/o, gate+up, down


@needs_compiled_cuda
@pytest.mark.parametrize("n_w,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16, 256])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS[1:], ids=DTYPE_TOL_IDS[1:])
def test_cuda_large_shapes_every_path(m, n_w, k, dtype, atol, rtol):
    # Against the fp32 reference on the GPU: the float64 oracle at these sizes would be slow and add nothing.
    gated = n_w > 2 * k
    args = _problem((m,), "silu" if gated else "none", gated, False, True, 1e-6 if gated else None, dtype,
                    n=n_w // 2 if gated else n_w, k=k)
    expected = fused_linear_reference(**args).double()
    paths = [0] + ([16] if m <= 16 else [])
    for gemv_max_m in paths:
        out = fused_linear_triton(**args, gemv_max_m=gemv_max_m)
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol, msg=f"gemv_max_m={gemv_max_m}")
    torch.testing.assert_close(OP(**args).double(), expected, atol=atol, rtol=rtol)


@needs_compiled_cuda
def test_op_under_torch_compile_cuda_runs_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    args = _problem((3,), "silu", True, True, True, 1e-6, torch.bfloat16, n=256, k=512)

    def fn(x):
        return OP(x, *list(args.values())[1:])

    out, code = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True), args["x"])
    assert any("_fused_gemv_kernel" in src for src in code)
    torch.testing.assert_close(out, fused_linear_reference(**args), atol=2e-2, rtol=1.6e-2)
