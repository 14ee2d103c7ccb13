"""Weight-only int8 linear (w8a16): y = x @ W.T + bias with W stored as int8 codes and one scale per output channel.

Entry points:
- `torch.ops.llmcompress.linear_w8a16(x, qweight, scale, bias=None, act_scale=None, gemv_max_m=16,
  dense_min_m=2**62)`: the custom op that graphs call; CUDA runs `linear_w8a16_triton`, CPU runs
  `linear_w8a16_reference`.
- `linear_w8a16_triton(...)`: checks inputs and picks a kernel by M, the number of rows of x:
  M <= gemv_max_m: `_gemv` (one program per BLOCK_N outputs, all M rows, so each weight byte is read once);
  gemv_max_m < M < dense_min_m: `_gemm` (tensor-core tl.dot on codes converted to x's dtype in the K loop);
  M >= dense_min_m: `_dense` (`dequantize_w8_triton` once to x.dtype, then F.linear, i.e. cuBLAS).
  A compiler pass picks the two thresholds from the cost model; the defaults never take the dense path.
- `linear_w8a16_reference(...)`: plain torch, the numerics every path is tested against.

Layout (`llmcompress/quantization/formats.py`, read exactly): qweight int8 (N, K) in [-127, 127], scale float32
(N,); w = q * scale. Being per output channel, the scale factors out of the K sum: the GEMV and GEMM multiply the
raw codes (exact in fp16 and bf16) and apply the scale once per output in the epilogue.

`act_scale` (K,) float32 multiplies x per input channel (AWQ's / SmoothQuant's 1/s) as x is loaded, in fp32
(rounded to x.dtype before a tensor-core dot); the dense path folds it into the dequantized weight instead.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.jit import JITFunction

from ..analysis.roofline import io_bytes, numel, register_cost, sym
from ..quantization.formats import dequantize_int8

__all__ = ["dequantize_w8_triton", "linear_w8a16_reference", "linear_w8a16_triton"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Default dense_min_m: larger than any M, so the dense path is off unless a pass asks for it.
DENSE_OFF = 2**62
# Rows one GEMV program holds (its largest BLOCK_M): gemv_max_m may not exceed it.
GEMV_MAX_M = 16


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32; fp32 operands in full precision (the reference's numerics), not TF32."""
    # The Triton 3.9 interpreter multiplies bfloat16 operands as their raw uint16 storage; fp16/bf16 values
    # are exact in fp32, so upcasting there gives the tensor core's result (exact products, fp32 sums).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _w8_gemv_kernel(
    x_ptr,
    qw_ptr,
    scale_ptr,
    bias_ptr,
    act_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    HAS_ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per BLOCK_N output channels and every row of x (M <= BLOCK_M <= 16): the program walks the
    # whole of K, so each weight byte is loaded exactly once per call.
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    w_rows = qw_ptr + rn.to(tl.int64)[:, None] * stride_qn  # (BLOCK_N, 1)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        q = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)  # (BLOCK_N, BLOCK_K)
        xk = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        if HAS_ACT:
            xk = xk * tl.load(act_ptr + k, mask=k_mask, other=0.0)[None, :]
        if BLOCK_M >= 16:
            # 5..16 rows: FMAs would make the kernel compute-bound (32 FLOPs per weight byte at M=16), so pad M
            # to the tensor cores' 16; int8 codes are exact in fp16/bf16, only x * act_scale is rounded. Codes go
            # through fp32 as in the GEMM (the interpreter casts int8 to bfloat16 as raw bits).
            dt = x_ptr.dtype.element_ty
            acc = _dot(xk.to(dt), tl.trans(q.to(tl.float32).to(dt)), acc, UPCAST)
        else:
            # 1..4 rows: fp32 FMAs.
            acc += tl.sum(xk[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
    acc = acc * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w8_gemm_kernel(
    x_ptr,
    qw_ptr,
    scale_ptr,
    bias_ptr,
    act_ptr,
    out_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_xm,
    stride_qn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    HAS_ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # m_bucket is unused here: it is only the autotuner's key, so each power-of-two range of M gets its config.
    # Grouped program order (Triton matmul tutorial): GROUP_M row-blocks share weight tiles while in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    w_cols = qw_ptr + rn.to(tl.int64)[None, :] * stride_qn  # (1, BLOCK_N): the tile is loaded as (BLOCK_K, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        xk = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_ACT:
            xk = (xk.to(tl.float32) * tl.load(act_ptr + k, mask=k_mask, other=0.0)[None, :]).to(dt)
        q = tl.load(w_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        # Through fp32 (exact either way): the Triton 3.9 interpreter casts int8 to bfloat16 as raw bits.
        acc = _dot(xk, q.to(tl.float32).to(dt), acc, UPCAST)
    acc = acc * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w8_dequant_kernel(
    qw_ptr,
    scale_ptr,
    act_ptr,
    out_ptr,
    N,
    K,
    stride_qn,
    stride_on,
    HAS_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = k < K
    mask = n_mask[:, None] & k_mask[None, :]
    rn64 = rn.to(tl.int64)[:, None]
    q = tl.load(qw_ptr + rn64 * stride_qn + k[None, :], mask=mask, other=0)
    w = q.to(tl.float32) * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[:, None]
    if HAS_ACT:
        # (x * a) @ W.T == x @ (W * a).T: folding act_scale into the weight saves the dense path a pass over x.
        w = w * tl.load(act_ptr + k, mask=k_mask, other=0.0)[None, :]
    tl.store(out_ptr + rn64 * stride_on + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# Under TRITON_INTERPRET=1 @triton.jit returns an InterpretedFunction, which runs on CPU tensors; torch 2.11's
# wrap_triton rejects it (2.13 passes it through), and autotuning there would run every config in Python.
_INTERPRETED = not isinstance(_w8_gemv_kernel, JITFunction)

# GPU configs are untuned guesses pending H100 measurement (no GPU was available when this was written):
# GEMV steps of 16-64 outputs by 64-256 k (the FMA buckets hold BLOCK_M x BLOCK_N x BLOCK_K products in
# registers, so at 4 rows the larger ones may spill and lose the tuning); GEMM tiles after the Triton matmul
# tutorial's fp16 configs. Keyed on (M bucket, N, K). Under the interpreter one small fixed config runs instead.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=st)
    for bn, bk, st in [(16, 128, 3), (16, 256, 3), (32, 64, 4), (32, 128, 3), (64, 64, 3), (64, 128, 2)]
]
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
]
_GEMV_INTERP = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}
_GEMM_INTERP = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4}
# Memory-bound elementwise: one config everywhere.
_DEQUANT_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}

if _INTERPRETED:
    _gemv_tuned = _gemm_tuned = None
else:
    _gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["BLOCK_M", "N", "K"])(_w8_gemv_kernel)
    _gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["m_bucket", "N", "K"])(_w8_gemm_kernel)


