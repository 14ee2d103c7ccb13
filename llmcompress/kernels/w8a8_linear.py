"""W8A8 linear: int8 weights per output channel times int8 activations quantized per token at run time.

Entry points:
- `torch.ops.llmcompress.linear_w8a8(x, qweight, wscale, bias=None, smooth=None)`: the custom op that the
  quantize-linear pass inserts; CUDA runs the two Triton kernels, CPU runs `linear_w8a8_reference`.
- `linear_w8a8_triton(...)`: checks inputs, quantizes x (`quantize_per_token_int8_triton`), then runs the int8
  GEMM `_scaled_mm_kernel` (shared with `fp8_linear.py`).
- `quantize_per_token_int8_triton(x, smooth=None)`: the activation-quantization kernel alone.
- `linear_w8a8_reference(...)`, `quantize_per_token_int8_reference(...)`: plain torch, the definition.
- shared with `fp8_linear.py`, which runs the same per-token scheme on e4m3: the Triton helpers `round_half_even` and
  `row_absmax`, `check_per_token_activation`, `check_per_token_linear`, `per_token_outputs`,
  `per_token_launch_params`, `per_token_quantized_linear` (quantize, then `_scaled_mm`), `scaled_mm_reference` and
  the cost `per_token_linear_cost`.

The math, with the stored formats of `llmcompress/formats/quantized.py`:

    q, s = quantize_int8_per_token(x.float() * smooth)      # (M, K) int8 in [-127, 127], (M, 1) float32
    acc[m, n] = sum_k q[m, k] * qweight[n, k]                # exact: int32 in the kernel, float64 here
    y = (float32(acc) * s[m] * wscale[n] + bias[n]).to(x.dtype)   # float32, left to right

`smooth` is SmoothQuant's 1/s per input channel (K,); the weight was quantized as W * s, so x * (1/s) @ (W * s).T
equals x @ W.T before rounding. The kernel's codes and scales equal the reference's bit for bit (correctly rounded
division and round-half-to-even, see `_quantize_per_token_int8_kernel`); int32 accumulation is exact, so the output
differs from the reference only by fp32 rounding in the epilogue (an FMA on GPU) and the final cast.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import io_bytes, numel, register_cost, sym
from llmcompress.formats.quantized import INT8_MAX, dequantize_int8, quantize_int8_per_token
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.linear_common import grouped_pid

__all__ = [
    "linear_w8a8_reference",
    "linear_w8a8_triton",
    "quantize_per_token_int8_reference",
    "quantize_per_token_int8_triton",
]

# int32 accumulation cannot overflow while K * 127 * 127 < 2**31.
MAX_K = (2**31 - 1) // (INT8_MAX * INT8_MAX)


@triton.jit
def round_half_even(v):
    """torch.round of float32 v (|v| < 2**23): nearest integer, ties to even, the sign of v kept (-0.4 -> -0.0).

    libdevice.rint would do on GPU, but the Triton interpreter has no libdevice, and floor(v + 0.5) is wrong at
    0.49999997 (the sum rounds up to 1.0); v - floor(v) is exact, so this is exact everywhere.
    """
    a = tl.abs(v)
    r = tl.floor(a)
    frac = a - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    return tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)


@triton.jit
def row_absmax(x_row, smooth_ptr, n_cols, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr):
    """max_k |x_row[k] * smooth[k]| in fp32, BLOCK_K columns at a time (smooth only if HAS_SMOOTH): the first pass
    of the per-token quantization kernels (shared with fp8_linear)."""
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(smooth_ptr + cols, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.abs(v))
    return tl.max(amax, axis=0)


@triton.jit
def _quantize_per_token_int8_kernel(
    x_ptr,
    smooth_ptr,
    q_ptr,
    scale_ptr,
    n_cols,
    x_row_stride,
    q_row_stride,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per row, two passes over it (absmax, then quantize); the second pass reads x again, from L2
    # for any LLM row (K * 2 bytes <= 64 KB).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    q_row = q_ptr + row * q_row_stride

    amax = row_absmax(x_row, smooth_ptr, n_cols, HAS_SMOOTH, BLOCK_K)
    # div_rn: Triton's fp32 `/` is an approximate division on GPU; torch's is correctly rounded. 1e-8 is
    # formats.MIN_SCALE: an all-zero row gets it instead of 0.
    scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-8)
    tl.store(scale_ptr + row, scale)

    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(smooth_ptr + cols, mask=mask, other=0.0)
        q = round_half_even(tl.math.div_rn(v, scale))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_row + cols, q.to(tl.int8), mask=mask)


@triton.jit
def _scaled_mm_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[m, n] = (sum_k a[m, k] * b[n, k]) * a_scale[m] * b_scale[n] (+ bias[n]), a and b int8 or fp8 e4m3.

    `m_bucket` is unused in the body: it is the autotuner's key for M (see `_m_bucket`).
    """
    # Grouped ordering (Triton matmul tutorial): GROUP_M row blocks share their B tiles in L2.
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around instead of being masked; their results are never stored.
    # int64 row offsets: M * K and N * K pass 2**31 for large activations and vocabularies.
    a_rows = (offs_m % M).to(tl.int64)
    b_rows = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + b_rows[None, :] * stride_bn + offs_k[:, None] * stride_bk

    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            # On sm_90 Triton's default lets fp8 wgmma accumulate all of K in its reduced-precision
            # accumulator; promoting to the fp32 acc once per BLOCK_K tile is the DeepSeek-V3 recipe
            # (promotion every 128 elements) and what torch._scaled_mm's use_fast_accum=False buys.
            acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    m_mask = offs_m < M
    n_mask = offs_n < N
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Untuned guesses pending H100 measurement: a small-M tile for decode, medium tiles for short prefill, the
# tutorial's large tiles for long prefill. 8-bit operands halve the shared memory of a bf16 tile, so
# BLOCK_K = 128 fits four stages. Keyed on (M bucket, N, K): the autotuner also keys on the tensors' dtypes,
# so int8 and fp8 tune separately.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
# Under TRITON_INTERPRET=1 one fixed config (autotuning would run every config through the interpreter); the
# largest tiles that keep the tests' few-row GEMMs to a handful of programs.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}

