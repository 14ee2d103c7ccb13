"""Tests for llmcompress/kernels/fp8_linear.py: the e4m3 activation-quantization kernel, the fp8 GEMM, the
reference, the device check, the custom op and its cost.

The Triton interpreter runs fp8 loads, casts and tl.dot on CPU tensors, so the kernels are tested on CPU under
TRITON_INTERPRET=1 as well as on GPUs of compute capability >= 8.9.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.errors import LLMCompressError
from llmcompress.formats.quantized import quantize_fp8_per_channel, quantize_fp8_per_token
from llmcompress.kernels.fp8_linear import (
    FP8UnsupportedError,
    check_fp8_device,
    fp8_supported,
    linear_fp8_reference,
    linear_fp8_triton,
    quantize_per_token_fp8_reference,
    quantize_per_token_fp8_triton,
)
from llmcompress.testing.devices import DEVICE, HAS_CUDA, INTERPRET
from llmcompress.testing.graphs import single_node_graph
from llmcompress.testing.numerics import per_token_linear_float64, random_quantized_linear, sqnr_db

FP8_GPU = HAS_CUDA and fp8_supported("cuda")

needs_fp8_triton = pytest.mark.skipif(
    not (FP8_GPU or (INTERPRET and not HAS_CUDA)),
    reason="needs a CUDA GPU of compute capability >= 8.9, or TRITON_INTERPRET=1 on CPU",
)
needs_fp8_gpu = pytest.mark.skipif(
    not FP8_GPU or INTERPRET, reason="needs a CUDA GPU of compute capability >= 8.9 without TRITON_INTERPRET"
)

op = torch.ops.llmcompress.linear_fp8.default

# Against the reference (exact sums rounded once) the kernel's fp32 accumulation adds a relative error of about
# K * 2**-24 of the row's magnitude on the interpreter; on sm_90 the fp8 tensor core accumulates each BLOCK_K tile
# with fewer mantissa bits, so GPU runs allow 2e-3 of the output's range on top. Then the cast to the output
# dtype (the interpreter truncates fp32 -> bf16: one bf16 ulp = 2**-7 relative).
# The GEMM's tl.dot takes the e4m3 codes as a GPU does (the interpreter widens them to fp16 exactly, and does not
# upcast to fp32 as for the weight-only kernels' fp16/bf16 dots): the GPU path's operand dtypes.
DTYPE_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-2, 1.6e-2),
]
ACC_SLACK = 2e-3 if HAS_CUDA else 0.0


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.uint8)


def _linear_inputs(shape, n, dtype, bias=False, device=DEVICE, seed=0):
    """x (*shape) in dtype, e4m3 weight (n, K) from a random float one, its scales, optional bias."""
    return random_quantized_linear(shape, n, dtype, quantize_fp8_per_channel, bias, False, device, seed)[:4]


def _exact_quantized_math(x, qweight, wscale, bias):
    """The quantized math in float64 throughout, from the reference's codes and scales (computed on CPU)."""
    q, s = quantize_per_token_fp8_reference(x.cpu())
    return per_token_linear_float64(q, s, qweight, wscale, bias)


def _assert_close(out, ref, atol, rtol):
    ref = ref.to(out.dtype) if ref.dtype != torch.float64 else ref
    slack = ACC_SLACK * ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.cpu().to(ref.dtype), ref, atol=atol + slack, rtol=rtol)


@needs_fp8_triton
@pytest.mark.parametrize("k", [33, 100, 257])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_quantize_kernel_equals_formats(m, k):
    g = torch.Generator().manual_seed(1)
    # Columns spanning five decades, so small values land on e4m3 subnormals (below 2**-6 after scaling).
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)).to(DEVICE, torch.bfloat16)
    q, scale = quantize_per_token_fp8_triton(x)

    q_ref, scale_ref = quantize_fp8_per_token(x.cpu())
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k)
    assert scale.dtype == torch.float32 and scale.shape == (m, 1)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(scale.cpu(), scale_ref)


@needs_fp8_triton
def test_quantize_kernel_rounds_to_nearest_even_on_the_e4m3_grid():
    # Row absmax 448 gives scale exactly 1, so the codes are the values cast to e4m3: every finite e4m3 value
    # (subnormals, both zeros) must survive, and every midpoint between neighbours must round to the even one.
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[~values.isnan()]
    pos = values[values > 0].sort().values
    midpoints = (pos[:-1] + pos[1:]) / 2  # exact in fp32
    row = torch.cat([torch.tensor([448.0]), values, midpoints, -midpoints, torch.tensor([1e-30, -1e-30])])
    q, scale = quantize_per_token_fp8_triton(row[None].to(DEVICE))

    assert scale.item() == 1.0
    assert torch.equal(_bits(q)[0], _bits(row.to(torch.float8_e4m3fn)))