def _launch(kernel, tuned, grid, args, interp_config, **constexprs) -> None:
    """Launch `tuned` (autotuned, through wrap_triton so Inductor sees it) or, under the interpreter, `kernel`
    with `interp_config`; `grid(meta)` sees the config's block sizes either way."""
    if tuned is None:
        meta = {**interp_config, **constexprs}
        kernel[grid(meta)](*args, **meta)
    else:
        wrap_triton(tuned)[grid](*args, **constexprs)


def _gemv_bucket(m) -> int:
    # The rows the GEMV pads M to: 1, 2, 4 (fp32 FMAs) or 16 (tensor cores). Comparisons rather than
    # next_power_of_2, so a symbolic M under torch.compile only gets range guards.
    if m <= 1:
        return 1
    if m <= 2:
        return 2
    if m <= 4:
        return 4
    return 16


def _gemm_bucket(m) -> int:
    # The GEMM autotuner's M key: powers of two from 32 to 8192, one tuning per bucket rather than per M.
    b = 32
    while b < 8192 and m > b:
        b *= 2
    return b


def linear_w8a16_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act_scale: Optional[torch.Tensor] = None,
    gemv_max_m: int = GEMV_MAX_M,
    dense_min_m: int = DENSE_OFF,
) -> torch.Tensor:
    """The op's numerics, in plain torch: the CPU path and the oracle for the kernels.

    y = ((x.float() * act_scale) @ W.T + bias.float()).to(x.dtype), with W = dequantize_int8(...) in float32:
    everything in fp32, rounded once to x.dtype. The kernels apply the scale after the K sum instead of to each
    weight (equal up to fp32 rounding) and round tensor-core operands (x * act_scale) to x.dtype.

    Args:
        x: (..., K) float16/bfloat16/float32.
        qweight: (N, K) int8.
        scale: (N,) float32.
        bias: optional (N,), x.dtype.
        act_scale: optional (K,) float32, multiplies x per input channel.
        gemv_max_m, dense_min_m: kernel choice of the Triton path; ignored here.

    Returns:
        (..., N) in x.dtype.
    """
    w = dequantize_int8(qweight, scale)
    h = x.float()
    if act_scale is not None:
        h = h * act_scale.float()
    y = h @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _check_weight(name, k, qweight, scale) -> None:
    """ValueError unless qweight, scale are the stored int8 per-channel format for an input size K = k."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(f"{name}: qweight must be int8 (N, K) with K={k}, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ValueError(f"{name}: scale must be float32 (N,) = ({n},), got {scale.dtype} {tuple(scale.shape)}")


def _check_inputs(x, qweight, scale, bias, act_scale, name="linear_w8a16") -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: x must be (..., K), got a 0-d tensor")
    k = x.shape[-1]
    _check_weight(name, k, qweight, scale)
    n = qweight.shape[0]
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"{name}: bias must be ({n},) in x's dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    if act_scale is not None and (act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (k,)):
        raise ValueError(
            f"{name}: act_scale must be float32 ({k},), got {act_scale.dtype} {tuple(act_scale.shape)}"
        )
    _check_devices(name, x, qweight, scale, bias, act_scale)


def _check_devices(name, *tensors) -> None:
    tensors = [t for t in tensors if t is not None]
    if any(t.device != tensors[0].device for t in tensors):
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")


def _check_triton_device(x: torch.Tensor) -> None:
    if not _INTERPRETED and x.device.type == "cpu":
        raise ValueError(
            "linear_w8a16_triton: x is on cpu; the Triton kernels need a GPU tensor "
            "(or TRITON_INTERPRET=1); use linear_w8a16_reference on CPU"
        )


def _gemv(x2d, qweight, scale, bias=None, act_scale=None) -> torch.Tensor:
    """GEMV path: x2d (M, K) with M <= 16 -> (M, N); one pass over the int8 weight."""
    m = x2d.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"linear_w8a16 GEMV: M must be <= {GEMV_MAX_M}, got {m}")
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous()
    n, k = qweight.shape[0], x2d.shape[1]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if out.numel() == 0:
        return out
    _launch(
        _w8_gemv_kernel,
        _gemv_tuned,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, qweight, scale, x2d if bias is None else bias, x2d if act_scale is None else act_scale, out,
         m, n, k, x2d.stride(0), qweight.stride(0), out.stride(0)),
        _GEMV_INTERP,
        HAS_BIAS=bias is not None,
        HAS_ACT=act_scale is not None,
        UPCAST=_INTERPRETED,
        BLOCK_M=_gemv_bucket(m),
    )
    return out


def _gemm(x2d, qweight, scale, bias=None, act_scale=None) -> torch.Tensor:
    """Tensor-core GEMM path: x2d (M, K) -> (M, N), codes converted to x's dtype tile by tile in the K loop."""
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous()
    m, k, n = x2d.shape[0], x2d.shape[1], qweight.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if out.numel() == 0:
        return out
    _launch(
        _w8_gemm_kernel,
        _gemm_tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, qweight, scale, x2d if bias is None else bias, x2d if act_scale is None else act_scale, out,
         m, n, k, _gemm_bucket(m), x2d.stride(0), qweight.stride(0), out.stride(0)),
        _GEMM_INTERP,
        HAS_BIAS=bias is not None,
        HAS_ACT=act_scale is not None,
        UPCAST=_INTERPRETED,
    )
    return out


