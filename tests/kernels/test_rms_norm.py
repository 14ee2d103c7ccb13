"""Tests for llmcompress/kernels/rms_norm.py: the Triton launcher, the reference and the custom op."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmcompress.kernels  # noqa: F401  (registers torch.ops.llmcompress.*)
from llmcompress.kernels.rms_norm import rms_norm_reference, rms_norm_triton
from llmcompress.testing.devices import DEVICE, INTERPRET, needs_compiled_cuda, needs_triton

EPS = 1e-6

SHAPES = [(1, 7), (3, 5, 123), (2, 1000), (4, 384), (2, 4097)]

# fp16/bf16 outputs round twice (normalized row, then the weight product), so against
# float64 the error is up to ~2 ulps of the output dtype; against the same-dtype
# reference one ulp of h can flip where fp32 sums differ in order.
DTYPE_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 2e-3),
    (torch.bfloat16, 1e-2, 2e-2),
]


def _inputs(shape, x_dtype, w_dtype=None, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    # Weights around 1 with spread, like a trained norm; never all-ones.
    w = 1.0 + 0.5 * torch.randn(shape[-1], generator=g)
    return x.to(device, x_dtype), w.to(device, w_dtype or x_dtype)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype, atol, rtol):
    x, w = _inputs(shape, dtype)
    out = rms_norm_triton(x, w, EPS)

    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device
    expected64 = rms_norm_reference(x.double(), w.double(), EPS)
    torch.testing.assert_close(out.double(), expected64, atol=atol, rtol=rtol)
    torch.testing.assert_close(out, rms_norm_reference(x, w, EPS), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_triton_mixed_dtypes_promote_like_reference(x_dtype, w_dtype):
    x, w = _inputs((3, 130), x_dtype, w_dtype)
    out = rms_norm_triton(x, w, EPS)
    expected = rms_norm_reference(x, w, EPS)

    assert out.dtype == expected.dtype == torch.promote_types(x_dtype, w_dtype)
    # The output is fp32, but h was rounded to x_dtype first: allow one ulp of x_dtype.
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize(
    "x_dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                INTERPRET, reason="the Triton interpreter truncates fp32->bf16 casts (GPU rounds to nearest)"
            ),
        ),
    ],
)
def test_triton_rounds_before_weight_multiply(x_dtype):
    # With an fp32 weight the output is fp32, so the only rounding is of the normalized
    # row to x_dtype. Rounding in the same place as LlamaRMSNorm gives bitwise-equal
    # outputs except where fp32 sum order flips a rounding (measured: 100% equal for
    # fp16 under the interpreter); multiplying before rounding gives ~0% equal.
    x, w = _inputs((8, 1000), x_dtype, torch.float32)
    out = rms_norm_triton(x, w, EPS)
    expected = rms_norm_reference(x, w, EPS)

    assert out.dtype == torch.float32
    assert (out == expected).float().mean().item() >= 0.99


@needs_triton
def test_triton_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    w = (1.0 + 0.5 * torch.randn(64, generator=g)).to(DEVICE)
    cases = {
        # last-dim stride 4: the launcher copies to contiguous
        "transposed": torch.randn(64, 4, generator=g).to(DEVICE).t(),
        # last-dim stride 1, row stride 128: read in place through the row stride
        "row-strided": torch.randn(6, 64, generator=g).to(DEVICE)[::2],
        # leading dims that cannot be merged by a view: reshape copies
        "permuted": torch.randn(5, 3, 64, generator=g).to(DEVICE).transpose(0, 1),
    }
    for name, x in cases.items():
        assert not x.is_contiguous(), name
        out = rms_norm_triton(x, w, EPS)
        torch.testing.assert_close(out, rms_norm_reference(x, w, EPS), msg=name)


@needs_triton
def test_triton_empty_input():
    x, w = _inputs((0, 16), torch.float32)
    assert rms_norm_triton(x, w, EPS).shape == (0, 16)


def test_op_cpu_equals_reference():
    x, w = _inputs((3, 5, 123), torch.bfloat16, device="cpu")
    expected = rms_norm_reference(x, w, EPS)

    assert torch.equal(torch.ops.llmcompress.rms_norm(x, w, EPS), expected)
    assert torch.equal(torch.ops.llmcompress.rms_norm.default(x, w, EPS), expected)


def test_op_cpu_non_contiguous():
    x, w = _inputs((64, 4), torch.float32, device="cpu")
    x, w = x.t(), 1.0 + torch.arange(64.0) / 64
    torch.testing.assert_close(
        torch.ops.llmcompress.rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS)
    )


def test_op_in_fx_graph():
    class Norm(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.register_buffer("w", w)

        def forward(self, x):
            return torch.ops.llmcompress.rms_norm.default(x, self.w, EPS)

    x, w = _inputs((2, 3, 40), torch.float32, device="cpu")
    gm = torch.fx.symbolic_trace(Norm(w))

    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.llmcompress.rms_norm.default]
    torch.testing.assert_close(gm(x), rms_norm_reference(x, w, EPS))


def test_op_under_torch_compile_cpu():
    x, w = _inputs((2, 3, 40), torch.float32, device="cpu")

    def fn(x, w):
        return torch.ops.llmcompress.rms_norm(x, w, EPS) * 2.0

    out = torch.compile(fn, backend="inductor", fullgraph=True)(x, w)
    torch.testing.assert_close(out, rms_norm_reference(x, w, EPS) * 2.0)


@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_op_fake_impl_shape_and_dtype(x_dtype, w_dtype):
    with FakeTensorMode():
        x = torch.empty(2, 7, 96, dtype=x_dtype)
        w = torch.empty(96, dtype=w_dtype)
        out = torch.ops.llmcompress.rms_norm.default(x, w, EPS)

    assert out.shape == (2, 7, 96)
    assert out.dtype == torch.promote_types(x_dtype, w_dtype)
    assert out.device == x.device


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_op_opcheck(x_dtype):
    # Schema, fake impl, autograd registration and AOT dispatch with dynamic shapes.
    x, w = _inputs((3, 33), x_dtype, torch.float32, device="cpu")
    torch.library.opcheck(
        torch.ops.llmcompress.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), EPS)
    )


def test_op_backward_matches_reference_autograd():
    x, w = _inputs((3, 5, 33), torch.float32, device="cpu")
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    x.requires_grad_()
    w.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()

    got = torch.autograd.grad(torch.ops.llmcompress.rms_norm(x, w, EPS), (x, w), grad_out)
    want = torch.autograd.grad(rms_norm_reference(x64, w64, EPS), (x64, w64), grad_out.double())
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


@needs_compiled_cuda
def test_op_under_torch_compile_cuda_runs_triton_kernel():
    from torch._inductor.utils import run_and_get_code

    x, w = _inputs((4, 3, 384), torch.bfloat16)

    def fn(x, w):
        return torch.ops.llmcompress.rms_norm(x, w, EPS)

    out, code = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True), x, w)
    # triton_op lets Inductor see the user kernel and emit it in its own wrapper.
    assert any("_rms_norm_kernel" in src for src in code)
    torch.testing.assert_close(out, rms_norm_reference(x, w, EPS), atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "call",
    [rms_norm_triton, torch.ops.llmcompress.rms_norm.default],
    ids=["launcher", "op"],
)
@pytest.mark.parametrize(
    "x,w,match",
    [
        (torch.ones(2, 8), torch.ones(9), r"weight must be 1-D of size x.shape\[-1\]=8"),
        (torch.ones(2, 8), torch.ones(1, 8), r"weight must be 1-D of size x.shape\[-1\]=8"),
        (torch.ones(2, 8, dtype=torch.int32), torch.ones(8), "float16, bfloat16 or float32"),
        (torch.ones(2, 8, dtype=torch.float64), torch.ones(8), "float16, bfloat16 or float32"),
        (torch.ones(2, 8), torch.ones(8, dtype=torch.int64), "float16, bfloat16 or float32"),
    ],
    ids=["weight-too-long", "weight-2d", "x-int32", "x-float64", "weight-int64"],
)
def test_bad_inputs_raise_value_error(call, x, w, match):
    with pytest.raises(ValueError, match=match):
        call(x, w, EPS)


def test_launcher_rejects_mixed_devices():
    x = torch.ones(2, 8)
    w = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        rms_norm_triton(x, w, EPS)