@needs_fp8_triton
def test_quantize_kernel_zero_row_and_non_contiguous():
    base = torch.randn(40, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    base[:, 2] = 0
    x = base.t()  # last-dim stride 6: copied
    q, scale = quantize_per_token_fp8_triton(x)
    q_ref, scale_ref = quantize_per_token_fp8_reference(x.cpu())

    assert scale[2].item() == pytest.approx(1e-8)
    assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(scale.cpu(), scale_ref)


@needs_fp8_triton
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("n", [33, 100])
@pytest.mark.parametrize("shape", [(2, 3, 100), (17, 257)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_gemm_matches_reference(shape, n, bias, dtype, atol, rtol):
    x, qweight, wscale, b = _linear_inputs(shape, n, dtype, bias=bias)
    out = linear_fp8_triton(x, qweight, wscale, b)

    assert out.shape == (*shape[:-1], n)
    assert out.dtype == dtype and out.device == x.device
    ref = linear_fp8_reference(x.cpu(), qweight.cpu(), wscale.cpu(), None if b is None else b.cpu())
    _assert_close(out, ref, atol, rtol)
    _assert_close(out, _exact_quantized_math(x, qweight, wscale, b), atol, rtol)


@needs_fp8_triton
def test_gemm_empty_rows():
    x, qweight, wscale, b = _linear_inputs((0, 64), 33, torch.float16, bias=True)
    assert linear_fp8_triton(x, qweight, wscale, b).shape == (0, 33)


@needs_fp8_triton
def test_kernel_end_to_end_sqnr():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(16, 256, generator=g), torch.randn(64, 256, generator=g) * 0.02
    qweight, wscale = quantize_fp8_per_channel(w)
    out = linear_fp8_triton(x.to(DEVICE), qweight.to(DEVICE), wscale.to(DEVICE))

    # e4m3 keeps 3 mantissa bits (~31 dB per operand); measured 28.9 dB for the product.
    assert sqnr_db(x @ w.T, out.cpu()) >= 26


def test_reference_is_formats_math():
    # The reference is the formats' quantized math: dequantized activations times dequantized weights.
    x, qweight, wscale, b = _linear_inputs((3, 2, 50), 20, torch.float32, bias=True, device="cpu")
    q, xs = quantize_fp8_per_token(x.reshape(-1, 50))
    expected = ((q.float() * xs) @ (qweight.float() * wscale[:, None]).T + b).reshape(3, 2, 20)
    torch.testing.assert_close(linear_fp8_reference(x, qweight, wscale, b), expected, atol=1e-5, rtol=1e-5)


def test_reference_sqnr():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(16, 256, generator=g).bfloat16(), torch.randn(64, 256, generator=g) * 0.02
    out = linear_fp8_reference(x, *quantize_fp8_per_channel(w))
    assert out.dtype == torch.bfloat16
    assert sqnr_db(x.float() @ w.T, out) >= 26


def test_fp8_supported():
    assert fp8_supported("cpu") is False
    assert fp8_supported(torch.device("cpu")) is False
    assert fp8_supported("meta") is False


@pytest.mark.parametrize("capability,supported", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_supported_follows_capability(monkeypatch, capability, supported):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    assert fp8_supported(torch.device("cuda", 0)) is supported
    if supported:
        check_fp8_device("cuda:0")
    else:
        match = (rf"linear_fp8: NVIDIA Test GPU \(cuda:0\) has compute capability {capability[0]}\.{capability[1]}; "
                 r".* compute capability >= 8\.9")
        with pytest.raises(FP8UnsupportedError, match=match):
            check_fp8_device("cuda:0")


def test_op_raises_on_old_gpu_while_tracing(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    # Fake CUDA tensors need no GPU: the op's fake impl checks the device before anything launches.
    with FakeTensorMode(), pytest.raises(FP8UnsupportedError, match="A100.*8.0") as info:
        x = torch.empty(2, 64, dtype=torch.bfloat16, device="cuda")
        op(x, torch.empty(32, 64, dtype=torch.float8_e4m3fn, device="cuda"), torch.empty(32, device="cuda"))
    assert isinstance(info.value, LLMCompressError) and isinstance(info.value, RuntimeError)


def test_op_cpu_equals_reference():
    x, qweight, wscale, b = _linear_inputs((2, 3, 40), 24, torch.bfloat16, bias=True, device="cpu")
    expected = linear_fp8_reference(x, qweight, wscale, b)

    assert torch.equal(torch.ops.llmcompress.linear_fp8(x, qweight, wscale, b), expected)
    assert torch.equal(op(x, qweight, wscale, bias=b), expected)
    assert torch.equal(op(x, qweight, wscale), linear_fp8_reference(x, qweight, wscale))


def test_op_schema():
    assert str(op._schema) == (
        "llmcompress::linear_fp8(Tensor x, Tensor qweight, Tensor wscale, Tensor? bias=None) -> Tensor"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_fake_impl_shape_and_dtype(dtype):
    with FakeTensorMode():
        x = torch.empty(2, 7, 96, dtype=dtype)
        out = op(x, torch.empty(48, 96, dtype=torch.float8_e4m3fn), torch.empty(48), torch.empty(48, dtype=dtype))

    assert out.shape == (2, 7, 48)
    assert out.dtype == dtype
    assert out.device == x.device


def test_op_under_torch_compile_eager_backend():
    x, qweight, wscale, b = _linear_inputs((2, 5, 64), 24, torch.bfloat16, bias=True, device="cpu")

    def fn(x):
        return op(x, qweight, wscale, b) + 1.0

    out = torch.compile(fn, backend="eager", fullgraph=True)(x)
    assert out.shape == (2, 5, 24) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, linear_fp8_reference(x, qweight, wscale, b) + 1.0)


def test_op_opcheck():
    x, qweight, wscale, b = _linear_inputs((3, 33), 8, torch.float32, bias=True, device="cpu")
    # test_schema is left out: it runs ops on every input that CPU torch lacks for float8 ("mul_cpu_reduced_float").
    torch.library.opcheck(op, (x.requires_grad_(), qweight, wscale, b.requires_grad_()),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


def test_op_backward_is_straight_through():
    x, qweight, wscale, b = _linear_inputs((3, 16), 8, torch.float32, bias=True, device="cpu")
    x.requires_grad_()
    grad_out = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    (gx,) = torch.autograd.grad(op(x, qweight, wscale, b), (x,), grad_out)
    torch.testing.assert_close(gx, grad_out @ (qweight.float() * wscale[:, None]))


def test_cost():
    m, k, n = 6, 64, 32
    x, qweight, wscale, b = _linear_inputs((m, k), n, torch.float16, bias=True, device="cpu")
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(single_node_graph(op, (x, qweight, wscale, b)))

    assert cost.kind == "custom"
    assert cost.flops == 2 * m * n * k + m * n
    io = m * k * 2 + n * k + n * 4 + n * 2 + m * n * 2  # x, W (fp8), wscale, bias, out
    roundtrip = 2 * m * k + 2 * 4 * m  # fp8 codes and fp32 scales, written by one kernel, read by the next
    assert cost.bytes == io + roundtrip


@pytest.mark.parametrize("call", [linear_fp8_triton, op], ids=["launcher", "op"])
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(2, 8, dtype=torch.float64), torch.ones(4, 8, dtype=torch.float8_e4m3fn), torch.ones(4)),
         "x must be float16, bfloat16 or float32"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4)),
         r"qweight must be torch.float8_e4m3fn of shape \(N, K\)"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.float8_e5m2), torch.ones(4)), "float8_e4m3fn"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.float8_e4m3fn), torch.ones(5)),
         r"wscale must be float32 of shape \(N,\)"),
        ((torch.ones(2, 8), torch.ones(4, 8, dtype=torch.float8_e4m3fn), torch.ones(4), torch.ones(4, 1)),
         "bias must be"),
    ],
    ids=["x-float64", "qweight-int8", "qweight-e5m2", "wscale-n", "bias-2d"],
)
def test_bad_inputs_raise_value_error(call, args, match):
    with pytest.raises(ValueError, match=match):
        call(*args)