def dequantize_w8_triton(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    act_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantize int8 per-channel codes to a dense (N, K) `dtype` weight: q * scale [* act_scale[k]] in fp32.

    Args:
        qweight: (N, K) int8; scale: (N,) float32.
        dtype: float16, bfloat16 or float32.
        act_scale: optional (K,) float32, folded into the weight's columns.
    """
    name = "dequantize_w8_triton"
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype must be float16, bfloat16 or float32, got {dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be int8 (N, K), got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    _check_weight(name, k, qweight, scale)
    if act_scale is not None and (act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (k,)):
        raise ValueError(f"{name}: act_scale must be float32 ({k},), got {act_scale.dtype} {tuple(act_scale.shape)}")
    _check_devices(name, qweight, scale, act_scale)
    _check_triton_device(qweight)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    kernel = _w8_dequant_kernel if _INTERPRETED else wrap_triton(_w8_dequant_kernel)
    cfg = _DEQUANT_BLOCKS
    kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))](
        qweight, scale, qweight if act_scale is None else act_scale, out,
        n, k, qweight.stride(0), out.stride(0),
        HAS_ACT=act_scale is not None, **cfg,
    )
    return out


def _dense(x2d, qweight, scale, bias=None, act_scale=None) -> torch.Tensor:
    """Dense path for large M: dequantize once (act_scale folded in), then cuBLAS; the weight's extra write and
    read cost little next to a compute-bound GEMM."""
    w = dequantize_w8_triton(qweight, scale, x2d.dtype, act_scale)
    return F.linear(x2d, w, bias)


def linear_w8a16_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act_scale: Optional[torch.Tensor] = None,
    gemv_max_m: int = GEMV_MAX_M,
    dense_min_m: int = DENSE_OFF,
) -> torch.Tensor:
    """y = linear(x * act_scale, dequantized W, bias) on the kernel that M = x.numel() // K picks.

    Args: as `linear_w8a16_reference`, all on one Triton device (CPU only under TRITON_INTERPRET=1), plus
        gemv_max_m: the GEMV kernel for M <= gemv_max_m (at most 16, the kernel's row capacity);
        dense_min_m: dequantize + F.linear for M >= dense_min_m; the tl.dot GEMM in between.

    Returns:
        (..., N) contiguous, x.dtype.
    """
    _check_inputs(x, qweight, scale, bias, act_scale)
    _check_triton_device(x)
    if not 0 <= gemv_max_m <= GEMV_MAX_M:
        raise ValueError(f"linear_w8a16: gemv_max_m must be in [0, {GEMV_MAX_M}], got {gemv_max_m}")
    k, n = x.shape[-1], qweight.shape[0]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    if m == 0 or n == 0:
        return x.new_empty((*x.shape[:-1], n))
    if m <= gemv_max_m:
        path = _gemv
    elif m >= dense_min_m:
        path = _dense
    else:
        path = _gemm
    return path(x2d, qweight, scale, bias, act_scale).view(*x.shape[:-1], n)


# triton_op infers the schema from the annotations (torch 2.13 ignores its schema= argument), so the ints read
# SymInt there; callers pass plain ints either way.
@triton_op("llmcompress::linear_w8a16", mutates_args=())
def _linear_w8a16_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act_scale: Optional[torch.Tensor] = None,
    gemv_max_m: int = GEMV_MAX_M,
    dense_min_m: int = DENSE_OFF,
) -> torch.Tensor:
    # triton_op reuses this body as the fake impl and inlines it under torch.compile without going through the
    # CPU kernel below, so it routes CPU tensors to the reference itself (see rms_norm.py).
    if x.device.type == "cpu":
        _check_inputs(x, qweight, scale, bias, act_scale)
        return linear_w8a16_reference(x, qweight, scale, bias, act_scale)
    return linear_w8a16_triton(x, qweight, scale, bias, act_scale, gemv_max_m, dense_min_m)


@_linear_w8a16_op.register_kernel("cpu")
def _linear_w8a16_cpu(x, qweight, scale, bias=None, act_scale=None, gemv_max_m=GEMV_MAX_M, dense_min_m=DENSE_OFF):
    _check_inputs(x, qweight, scale, bias, act_scale)
    return linear_w8a16_reference(x, qweight, scale, bias, act_scale)


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scale, bias, act_scale = inputs[:5]
    ctx.save_for_backward(qweight, scale, act_scale)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: torch.Tensor):
    # Plain torch, for activations that require grad (the quantized weight is frozen): without a formula
    # torch.compile fails while tracing the joint graph of such a model (see kernels/__init__.py).
    qweight, scale, act_scale = ctx.saved_tensors
    g = grad_out.float()
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = g @ dequantize_int8(qweight, scale)
        if act_scale is not None:
            grad_x = grad_x * act_scale
        grad_x = grad_x.to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.x_dtype)
    return grad_x, None, None, grad_bias, None, None, None


_linear_w8a16_op.register_autograd(_backward, setup_context=_setup_context)


def _arg(node, index: int, name: str):
    a = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    return a.meta.get("val") if isinstance(a, torch.fx.Node) else a


@register_cost(torch.ops.llmcompress.linear_w8a16.default)
def _linear_w8a16_cost(node):
    """2·M·N·K (+M·N bias, +M·K act_scale); bytes at stored dtypes, so the weight counts one byte per value."""
    x, qweight = _arg(node, 0, "x"), _arg(node, 1, "qweight")
    k, n = sym(x.shape[-1]), sym(qweight.shape[0])
    m = numel(x) / k
    flops = 2 * m * n * k
    if _arg(node, 3, "bias") is not None:
        flops += m * n
    if _arg(node, 4, "act_scale") is not None:
        flops += m * k
    return flops, io_bytes(node)
