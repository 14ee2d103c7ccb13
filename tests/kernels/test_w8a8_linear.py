"""Tests for llmcompress/kernels/w8a8_linear.py: the activation-quantization kernel, the int8 GEMM, the reference,
the custom op and its cost."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.formats.quantized import quantize_int8_per_channel, quantize_int8_per_token
from llmcompress.kernels.w8a8_linear import (
    MAX_K,
    linear_w8a8_reference,
    linear_w8a8_triton,
    quantize_per_token_int8_reference,
    quantize_per_token_int8_triton,
)
from llmcompress.testing.devices import DEVICE, needs_compiled_cuda, needs_triton
from llmcompress.testing.graphs import single_node_graph
from llmcompress.testing.numerics import per_token_linear_float64, random_quantized_linear, sqnr_db

op = torch.ops.llmcompress.linear_w8a8.default

# Codes and int32 sums are exact, so kernel and reference differ only in the fp32 epilogue (an FMA on GPU) and
# the final cast: the interpreter truncates fp32 -> bf16 (GPU rounds to nearest), one bf16 ulp = 2**-7 relative.
# The GEMM's tl.dot takes the int8 codes as a GPU does (no upcast under the interpreter, unlike the fp16/bf16
# dots of the weight-only kernels), so these tests run the GPU path's operand dtypes.
DTYPE_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-2, 1.6e-2),
]


def _linear_inputs(shape, n, dtype, bias=False, smooth=False, device=DEVICE, seed=0):
    """x (*shape) in dtype, int8 weight (n, K) from a random float one, its scales, optional bias and smooth."""
    return random_quantized_linear(shape, n, dtype, quantize_int8_per_channel, bias, smooth, device, seed)


def _exact_quantized_math(x, qweight, wscale, bias, smooth):
    """The quantized math in float64 throughout, from the reference's codes and scales (computed on CPU)."""
    q, s = quantize_per_token_int8_reference(x.cpu(), None if smooth is None else smooth.cpu())
    return per_token_linear_float64(q, s, qweight, wscale, bias)


@needs_triton
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("k", [33, 100, 257])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_quantize_kernel_equals_formats(m, k, smooth):
    x, _, _, _, s = _linear_inputs((m, k), 1, torch.bfloat16, smooth=smooth)
    q, scale = quantize_per_token_int8_triton(x, s)

    # The reference runs on CPU (torch on CUDA multiplies by 1/127 instead of dividing). The kernel's division
    # is correctly rounded and its rounding is half-to-even, so codes match exactly, ties included.
    h = x.cpu().float() * (s.cpu() if smooth else 1.0)
    q_ref, scale_ref = quantize_int8_per_token(h)
    assert q.dtype == torch.int8 and q.shape == (m, k)
    assert scale.dtype == torch.float32 and scale.shape == (m, 1)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(scale.cpu(), scale_ref)


@needs_triton
def test_quantize_kernel_rounds_half_to_even():
    # Row absmax 127 gives scale exactly 1, so the codes are round(x): ties go to the even neighbour like
    # torch.round, and 0.49999997 (where floor(v + 0.5) would give 1) goes to 0.
    row = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -125.5, 0.49999997, 3.4999998, -0.4]
    x = torch.tensor([row], device=DEVICE)
    q, scale = quantize_per_token_int8_triton(x)

    assert scale.item() == 1.0
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 0, 3, 0]]
    assert torch.equal(q.cpu(), torch.round(x.cpu()).to(torch.int8))


@needs_triton
def test_quantize_kernel_zero_row_and_leading_dims():
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    x[1, 2] = 0
    q, scale = quantize_per_token_int8_triton(x)
    q_ref, scale_ref = quantize_per_token_int8_reference(x.cpu())

    assert q.shape == (2, 3, 40) and scale.shape == (2, 3, 1)
    assert scale[1, 2].item() == pytest.approx(1e-8)  # formats' floor, so dequantization never divides by 0
    assert not q[1, 2].any()
    assert torch.equal(q.cpu(), q_ref) and torch.equal(scale.cpu(), scale_ref)


