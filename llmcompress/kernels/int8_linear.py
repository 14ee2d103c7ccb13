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

Layout (`llmcompress/formats/quantized.py`, read exactly): qweight int8 (N, K) in [-127, 127], scale float32
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
from torch.library import triton_op

from llmcompress.cost.roofline import register_cost
from llmcompress.formats.quantized import dequantize_int8
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.linear_common import DENSE_OFF, GEMV_MAX_M, dot_fp32, grouped_pid, store_output

__all__ = ["dequantize_w8_triton", "linear_w8a16_reference", "linear_w8a16_triton"]


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
            acc = dot_fp32(xk.to(dt), tl.trans(q.to(tl.float32).to(dt)), acc, UPCAST)
        else:
            # 1..4 rows: fp32 FMAs.
            acc += tl.sum(xk[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
    acc = acc * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    store_output(acc, bias_ptr, out_ptr, rm, rn, m_mask, n_mask, stride_om, HAS_BIAS)


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
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
        acc = dot_fp32(xk, q.to(tl.float32).to(dt), acc, UPCAST)
    acc = acc * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    store_output(acc, bias_ptr, out_ptr, rm, rn, m_mask, n_mask, stride_om, HAS_BIAS)


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


# GPU configs are untuned guesses pending H100 measurement (no GPU was available when this was written):
# GEMV steps of 16-64 outputs by 64-256 k (the FMA buckets hold BLOCK_M x BLOCK_N x BLOCK_K products in
# registers, so at 4 rows the larger ones may spill and lose the tuning); GEMM tiles `GEMM_CONFIGS`, after the
# Triton matmul tutorial's fp16 configs. Keyed on (M bucket, N, K). Under the interpreter one small fixed config
# runs instead.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=st)
    for bn, bk, st in [(16, 128, 3), (16, 256, 3), (32, 64, 4), (32, 128, 3), (64, 64, 3), (64, 128, 2)]
]
_GEMV_INTERP = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}
_GEMM_INTERP = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4}
# Memory-bound elementwise: one config everywhere.
_DEQUANT_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) that spill registers, in bytes per thread (ptxas, M = 512,
# K = N = 4096, benchmarks/gpu_compile.py): left out where they spill.
_SPILLS = {
    ("sm_80", "16-bit"): {(64, 128, 64, 4), (128, 256, 64, 8)},  # bf16 16 B; bf16 8 B, fp16 60 B
}
# Shared memory: the int8 weight tile as loaded, plus its conversion to x's dtype staged for the dot (sm_90 bf16
# 128x256x64, 3 stages: 114,688 B compiled, 131,072 estimated).
_X_BYTES = common.element_size("x_ptr")
_SHARED = common.tile_shared_bytes(_X_BYTES, 1, _X_BYTES, converted_bytes=_X_BYTES)
# GEMV tiles (row bucket, BLOCK_N, BLOCK_K, num_warps) that spill at 3 rows (bucket 4): 64x128 holds 4 x 64 x 128
# products, bf16 156 B (sm_90) and 144 B (sm_80), fp32 136 B (sm_90).
_GEMV_SPILLS = {(arch, precision): {(4, 64, 128, 4)} for arch in ("sm_90", "sm_80") for precision in ("16-bit", "fp32")}
_gemv_tuned = common.autotuned(_w8_gemv_kernel, _GEMV_CONFIGS + common.GEMV_CONFIGS_FP32_DOT,
                               key=["BLOCK_M", "N", "K"], shared_bytes=_SHARED,
                               choose=common.gemv_choice(spills=_GEMV_SPILLS))
_gemm_tuned = common.autotuned(_w8_gemm_kernel, common.GEMM_CONFIGS + common.GEMM_CONFIGS_FP32,
                               key=["m_bucket", "N", "K"], shared_bytes=_SHARED, choose=common.gemm_choice(_SPILLS))


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
    return common.weight_only_linear_reference(x, w, bias, act_scale)


def _check_weight(name, k, qweight, scale) -> None:
    """ValueError unless qweight, scale are the stored int8 per-channel format for an input size K = k."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(f"{name}: qweight must be int8 (N, K) with K={k}, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ValueError(f"{name}: scale must be float32 (N,) = ({n},), got {scale.dtype} {tuple(scale.shape)}")


def _check_inputs(x, qweight, scale, bias, act_scale, name="linear_w8a16") -> None:
    common.check_activation(name, x)
    _check_weight(name, x.shape[-1], qweight, scale)
    common.check_bias_act_scale(name, x, qweight.shape[0], bias, act_scale)
    common.check_devices(name, x, qweight, scale, bias, act_scale)


def _check_triton_device(x: torch.Tensor) -> None:
    common.check_launchable("linear_w8a16_triton", x, "linear_w8a16_reference")


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
    common.launch(
        _w8_gemv_kernel,
        _gemv_tuned,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, qweight, scale, x2d if bias is None else bias, x2d if act_scale is None else act_scale, out,
         m, n, k, x2d.stride(0), qweight.stride(0), out.stride(0)),
        _GEMV_INTERP,
        HAS_BIAS=bias is not None,
        HAS_ACT=act_scale is not None,
        UPCAST=common.INTERPRETED,
        BLOCK_M=common.gemv_bucket(m),
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
    common.launch(
        _w8_gemm_kernel,
        _gemm_tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, qweight, scale, x2d if bias is None else bias, x2d if act_scale is None else act_scale, out,
         m, n, k, common.gemm_bucket(m), x2d.stride(0), qweight.stride(0), out.stride(0)),
        _GEMM_INTERP,
        HAS_BIAS=bias is not None,
        HAS_ACT=act_scale is not None,
        UPCAST=common.INTERPRETED,
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
    common.check_dtype(name, "dtype", dtype)
    if qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be int8 (N, K), got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    _check_weight(name, k, qweight, scale)
    common.check_act_scale(name, act_scale, k)
    common.check_devices(name, qweight, scale, act_scale)
    _check_triton_device(qweight)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    cfg = _DEQUANT_BLOCKS
    common.wrap(_w8_dequant_kernel)[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))](
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
    return common.run_by_rows("linear_w8a16", x, qweight.shape[0], gemv_max_m, dense_min_m, _gemv, _gemm, _dense,
                              qweight, scale, bias, act_scale)


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
    # CPU kernel below, so it calls that kernel's function itself for CPU tensors (see rms_norm.py).
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        return _linear_w8a16_cpu(x, qweight, scale, bias, act_scale)
    return linear_w8a16_triton(x, qweight, scale, bias, act_scale, gemv_max_m, dense_min_m)


@_linear_w8a16_op.register_kernel("cpu")
def _linear_w8a16_cpu(x, qweight, scale, bias=None, act_scale=None, gemv_max_m=GEMV_MAX_M, dense_min_m=DENSE_OFF):
    _check_inputs(x, qweight, scale, bias, act_scale)
    return linear_w8a16_reference(x, qweight, scale, bias, act_scale)


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scale, bias, act_scale = inputs[:5]
    ctx.save_for_backward(qweight, scale, act_scale)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out: torch.Tensor):
    qweight, scale, act_scale = ctx.saved_tensors
    grad_x, grad_bias = common.linear_backward(
        ctx, grad_out, lambda: dequantize_int8(qweight, scale), act_scale, ctx.bias_dtype, 3
    )
    return grad_x, None, None, grad_bias, None, None, None


_linear_w8a16_op.register_autograd(_backward, setup_context=_setup_context)


@register_cost(torch.ops.llmcompress.linear_w8a16.default)
def _linear_w8a16_cost(node):
    """2·M·N·K (+M·N bias, +M·K act_scale); bytes at stored dtypes, so the weight counts one byte per value."""
    return common.weight_only_linear_cost(node, bias_index=3, act_scale_index=4)
