"""FP8 linear: float8 e4m3 weights per output channel times e4m3 activations scaled per token at run time.

Entry points:
- `torch.ops.llmcompress.linear_fp8(x, qweight, wscale, bias=None)`: the custom op that the quantize-linear pass
  inserts; CUDA runs the two Triton kernels (compute capability >= 8.9, else `FP8UnsupportedError`), CPU runs
  `linear_fp8_reference`.
- `linear_fp8_triton(...)`: checks inputs and the device, quantizes x (`quantize_per_token_fp8_triton`), then runs
  the fp8 GEMM (`w8a8_linear._scaled_mm_kernel` with fp8e4nv operands and fp32 accumulation).
- `fp8_supported(device)`: whether the compiled kernels can run there.
- `linear_fp8_reference(...)`, `quantize_per_token_fp8_reference(...)`: plain torch, the definition.

The math, with the stored formats of `llmcompress/formats/quantized.py`:

    q, s = quantize_fp8_per_token(x)                          # (M, K) float8_e4m3fn, (M, 1) float32
    acc[m, n] = sum_k q[m, k] * qweight[n, k]                 # float64 here (exact); fp32 in the kernel
    y = (float32(acc) * s[m] * wscale[n] + bias[n]).to(x.dtype)   # float32, left to right

The kernel's codes and scales equal the reference's bit for bit; its fp32 accumulation (on sm_90 the tensor core's
reduced-precision fp8 accumulation within each BLOCK_K tile) rounds where the reference does not.

The Triton interpreter runs both kernels on CPU tensors (it loads float8_e4m3fn as bytes and widens fp8 dot
operands to float16, exactly), so they are tested on CPU too. Its fp32 -> fp8 cast is not torch's
round-to-nearest-even (it rounds half up and loses the mantissa carry: 81% of random values matched), which is why
the quantization kernel rounds to the e4m3 grid itself and casts only representable values.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import register_cost
from llmcompress.errors import LLMCompressError
from llmcompress.formats.quantized import dequantize_fp8, quantize_fp8_per_token
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.w8a8_linear import (
    check_per_token_activation,
    check_per_token_linear,
    per_token_launch_params,
    per_token_linear_cost,
    per_token_outputs,
    per_token_quantized_linear,
    round_half_even,
    row_absmax,
    scaled_mm_reference,
)

__all__ = [
    "FP8UnsupportedError",
    "check_fp8_device",
    "fp8_supported",
    "linear_fp8_reference",
    "linear_fp8_triton",
    "quantize_per_token_fp8_reference",
    "quantize_per_token_fp8_triton",
]

# float8 e4m3 arithmetic (cvt to e4m3 and fp8 mma) arrived with Ada (sm_89) and Hopper (sm_90).
MIN_CAPABILITY = (8, 9)


class FP8UnsupportedError(LLMCompressError):
    """The fp8 kernels were asked to run on a device without float8 e4m3 support."""


def fp8_supported(device: Union[torch.device, str, int]) -> bool:
    """Whether the compiled fp8 kernels run on `device`: a CUDA GPU of compute capability >= 8.9.

    False on CPU (where only the reference, or the kernels under TRITON_INTERPRET=1, run) and on ROCm, whose
    fp8 on MI300 is the fnuz variant, not float8_e4m3fn.
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip:
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= MIN_CAPABILITY


def check_fp8_device(device: Union[torch.device, str, int], name: str = "linear_fp8") -> None:
    """Raise `FP8UnsupportedError` (message prefixed by `name`) if `device` is a GPU that cannot run the fp8
    kernels; other devices pass."""
    device = torch.device(device)
    if device.type != "cuda" or fp8_supported(device):
        return
    if torch.version.hip:
        raise FP8UnsupportedError(
            f"{name}: {torch.cuda.get_device_name(device)} ({device}) is a ROCm GPU; the fp8 kernels need "
            "float8_e4m3fn on a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or later)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    raise FP8UnsupportedError(
        f"{name}: {torch.cuda.get_device_name(device)} ({device}) has compute capability {major}.{minor}; "
        f"the fp8 e4m3 kernels need a CUDA GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
        "(Ada, Hopper or later)"
    )


@triton.jit
def _to_e4m3_grid(v):
    """Round float32 v (|v| <= 448) to the nearest float8_e4m3fn value, ties to even, still as float32.

    The e4m3 spacing is 2**(e - 3) for exponent e >= -6 and 2**-9 below (subnormals); v times the reciprocal
    spacing (both powers of two, built from exponent bits) is exact, so the only rounding is `round_half_even`.
    The result is representable, so the cast that follows is exact on every backend.
    """
    biased = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)
    spacing = ((biased - 3) << 23).to(tl.float32, bitcast=True)
    inv_spacing = ((254 - (biased - 3)) << 23).to(tl.float32, bitcast=True)
    return round_half_even(v * inv_spacing) * spacing