# Shared memory: 8-bit tiles as loaded, or the output tile in the epilogue (fp32 out at 128x256: 131,072 B).
# 128x256 spills on sm_80 (int8: 8,064 B per thread with a bf16 output, 8,668 B with fp32, M = 512, K = N = 4096)
# and with fp8 operands on sm_90 (208-264 B at M = 1 ... 512): offered for int8 on Hopper only
# (benchmarks/gpu_compile.py).
def _scaled_mm_choice(configs, nargs, capability):
    spills = tuple(capability) < (9, 0) or nargs["a_ptr"].dtype != torch.int8
    return [c for c in configs if not (spills and c.kwargs["BLOCK_N"] == 256)]


_scaled_mm_autotuned = common.autotuned(_scaled_mm_kernel, _GPU_CONFIGS, key=["m_bucket", "N", "K"],
                                        shared_bytes=common.tile_shared_bytes(1, 1, common.element_size("out_ptr")),
                                        choose=_scaled_mm_choice)


def _m_bucket(m) -> int:
    # Decode (M <= 16), short prefill, long prefill: one tuning per bucket rather than one per M. On a symbolic
    # M under torch.compile each comparison is a guard, so a graph is specialized to its bucket.
    if m <= 16:
        return 16
    if m <= 64:
        return 64
    if m <= 256:
        return 256
    return 1024


def per_token_launch_params(k: int) -> tuple[int, int]:
    # Rows up to 4096 values are one block (a single trip through each loop); longer rows loop. Warps follow
    # rms_norm's (Liger-Kernel's) thresholds, not tuned for this kernel.
    block_k = min(triton.next_power_of_2(k), 4096)
    return block_k, 8 if block_k >= 2048 else 4


def per_token_outputs(x: torch.Tensor, qdtype: torch.dtype):
    """For a per-token quantization kernel: x (..., K) as (M, K) with unit column stride, the uninitialized outputs
    q (..., K) qdtype and scale (..., 1) float32, and q as (M, K). Returns (x2d, q, q2d, scale)."""
    k = x.shape[-1]
    q = torch.empty(x.shape, dtype=qdtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, k), q, q.view(-1, k), scale