@needs_triton
def test_quantize_kernel_non_contiguous_x():
    base = torch.randn(40, 6, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for x in (base.t(), base[::2]):  # last-dim stride 40 (copied), row stride 12 (read in place)
        q, scale = quantize_per_token_int8_triton(x)
        q_ref, scale_ref = quantize_per_token_int8_reference(x.cpu())
        assert torch.equal(q.cpu(), q_ref) and torch.equal(scale.cpu(), scale_ref)


@needs_triton
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("n", [33, 100])
@pytest.mark.parametrize("shape", [(2, 3, 100), (17, 257)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_gemm_matches_reference(shape, n, bias, dtype, atol, rtol):
    x, qweight, wscale, b, _ = _linear_inputs(shape, n, dtype, bias=bias)
    out = linear_w8a8_triton(x, qweight, wscale, b)

    assert out.shape == (*shape[:-1], n)
    assert out.dtype == dtype and out.device == x.device
    ref = linear_w8a8_reference(x.cpu(), qweight.cpu(), wscale.cpu(), None if b is None else b.cpu())
    torch.testing.assert_close(out.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        out.cpu().double(), _exact_quantized_math(x, qweight, wscale, b, None), atol=atol, rtol=rtol
    )


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_gemm_with_smooth_matches_reference(dtype, atol, rtol):
    x, qweight, wscale, b, s = _linear_inputs((5, 100), 33, dtype, bias=True, smooth=True)
    out = linear_w8a8_triton(x, qweight, wscale, b, s)

    ref = linear_w8a8_reference(x.cpu(), qweight.cpu(), wscale.cpu(), b.cpu(), s.cpu())
    torch.testing.assert_close(out.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.cpu().double(), _exact_quantized_math(x, qweight, wscale, b, s), atol=atol,
                               rtol=rtol)


@needs_triton
def test_gemm_empty_rows():
    x, qweight, wscale, b, _ = _linear_inputs((0, 64), 33, torch.float16, bias=True)
    assert linear_w8a8_triton(x, qweight, wscale, b).shape == (0, 33)
    assert linear_w8a8_triton(x.reshape(2, 0, 64), qweight, wscale).shape == (2, 0, 33)


@needs_triton
def test_end_to_end_sqnr():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(16, 256, generator=g), torch.randn(64, 256, generator=g) * 0.02
    qweight, wscale = quantize_int8_per_channel(w)
    out = linear_w8a8_triton(x.to(DEVICE), qweight.to(DEVICE), wscale.to(DEVICE))

    # Gaussian rows: absmax ~3 sigma, so each operand is ~43 dB; measured 39.9 dB for the product.
    assert sqnr_db(x @ w.T, out.cpu()) >= 35


@needs_triton
def test_smoothing_improves_sqnr_with_outlier_channels():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(32, 256, generator=g), torch.randn(64, 256, generator=g) * 0.02
    x[:, [3, 77, 150]] *= 50  # a few outlier channels, as in LLM activations
    y = x @ w.T
    dev = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731

    plain = linear_w8a8_triton(*dev(x, *quantize_int8_per_channel(w)))
    # SmoothQuant, alpha = 0.5: s_j = sqrt(max|x_j| / max|W_j|); x / s against W * s is the same product.
    s = (x.abs().amax(0) / w.abs().amax(0)).sqrt()
    smoothed = linear_w8a8_triton(*dev(x, *quantize_int8_per_channel(w * s)), smooth=(1 / s).to(DEVICE))

    # Measured 29.4 dB plain, 42.3 dB smoothed.
    sqnr_plain, sqnr_smooth = sqnr_db(y, plain.cpu()), sqnr_db(y, smoothed.cpu())
    assert sqnr_smooth >= 38
    assert sqnr_smooth >= sqnr_plain + 8


def test_reference_is_formats_math():
    # The reference is the formats' quantized math: dequantized codes times dequantized weights.
    x, qweight, wscale, b, s = _linear_inputs((3, 50), 20, torch.float32, bias=True, smooth=True, device="cpu")
    q, xs = quantize_int8_per_token(x * s)
    expected = (q.float() * xs) @ (qweight.float() * wscale[:, None]).T + b
    torch.testing.assert_close(linear_w8a8_reference(x, qweight, wscale, b, s), expected, atol=1e-5, rtol=1e-5)


def test_op_cpu_equals_reference():
    x, qweight, wscale, b, s = _linear_inputs((2, 3, 40), 24, torch.bfloat16, bias=True, smooth=True, device="cpu")
    expected = linear_w8a8_reference(x, qweight, wscale, b, s)

    assert torch.equal(torch.ops.llmcompress.linear_w8a8(x, qweight, wscale, b, s), expected)
    assert torch.equal(op(x, qweight, wscale, bias=b, smooth=s), expected)
    assert torch.equal(op(x, qweight, wscale), linear_w8a8_reference(x, qweight, wscale))


def test_op_schema():
    assert str(op._schema) == (
        "llmcompress::linear_w8a8(Tensor x, Tensor qweight, Tensor wscale, Tensor? bias=None, "
        "Tensor? smooth=None) -> Tensor"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_op_fake_impl_shape_and_dtype(dtype):
    with FakeTensorMode():
        x = torch.empty(2, 7, 96, dtype=dtype)
        out = op(x, torch.empty(48, 96, dtype=torch.int8), torch.empty(48), torch.empty(48, dtype=dtype),
                 torch.empty(96))

    assert out.shape == (2, 7, 48)
    assert out.dtype == dtype
    assert out.device == x.device


def test_op_under_torch_compile_eager_backend():
    x, qweight, wscale, b, s = _linear_inputs((2, 5, 64), 24, torch.float16, bias=True, smooth=True, device="cpu")

    def fn(x):
        return op(x, qweight, wscale, b, s) * 2.0

    out = torch.compile(fn, backend="eager", fullgraph=True)(x)
    assert out.shape == (2, 5, 24) and out.dtype == torch.float16
    torch.testing.assert_close(out, linear_w8a8_reference(x, qweight, wscale, b, s) * 2.0)


def test_op_opcheck():
    # Schema, fake impl, autograd registration and AOT dispatch with dynamic shapes.
    x, qweight, wscale, b, s = _linear_inputs((3, 33), 8, torch.float32, bias=True, smooth=True, device="cpu")
    torch.library.opcheck(op, (x.requires_grad_(), qweight, wscale, b.requires_grad_(), s))


def test_op_backward_is_straight_through():
    x, qweight, wscale, b, s = _linear_inputs((2, 3, 16), 8, torch.float32, bias=True, smooth=True, device="cpu")
    x.requires_grad_()
    b.requires_grad_()
    grad_out = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(7))
    gx, gb = torch.autograd.grad(op(x, qweight, wscale, b, s), (x, b), grad_out)

    # Rounding counts as identity: d/dx of (x * s) @ dequantized(W).T.
    w = qweight.float() * wscale[:, None]
    torch.testing.assert_close(gx, (grad_out @ w) * s)
    torch.testing.assert_close(gb, grad_out.sum((0, 1)))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_cost(bias):
    m, k, n = 4, 64, 32
    x, qweight, wscale, b, s = _linear_inputs((2, 2, k), n, torch.bfloat16, bias=bias, smooth=True, device="cpu")
    node = single_node_graph(op, (x, qweight, wscale, b, s))
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(node)

    assert cost.kind == "custom"
    assert cost.flops == 2 * m * n * k + (m * n if bias else 0)
    io = m * k * 2 + n * k + n * 4 + (n * 2 if bias else 0) + k * 4 + m * n * 2  # x, W, wscale, bias, smooth, out
    roundtrip = 2 * m * k + 2 * 4 * m  # int8 codes and fp32 scales, written by one kernel, read by the next
    assert cost.bytes == io + roundtrip


@pytest.mark.parametrize("call", [linear_w8a8_triton, op], ids=["launcher", "op"])
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(2, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int8), torch.ones(4)),
         "x must be float16, bfloat16 or float32"),
        ((torch.ones(2, 0), torch.ones(4, 0, dtype=torch.int8), torch.ones(4)), "non-empty last dimension"),
        ((torch.ones(2, 8), torch.ones(4, 8), torch.ones(4)), r"qweight must be torch.int8 of shape \(N, K\)"),
        ((torch.ones(2, 8), torch.ones(4, 9, dtype=torch.int8), torch.ones(4)), r"K = x.shape\[-1\] = 8"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4, dtype=torch.float16)),
         "wscale must be float32"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(1, 4)), r"wscale .* shape \(N,\)"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), torch.ones(5)), "bias must be"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), None,
          torch.ones(8, dtype=torch.float16)), r"smooth must be float32 of shape \(K,\)"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), None, torch.ones(7)),
         r"smooth must be float32 of shape \(K,\)"),
    ],
    ids=["x-int32", "k-zero", "qweight-float", "qweight-k", "wscale-fp16", "wscale-2d", "bias-n", "smooth-fp16",
         "smooth-k"],
)
def test_bad_inputs_raise_value_error(call, args, match):
    with pytest.raises(ValueError, match=match):
        call(*args)