@needs_fp8_gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_gpu_4096_matches_reference_and_scaled_mm(m):
    x, qweight, wscale, b = _linear_inputs((m, 4096), 4096, torch.bfloat16, bias=True)
    out = linear_fp8_triton(x, qweight, wscale, b)

    ref = linear_fp8_reference(x.cpu(), qweight.cpu(), wscale.cpu(), b.cpu())
    _assert_close(out, ref, 1e-2, 1.6e-2)
    if m % 16:
        return  # torch._scaled_mm wants every dimension a multiple of 16
    q, xs = quantize_per_token_fp8_reference(x)
    try:
        expected = torch._scaled_mm(q, qweight.t(), scale_a=xs, scale_b=wscale[None, :], bias=b,
                                    out_dtype=torch.bfloat16)
    except RuntimeError as e:  # row-wise scaling needs a recent torch and sm_89+
        pytest.skip(f"torch._scaled_mm with row-wise scales unavailable: {e}")
    _assert_close(out, expected.cpu(), 1e-2, 1.6e-2)


@needs_fp8_gpu
def test_op_under_torch_compile_cuda_runs_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    x, qweight, wscale, b = _linear_inputs((4, 3, 256), 128, torch.bfloat16, bias=True)

    def fn(x):
        return op(x, qweight, wscale, b)

    out, code = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True), x)
    assert any("_quantize_per_token_fp8_kernel" in src for src in code)
    assert any("_scaled_mm_kernel" in src for src in code)
    _assert_close(out, linear_fp8_reference(x.cpu(), qweight.cpu(), wscale.cpu(), b.cpu()), 1e-2, 1.6e-2)