def check_per_token_activation(name: str, x: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> None:
    if x.dtype not in common.SUPPORTED_DTYPES:
        raise ValueError(f"{name}: x must be {common.SUPPORTED_DTYPES_TEXT}, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must have a non-empty last dimension K, got shape {tuple(x.shape)}")
    if smooth is not None:
        if smooth.dtype != torch.float32 or smooth.dim() != 1 or smooth.shape[0] != x.shape[-1]:
            raise ValueError(
                f"{name}: smooth must be float32 of shape (K,) = ({x.shape[-1]},), "
                f"got {smooth.dtype} of shape {tuple(smooth.shape)}"
            )
        if smooth.device != x.device:
            raise ValueError(f"{name}: smooth must be on x's device {x.device}, got {smooth.device}")


def check_per_token_linear(
    name: str,
    x: torch.Tensor,
    qweight: torch.Tensor,
    qdtype: torch.dtype,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor] = None,
) -> None:
    """One ValueError per bad input; shared with fp8_linear (qdtype float8_e4m3fn, no smooth)."""
    check_per_token_activation(name, x, smooth)
    k = x.shape[-1]
    if qweight.dtype != qdtype or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(
            f"{name}: qweight must be {qdtype} of shape (N, K) with K = x.shape[-1] = {k}, "
            f"got {qweight.dtype} of shape {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    if qdtype == torch.int8 and k > MAX_K:
        raise ValueError(f"{name}: K must be <= {MAX_K} (int32 accumulation of int8 products), got {k}")
    if wscale.dtype != torch.float32 or wscale.dim() != 1 or wscale.shape[0] != n:
        raise ValueError(
            f"{name}: wscale must be float32 of shape (N,) = ({n},), got {wscale.dtype} of shape {tuple(wscale.shape)}"
        )
    if bias is not None and (bias.dtype not in common.SUPPORTED_DTYPES or bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(
            f"{name}: bias must be {common.SUPPORTED_DTYPES_TEXT} of shape (N,) = ({n},), "
            f"got {bias.dtype} of shape {tuple(bias.shape)}"
        )
    for what, t in (("qweight", qweight), ("wscale", wscale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {what} must be on x's device {x.device}, got {t.device}")


def _scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
) -> None:
    """Launch `_scaled_mm_kernel` into out (M, N): a (M, K) and b (N, K) both int8 or both float8_e4m3fn,
    a_scale (M,) or (M, 1) and b_scale (N,) float32 contiguous, bias (N,) or None. Needs M, N >= 1."""
    m, k = a.shape
    n = b.shape[0]
    args = (
        a, b, a_scale, b_scale,
        bias if bias is not None else b_scale,  # a valid pointer, never read when HAS_BIAS is False
        out, m, n, k, _m_bucket(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
    )
    common.launch(
        _scaled_mm_kernel,
        _scaled_mm_autotuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        args,
        _INTERPRETER_CONFIG,
        HAS_BIAS=bias is not None,
        INT8=a.dtype == torch.int8,
    )


def scaled_mm_reference(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor],
    x: torch.Tensor,
) -> torch.Tensor:
    """What `_scaled_mm` computes, for the references: the 8-bit dot products summed in float64 (exact, see
    `linear_w8a8_reference` and `linear_fp8_reference`), rounded once to float32; the epilogue float32, left to right.

    Args:
        q: (..., K) the codes of x (..., K); q_scale: (..., 1) float32; qweight: (N, K); wscale: (N,) float32;
        bias: (N,) float or None.

    Returns:
        (..., N) in x.dtype.
    """
    k, n = x.shape[-1], qweight.shape[0]
    acc = (q.reshape(-1, k).double() @ qweight.double().T).float()
    y = acc * q_scale.reshape(-1, 1) * wscale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def quantize_per_token_int8_reference(
    x: torch.Tensor, smooth: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`formats.quantize_int8_per_token(x.float() * smooth)` over any leading dims.

    Args:
        x: (..., K) float.
        smooth: (K,) float32 multiplied into x first, or None.

    Returns:
        q: (..., K) int8 in [-127, 127]; scale: (..., 1) float32, x * smooth ~= q * scale.
    """
    k = x.shape[-1]
    h = x.reshape(-1, k).float()
    if smooth is not None:
        h = h * smooth.float()
    q, scale = quantize_int8_per_token(h)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_per_token_int8_triton(
    x: torch.Tensor, smooth: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `_quantize_per_token_int8_kernel`, one program per row; bitwise equal to the reference.

    Args:
        x: (..., K) float16/bfloat16/float32 on a Triton device (CPU only under TRITON_INTERPRET=1).
        smooth: (K,) float32 on x's device, or None.

    Returns:
        q: (..., K) int8 contiguous; scale: (..., 1) float32 contiguous.
    """
    name = "quantize_per_token_int8_triton"
    check_per_token_activation(name, x, smooth)
    common.check_launchable(name, x)
    k = x.shape[-1]
    x2d, q, q2d, scale = per_token_outputs(x, torch.int8)
    if q.numel() == 0:
        return q, scale
    block_k, num_warps = per_token_launch_params(k)
    common.wrap(_quantize_per_token_int8_kernel)[(x2d.shape[0],)](
        x2d,
        smooth.contiguous() if smooth is not None else x2d,  # a valid pointer, never read without HAS_SMOOTH
        q2d,
        scale,
        k,
        x2d.stride(0),
        q2d.stride(0),
        HAS_SMOOTH=smooth is not None,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return q, scale


def linear_w8a8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    smooth: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The definition of the w8a8 linear; the CPU path of the op and the oracle for tests.

    The integer dot products are summed in float64, where they are exact (|sum| < 2**31 < 2**53) like the
    kernel's int32, then rounded once to float32; the epilogue is float32, left to right.

    Args:
        x: (..., K) float16/bfloat16/float32.
        qweight: (N, K) int8, `formats.quantize_int8_per_channel` codes.
        wscale: (N,) float32.
        bias: (N,) float or None.
        smooth: (K,) float32 multiplied into x before quantization (SmoothQuant's 1/s), or None.

    Returns:
        (..., N) in x.dtype.
    """
    q, s = quantize_per_token_int8_reference(x, smooth)
    return scaled_mm_reference(q, s, qweight, wscale, bias, x)


def linear_w8a8_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    smooth: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantize x per token (one launch), then the int8 GEMM with the scales and bias in its epilogue (another).

    Same arguments and result as `linear_w8a8_reference`, all on one Triton device (CPU only under
    TRITON_INTERPRET=1); K <= MAX_K. Matches the reference up to fp32 rounding of the epilogue.

    Returns:
        (..., N) contiguous, x.dtype.
    """
    name = "linear_w8a8_triton"
    check_per_token_linear(name, x, qweight, torch.int8, wscale, bias, smooth)
    common.check_launchable(name, x)
    return _linear_impl(x, qweight, wscale, bias, smooth)


def _linear_impl(x, qweight, wscale, bias, smooth) -> torch.Tensor:
    return per_token_quantized_linear(x, qweight, wscale, bias, lambda x: quantize_per_token_int8_triton(x, smooth))


def per_token_quantized_linear(x, qweight, wscale, bias, quantize) -> torch.Tensor:
    """(q, s) = quantize(x), then `_scaled_mm` into a new (..., N) x.dtype output; shared with fp8_linear."""
    k, n = x.shape[-1], qweight.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    q, xscale = quantize(x)
    _scaled_mm(q.view(-1, k), xscale, qweight, wscale.contiguous(), bias, out.view(-1, n))
    return out


@triton_op("llmcompress::linear_w8a8", mutates_args=())
def _linear_w8a8_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    smooth: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # triton_op reuses this body as the fake impl and inlines it under torch.compile, so it routes CPU tensors
    # to the reference itself (rms_norm.py).
    check_per_token_linear("linear_w8a8", x, qweight, torch.int8, wscale, bias, smooth)
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        return linear_w8a8_reference(x, qweight, wscale, bias, smooth)
    return _linear_impl(x, qweight, wscale, bias, smooth)


@_linear_w8a8_op.register_kernel("cpu")
def _linear_w8a8_cpu(x, qweight, wscale, bias=None, smooth=None):
    check_per_token_linear("linear_w8a8", x, qweight, torch.int8, wscale, bias, smooth)
    return linear_w8a8_reference(x, qweight, wscale, bias, smooth)


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, wscale, bias, smooth = inputs
    ctx.save_for_backward(qweight, wscale, smooth)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out: torch.Tensor):
    # Straight-through: the rounding of x counts as identity, so dy/dx = dequantized W (times smooth).
    qweight, wscale, smooth = ctx.saved_tensors
    grad_x, grad_bias = common.linear_backward(ctx, grad_out, lambda: dequantize_int8(qweight, wscale), smooth,
                                               ctx.bias_dtype, 3)
    return grad_x, None, None, grad_bias, None


_linear_w8a8_op.register_autograd(_backward, setup_context=_setup_context)


def per_token_linear_cost(node):
    """(flops, bytes) of linear_w8a8 / linear_fp8: 2*M*N*K (+ M*N for a bias); every input read and the output
    written once (`io_bytes`), plus the activation round trip between the two kernels: the 8-bit codes written
    and read back (2*M*K bytes) and the float32 per-token scales (8*M). Reading x is in io_bytes once.

    The op is two kernel launches (quantize, GEMM); CostModel adds one launch overhead per node and prices
    custom ops at the peak of their first floating input (x's dtype, not the int8/fp8 tensor-core peak): the
    CostFn API returns only (flops, bytes), so neither can be said here.
    """
    x = node.args[0].meta["val"]
    qweight = node.args[1].meta["val"]
    k, n = sym(x.shape[-1]), sym(qweight.shape[0])
    m = numel(x) / k
    flops = 2 * m * n * k + (m * n if common.node_arg(node, 3, "bias") is not None else 0)
    return flops, io_bytes(node) + 2 * m * k + 8 * m


register_cost(torch.ops.llmcompress.linear_w8a8.default)(per_token_linear_cost)