def test_launcher_rejects_mixed_devices_and_huge_k():
    with pytest.raises(ValueError, match="qweight must be on x's device"):
        linear_w8a8_triton(torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8, device="meta"), torch.ones(4))
    k = MAX_K + 1
    with pytest.raises(ValueError, match="int32 accumulation"):
        linear_w8a8_triton(torch.ones(1, k, device="meta"), torch.ones(1, k, dtype=torch.int8, device="meta"),
                           torch.ones(1, device="meta"))


@needs_compiled_cuda
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_4096_matches_reference(m):
    x, qweight, wscale, b, s = _linear_inputs((m, 4096), 4096, torch.bfloat16, bias=True, smooth=True)
    out = linear_w8a8_triton(x, qweight, wscale, b, s)

    ref = linear_w8a8_reference(x.cpu(), qweight.cpu(), wscale.cpu(), b.cpu(), s.cpu())
    torch.testing.assert_close(out.cpu(), ref, atol=1e-2, rtol=1.6e-2)


@needs_compiled_cuda
def test_op_under_torch_compile_cuda_runs_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    x, qweight, wscale, b, s = _linear_inputs((4, 3, 256), 128, torch.bfloat16, bias=True, smooth=True)

    def fn(x):
        return op(x, qweight, wscale, b, s)

    out, code = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True), x)
    # triton_op lets Inductor see both user kernels and emit them in its own wrapper.
    assert any("_quantize_per_token_int8_kernel" in src for src in code)
    assert any("_scaled_mm_kernel" in src for src in code)
    ref = linear_w8a8_reference(x.cpu(), qweight.cpu(), wscale.cpu(), b.cpu(), s.cpu())
    torch.testing.assert_close(out.cpu(), ref, atol=1e-2, rtol=1.6e-2)
