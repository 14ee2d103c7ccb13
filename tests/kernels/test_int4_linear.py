"""Tests for llmcompress/kernels/int4_linear.py: the GEMV, GEMM and dequantize + F.linear paths, the launcher's
choice between them, the reference, the custom op and its cost."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import llmcompress.kernels.int4_linear as w4  # registers torch.ops.llmcompress.linear_w4a16
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.formats import quantized as formats
from llmcompress.kernels.int4_linear import dequantize_w4_triton, linear_w4a16_reference, linear_w4a16_triton
from llmcompress.testing.devices import (
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    dots_on_stored_dtype,
    needs_compiled_cuda,
    needs_triton,
)
from llmcompress.testing.numerics import random_activations

OP = torch.ops.llmcompress.linear_w4a16.default

# Outputs are O(1) (weights scaled by 1/sqrt(K), unit bias), so one ulp is ~4e-3 (fp16) / ~3e-2 (bf16) at the
# largest |y| ~ 6. fp16/bf16 outputs round once; the tensor-core paths also round x * act_scale and the
# dequantized weight to x.dtype; the interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest), up to
# one whole bf16 ulp. fp32 differs from float64 only by fp32 sums over K <= 384.
# Under TRITON_INTERPRET=1 the kernels upcast tl.dot's fp16/bf16 operands to fp32 (linear_common.dot_fp32: the
# interpreter multiplies bf16 as raw bits) where a GPU runs fp16/bf16 tensor cores; both give exact products summed
# in fp32 (in another order), so these tolerances hold for both. test_tensor_core_paths_on_fp16_operands runs the
# GPU's fp16 operands under the interpreter.
DTYPE_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 3e-3, 3e-3),
    (torch.bfloat16, 2e-2, 1.6e-2),
]
DTYPE_TOL_IDS = ["fp32", "fp16", "bf16"]

# (M, N, K, bias, act_scale): N never a multiple of the interpreter's BLOCK_N = 32, M across the GEMV buckets
# (1, 2, 4, 16 rows) and past the GEMM's BLOCK_M = 16; K a multiple of 128 so every group size applies.
GEMV_CASES = [(1, 33, 128, False, False), (2, 100, 256, True, True), (3, 33, 384, True, False),
              (7, 100, 128, False, True), (16, 47, 256, True, True)]
GEMM_CASES = [(1, 100, 128, True, True), (17, 33, 256, False, True), (40, 100, 384, True, False)]
DENSE_CASES = [(5, 33, 128, True, True), (40, 100, 256, False, False)]


def _weights(n, k, group_size, device=DEVICE, seed=0):
    """Random int4 codes, positive scales ~1/(5 sqrt(K)) (so outputs are O(1)), integer zeros in [0, 15]."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = ((0.5 + torch.rand(n, k // group_size, generator=g)) / (5 * k**0.5)).half()
    zeros = torch.randint(0, 16, (n, k // group_size), generator=g).half()
    return formats.pack_int4(codes).to(device), scales.to(device), zeros.to(device)


def _activations(shape, dtype, bias=False, act_scale=False, n=None, device=DEVICE, seed=1):
    return random_activations(shape, dtype, bias, act_scale, n, device, seed)


def _oracle(x, qweight, scales, zeros, group_size, bias=None, act_scale=None):
    """The reference's math in float64: dequantize and matmul without any rounding."""
    q = formats.unpack_int4(qweight).double()
    w = (q - zeros.double().repeat_interleave(group_size, 1)) * scales.double().repeat_interleave(group_size, 1)
    h = x.double()
    if act_scale is not None:
        h = h * act_scale.double()
    y = h @ w.T
    return y if bias is None else y + bias.double()


def _problem(m, n, k, has_bias, has_act, dtype, group_size, device=DEVICE):
    qweight, scales, zeros = _weights(n, k, group_size, device)
    x, bias, act = _activations((m, k), dtype, has_bias, has_act, n, device)
    return x, qweight, scales, zeros, bias, act


def _check_path(path, case, group_size, dtype, atol, rtol):
    m, n, k, has_bias, has_act = case
    x, qweight, scales, zeros, bias, act = _problem(m, n, k, has_bias, has_act, dtype, group_size)
    out = path(x, qweight, scales, zeros, group_size, bias, act)

    assert out.shape == (m, n) and out.dtype == dtype and out.device == x.device
    expected = _oracle(x, qweight, scales, zeros, group_size, bias, act)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
@pytest.mark.parametrize("group_size", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("case", GEMV_CASES, ids=str)
def test_gemv_matches_float64(case, group_size, dtype, atol, rtol):
    _check_path(w4._gemv, case, group_size, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
@pytest.mark.parametrize("group_size", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("case", GEMM_CASES, ids=str)
def test_gemm_matches_float64(case, group_size, dtype, atol, rtol):
    _check_path(w4._gemm, case, group_size, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("path,case", [("_gemv", GEMV_CASES[3]), ("_gemv", GEMV_CASES[4]),
                                       ("_gemm", GEMM_CASES[1])], ids=str)
def test_tensor_core_paths_on_fp16_operands(monkeypatch, path, case, group_size):
    # The GPU's numerics under the interpreter: tl.dot on fp16 operands as rounded (UPCAST off), for the GEMV padded
    # to 16 rows and the GEMM. bf16 cannot run this way: the Triton 3.9 interpreter multiplies bf16 as raw bits.
    launched = dots_on_stored_dtype(monkeypatch)
    dtype, atol, rtol = DTYPE_TOLS[1]
    _check_path(getattr(w4, path), case, group_size, dtype, atol, rtol)
    assert launched == [f"_w4{path}_kernel"]


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
@pytest.mark.parametrize("group_size", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_dense_matches_float64(case, group_size, dtype, atol, rtol):
    _check_path(w4._dense, case, group_size, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("group_size", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_equals_formats(dtype, group_size):
    # (q - z) * s is exact in fp32 and rounds once to dtype in both, so they agree bit for bit. bf16 is left out:
    # the interpreter truncates where torch rounds to nearest.
    qweight, scales, zeros = _weights(100, 256, group_size)
    out = dequantize_w4_triton(qweight, scales, zeros, group_size, dtype)
    assert torch.equal(out, formats.dequantize_int4(qweight, scales, zeros, group_size, dtype))


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
def test_dequantize_folds_act_scale(dtype, atol, rtol):
    qweight, scales, zeros = _weights(33, 128, 32)
    act = _activations((1, 128), torch.float32, act_scale=True)[2]
    out = dequantize_w4_triton(qweight, scales, zeros, 32, dtype, act)
    expected = formats.dequantize_int4(qweight, scales, zeros, 32).double() * act.double()
    # Weights are ~0.1: scale the output tolerances down with them.
    torch.testing.assert_close(out.double(), expected, atol=atol / 10, rtol=rtol)


@needs_triton
@pytest.mark.parametrize(
    "m,gemv_max_m,dense_min_m,expected",
    [
        (1, 16, w4.DENSE_OFF, "_gemv"),
        (16, 16, w4.DENSE_OFF, "_gemv"),
        (17, 16, w4.DENSE_OFF, "_gemm"),
        (4, 3, w4.DENSE_OFF, "_gemm"),
        (6, 0, 6, "_dense"),
        (5, 4, 6, "_gemm"),
        (3, 4, 2, "_gemv"),  # GEMV wins ties with dense
    ],
)
def test_launcher_picks_kernel_by_rows(monkeypatch, m, gemv_max_m, dense_min_m, expected):
    calls = []
    for name in ("_gemv", "_gemm", "_dense"):
        fn = getattr(w4, name)
        monkeypatch.setattr(w4, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    dtype, atol, rtol = DTYPE_TOLS[1]
    # Leading dims: x is (m, 1, K), the kernels see (m, K).
    x, bias, act = _activations((m, 1, 128), dtype, True, True, n=33)
    qweight, scales, zeros = _weights(33, 128, 64)
    out = linear_w4a16_triton(x, qweight, scales, zeros, 64, bias, act, gemv_max_m, dense_min_m)

    assert calls == [expected]
    assert out.shape == (m, 1, 33)
    torch.testing.assert_close(out.double(), _oracle(x, qweight, scales, zeros, 64, bias, act), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("shape", [(2, 3, 128), (0, 128), (2, 0, 128)])
def test_launcher_leading_dims(shape):
    dtype, atol, rtol = DTYPE_TOLS[1]
    x, bias, _ = _activations(shape, dtype, bias=True, n=47)
    qweight, scales, zeros = _weights(47, 128, 128)
    out = linear_w4a16_triton(x, qweight, scales, zeros, 128, bias)

    assert out.shape == (*shape[:-1], 47) and out.dtype == dtype
    torch.testing.assert_close(out.double(), _oracle(x, qweight, scales, zeros, 128, bias), atol=atol, rtol=rtol)


@needs_triton
def test_launcher_non_contiguous_x():
    # Row stride 256, unit column stride: read in place; transposed: copied.
    dtype, atol, rtol = DTYPE_TOLS[0]
    qweight, scales, zeros = _weights(33, 128, 32)
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(6, 256, generator=g)[::2, :128], torch.randn(128, 5, generator=g).t()):
        x = x.to(DEVICE)
        assert not x.is_contiguous()
        out = linear_w4a16_triton(x, qweight, scales, zeros, 32)
        torch.testing.assert_close(out.double(), _oracle(x, qweight, scales, zeros, 32), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_is_fp32_rounded_once(dtype):
    # fp32 all the way and one rounding to x.dtype: equal to the rounded float64 result except where fp32 sum order
    # flips a rounding (rare next to fp16/bf16's ulp); rounding x * act_scale or W to x.dtype first would not be.
    x, qweight, scales, zeros, bias, act = _problem(7, 33, 256, True, True, dtype, 64, device="cpu")
    out = linear_w4a16_reference(x.view(7, 1, 256), qweight, scales, zeros, 64, bias, act)
    expected = _oracle(x, qweight, scales, zeros, 64, bias, act).to(dtype).view(7, 1, 33)
    assert out.shape == (7, 1, 33) and out.dtype == dtype
    assert (out == expected).float().mean() > 0.95


def test_op_cpu_equals_reference():
    x, qweight, scales, zeros, bias, act = _problem(6, 33, 256, True, True, torch.bfloat16, 128, device="cpu")
    x = x.view(2, 3, 256)
    expected = linear_w4a16_reference(x, qweight, scales, zeros, 128, bias, act)

    assert torch.equal(torch.ops.llmcompress.linear_w4a16(x, qweight, scales, zeros, 128, bias, act), expected)
    assert torch.equal(OP(x, qweight, scales, zeros, 128, act_scale=act, bias=bias, gemv_max_m=1), expected)
    no_extras = linear_w4a16_reference(x, qweight, scales, zeros, 128)
    assert torch.equal(OP(x, qweight, scales, zeros, 128), no_extras)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_under_torch_compile_cpu(backend):
    x, qweight, scales, zeros, bias, act = _problem(3, 33, 128, True, True, torch.float32, 32, device="cpu")

    def fn(x):
        return OP(x, qweight, scales, zeros, 32, bias, act, 16, 64) * 2.0

    out = torch.compile(fn, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, linear_w4a16_reference(x, qweight, scales, zeros, 32, bias, act) * 2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_fake_impl_shape_and_dtype(dtype):
    with FakeTensorMode():
        x = torch.empty(2, 7, 256, dtype=dtype)
        qweight = torch.empty(100, 128, dtype=torch.uint8)
        scales = torch.empty(100, 2, dtype=torch.float16)
        out = OP(x, qweight, scales, scales, 128, torch.empty(100, dtype=dtype))

    assert out.shape == (2, 7, 100) and out.dtype == dtype


def test_op_opcheck():
    # Schema, fake impl, autograd registration and AOT dispatch.
    x, qweight, scales, zeros, bias, act = _problem(3, 33, 64, True, True, torch.float32, 32, device="cpu")
    torch.library.opcheck(OP, (x.requires_grad_(), qweight, scales, zeros, 32, bias.requires_grad_(), act))


def test_op_backward_matches_reference_autograd():
    x, qweight, scales, zeros, bias, act = _problem(5, 33, 64, True, True, torch.float32, 32, device="cpu")
    grad_out = torch.randn(5, 33, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(OP(x.requires_grad_(), qweight, scales, zeros, 32, bias.requires_grad_(), act),
                              (x, bias), grad_out)
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    want = torch.autograd.grad(_oracle(x64, qweight, scales, zeros, 32, b64, act), (x64, b64), grad_out.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


def test_cost_counts_packed_bytes():
    m, n, k, gs = 1, 4096, 4096, 128
    x, qweight, scales, zeros, bias, act = _problem(m, n, k, True, True, torch.bfloat16, gs, device="cpu")
    gm = make_fx(lambda *a: OP(*a[:4], gs, *a[4:]), tracing_mode="fake")(x, qweight, scales, zeros, bias, act)
    node = next(n_ for n_ in gm.graph.nodes if n_.target is OP)
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(node)

    assert cost.kind == "custom"
    assert cost.flops == 2 * m * n * k + m * n + m * k
    # x, packed weight (K / 2 bytes a row), fp16 scales and zeros, bias, fp32 act_scale, output.
    assert cost.bytes == m * k * 2 + n * k // 2 + 2 * n * (k // gs) * 2 + n * 2 + k * 4 + m * n * 2


def test_cost_reads_keyword_arguments():
    m, n, k = 3, 64, 128
    x, qweight, scales, zeros, bias, _ = _problem(m, n, k, True, False, torch.float16, 32, device="cpu")
    gm = make_fx(lambda x, q, s, z, b: OP(x, q, s, z, 32, bias=b), tracing_mode="fake")(x, qweight, scales, zeros,
                                                                                          bias)
    node = next(n_ for n_ in gm.graph.nodes if n_.target is OP)
    assert CostModel(HARDWARE["h100-sxm"]).node_cost(node).flops == 2 * m * n * k + m * n


def _bad(**overrides):
    x, qweight, scales, zeros, bias, act = _problem(2, 8, 128, True, True, torch.float16, 64, device="cpu")
    args = dict(x=x, qweight=qweight, scales=scales, zeros=zeros, group_size=64, bias=bias, act_scale=act)
    args.update(overrides)
    return args


BAD_INPUTS = {
    "x-int32": (_bad(x=torch.ones(2, 128, dtype=torch.int32)), "float16, bfloat16 or float32"),
    "x-float64": (_bad(x=torch.ones(2, 128, dtype=torch.float64)), "float16, bfloat16 or float32"),
    "group-size-16": (_bad(group_size=16), r"group_size must be one of \(32, 64, 128\)"),
    "k-not-multiple": (_bad(x=torch.ones(2, 96, dtype=torch.float16)), "K=96 must be a multiple of group_size=64"),
    "qweight-int8": (_bad(qweight=torch.ones(8, 64, dtype=torch.int8)), r"qweight must be uint8 \(N, K // 2\)"),
    "qweight-unpacked": (_bad(qweight=torch.ones(8, 128, dtype=torch.uint8)), r"= \(N, 64\) for K=128"),
    "scales-fp32": (_bad(scales=torch.ones(8, 2)), r"scales must be float16 \(N, K // group_size\) = \(8, 2\)"),
    "zeros-shape": (_bad(zeros=torch.ones(8, 4, dtype=torch.float16)), r"zeros must be float16"),
    "bias-dtype": (_bad(bias=torch.ones(8)), r"bias must be \(8,\) in x's dtype"),
    "bias-shape": (_bad(bias=torch.ones(9, dtype=torch.float16)), r"bias must be \(8,\)"),
    "act-fp16": (_bad(act_scale=torch.ones(128, dtype=torch.float16)), r"act_scale must be float32 \(128,\)"),
    "act-shape": (_bad(act_scale=torch.ones(64)), r"act_scale must be float32 \(128,\)"),
    "mixed-devices": (_bad(bias=torch.ones(8, dtype=torch.float16, device="meta")), "one device"),
}


@pytest.mark.parametrize("call", [linear_w4a16_triton, OP], ids=["launcher", "op"])
@pytest.mark.parametrize("args,match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_value_error(call, args, match):
    if call is linear_w4a16_triton and not (HAS_CUDA or INTERPRET):
        pytest.skip("the launcher refuses CPU tensors without TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match=match):
        call(**args)


@needs_triton
def test_launcher_rejects_too_many_gemv_rows():
    with pytest.raises(ValueError, match=r"gemv_max_m must be in \[0, 16\]"):
        linear_w4a16_triton(**_bad(), gemv_max_m=32)


@needs_triton
def test_dequantize_rejects_bad_format():
    qweight, scales, zeros = _weights(8, 96, 32, device="cpu")
    with pytest.raises(ValueError, match="K=96 must be a multiple of group_size=64"):
        dequantize_w4_triton(qweight, scales, zeros, 64, torch.float16)
    with pytest.raises(ValueError, match="dtype must be float16, bfloat16 or float32"):
        dequantize_w4_triton(qweight, scales, zeros, 32, torch.float64)


GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): Llama-2-7B q/o, gate/up, down projections


@needs_compiled_cuda
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS[1:], ids=DTYPE_TOL_IDS[1:])
def test_cuda_large_shapes_every_path(m, n, k, dtype, atol, rtol):
    # Against the fp32 reference on the GPU: the float64 oracle at these sizes would be slow and add nothing.
    group_size = 128
    x, qweight, scales, zeros, bias, act = _problem(m, n, k, True, True, dtype, group_size)
    expected = linear_w4a16_reference(x, qweight, scales, zeros, group_size, bias, act).double()
    paths = [w4._gemm, w4._dense] + ([w4._gemv] if m <= 16 else [])
    for path in paths:
        out = path(x, qweight, scales, zeros, group_size, bias, act)
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol, msg=path.__name__)
    out = OP(x, qweight, scales, zeros, group_size, bias, act)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


@needs_compiled_cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_TOL_IDS)
@pytest.mark.parametrize("group_size", formats.INT4_GROUP_SIZES)
def test_cuda_small_shapes_every_path(group_size, dtype, atol, rtol):
    for case in GEMV_CASES:
        _check_path(w4._gemv, case, group_size, dtype, atol, rtol)
    for case in GEMM_CASES + DENSE_CASES:
        _check_path(w4._gemm, case, group_size, dtype, atol, rtol)
        _check_path(w4._dense, case, group_size, dtype, atol, rtol)


@needs_compiled_cuda
def test_op_under_torch_compile_cuda_runs_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    x, qweight, scales, zeros, bias, act = _problem(3, 256, 512, True, True, torch.bfloat16, 128)

    def fn(x):
        return OP(x, qweight, scales, zeros, 128, bias, act)

    out, code = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True), x)
    assert any("_w4_gemv_kernel" in src for src in code)
    expected = linear_w4a16_reference(x, qweight, scales, zeros, 128, bias, act)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1.6e-2)