@triton.jit
def _quantize_per_token_fp8_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    n_cols,
    x_row_stride,
    q_row_stride,
    BLOCK_K: tl.constexpr,
):
    # One program per row, two passes (absmax, then quantize), as _quantize_per_token_int8_kernel.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    q_row = q_ptr + row * q_row_stride

    amax = row_absmax(x_row, x_row, n_cols, False, BLOCK_K)
    # div_rn: Triton's fp32 `/` is an approximate division on GPU; torch's is correctly rounded.
    scale = tl.maximum(tl.math.div_rn(amax, 448.0), 1e-8)
    tl.store(scale_ptr + row, scale)

    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
        tl.store(q_row + cols, _to_e4m3_grid(v).to(tl.float8e4nv), mask=mask)


def _check_fp8_launch(name: str, x: torch.Tensor) -> None:
    common.check_launchable(name, x)
    check_fp8_device(x.device, name)


def quantize_per_token_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`formats.quantize_fp8_per_token(x)` over any leading dims.

    Args:
        x: (..., K) float.

    Returns:
        q: (..., K) float8_e4m3fn; scale: (..., 1) float32 with each row's absmax mapped to 448.
    """
    k = x.shape[-1]
    q, scale = quantize_fp8_per_token(x.reshape(-1, k))
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_per_token_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `_quantize_per_token_fp8_kernel`, one program per row; bitwise equal to the reference.

    Args:
        x: (..., K) float16/bfloat16/float32 on a GPU of compute capability >= 8.9 (CPU only under
            TRITON_INTERPRET=1).

    Returns:
        q: (..., K) float8_e4m3fn contiguous; scale: (..., 1) float32 contiguous.
    """
    name = "quantize_per_token_fp8_triton"
    check_per_token_activation(name, x)
    _check_fp8_launch(name, x)
    k = x.shape[-1]
    x2d, q, q2d, scale = per_token_outputs(x, torch.float8_e4m3fn)
    if q.numel() == 0:
        return q, scale
    block_k, num_warps = per_token_launch_params(k)
    common.wrap(_quantize_per_token_fp8_kernel)[(x2d.shape[0],)](
        x2d, q2d, scale, k, x2d.stride(0), q2d.stride(0), BLOCK_K=block_k, num_warps=num_warps
    )
    return q, scale


def linear_fp8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The definition of the fp8 linear; the CPU path of the op and the oracle for tests.

    Products of two e4m3 values have 8 significant bits and lie in [2**-18, 448**2]; their sum over K < 2**17
    terms is exact in float64, then rounded once to float32; the epilogue is float32, left to right.

    Args:
        x: (..., K) float16/bfloat16/float32.
        qweight: (N, K) float8_e4m3fn, `formats.quantize_fp8_per_channel` values.
        wscale: (N,) float32.
        bias: (N,) float or None.

    Returns:
        (..., N) in x.dtype.
    """
    q, s = quantize_per_token_fp8_reference(x)
    return scaled_mm_reference(q, s, qweight, wscale, bias, x)


def linear_fp8_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantize x per token to e4m3 (one launch), then the fp8 GEMM with scales and bias in its epilogue.

    Same arguments and result as `linear_fp8_reference`, all on one GPU of compute capability >= 8.9
    (`FP8UnsupportedError` on older GPUs; CPU only under TRITON_INTERPRET=1).

    Returns:
        (..., N) contiguous, x.dtype.
    """
    name = "linear_fp8_triton"
    check_per_token_linear(name, x, qweight, torch.float8_e4m3fn, wscale, bias)
    _check_fp8_launch(name, x)
    return _linear_impl(x, qweight, wscale, bias)


def _linear_impl(x, qweight, wscale, bias) -> torch.Tensor:
    return per_token_quantized_linear(x, qweight, wscale, bias, quantize_per_token_fp8_triton)


@triton_op("llmcompress::linear_fp8", mutates_args=())
def _linear_fp8_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # triton_op reuses this body as the fake impl and inlines it under torch.compile, so it routes CPU tensors
    # to the reference itself (rms_norm.py). On a GPU below sm_89 this raises while tracing.
    check_per_token_linear("linear_fp8", x, qweight, torch.float8_e4m3fn, wscale, bias)
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        return linear_fp8_reference(x, qweight, wscale, bias)
    check_fp8_device(x.device)
    return _linear_impl(x, qweight, wscale, bias)


@_linear_fp8_op.register_kernel("cpu")
def _linear_fp8_cpu(x, qweight, wscale, bias=None):
    check_per_token_linear("linear_fp8", x, qweight, torch.float8_e4m3fn, wscale, bias)
    return linear_fp8_reference(x, qweight, wscale, bias)


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, wscale, bias = inputs
    ctx.save_for_backward(qweight, wscale)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out: torch.Tensor):
    # Straight-through, as w8a8_linear._backward: dy/dx = the dequantized weight.
    qweight, wscale = ctx.saved_tensors
    grad_x, grad_bias = common.linear_backward(ctx, grad_out, lambda: dequantize_fp8(qweight, wscale), None,
                                               ctx.bias_dtype, 3)
    return grad_x, None, None, grad_bias


_linear_fp8_op.register_autograd(_backward, setup_context=_setup_context)

register_cost(torch.ops.llmcompress.linear_fp8.default)(per_token_linear_cost)
