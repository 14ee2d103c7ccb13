"""Weight-only int4 linear (w4a16): y = x @ W.T + bias with W stored as packed int4 codes, group scales and zeros.

Entry points:
- `torch.ops.llmcompress.linear_w4a16(x, qweight, scales, zeros, group_size, bias=None, act_scale=None,
  gemv_max_m=16, dense_min_m=2**62)`: the custom op that graphs call; CUDA runs `linear_w4a16_triton`, CPU runs
  `linear_w4a16_reference`.
- `linear_w4a16_triton(...)`: checks inputs and picks a kernel by M, the number of rows of x:
  M <= gemv_max_m: `_gemv` (one program per BLOCK_N outputs, all M rows, so each weight byte is read once);
  gemv_max_m < M < dense_min_m: `_gemm` (tensor-core tl.dot, dequantization in the K loop's prologue);
  M >= dense_min_m: `_dense` (`dequantize_w4_triton` once to x.dtype, then F.linear, i.e. cuBLAS).
  A compiler pass picks the two thresholds from the cost model; the defaults never take the dense path.
- `linear_w4a16_reference(...)`: plain torch, the numerics every path is tested against.

Layout (`llmcompress/formats/quantized.py`, read exactly): qweight uint8 (N, K // 2), the even k in the low
nibble and the odd k in the high one; scales, zeros float16 (N, K // group_size); w = (q - zero) * scale.
The kernels never interleave: they load x's even and odd columns separately and multiply them by the low and
high nibbles, so the packed bytes are used as stored.

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
from llmcompress.formats.quantized import INT4_GROUP_SIZES, dequantize_int4
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.linear_common import DENSE_OFF, GEMV_MAX_M, dot_fp32, grouped_pid, store_output

__all__ = ["dequantize_w4_triton", "linear_w4a16_reference", "linear_w4a16_triton"]


@triton.jit
def _w4_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    act_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per BLOCK_N output channels and every row of x (M <= BLOCK_M <= 16): the program walks the
    # whole of K, so each packed byte is loaded exactly once per call.
    # A step of BLOCK_K is split into sub-blocks of at most one group (unrolled, so their loads are in flight
    # together): each sub-block then needs one scale and zero per row, where gathering them per k would issue
    # as many scale and zero loads as weight bytes in this memory-bound loop.
    if BLOCK_K > GROUP_SIZE:
        SUB_K: tl.constexpr = GROUP_SIZE
    else:
        SUB_K: tl.constexpr = BLOCK_K
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rkh = tl.arange(0, SUB_K // 2)
    n_mask = rn < N
    m_mask = rm < M
    w_rows = qw_ptr + rn.to(tl.int64)[:, None] * stride_qn  # (BLOCK_N, 1)
    s_rows = rn.to(tl.int64) * stride_sn
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB_K):
            # K is a multiple of GROUP_SIZE, so a sub-block is wholly inside K or wholly past it.
            ks = k0 + j * SUB_K
            kh = ks // 2 + rkh  # packed column: holds k = 2 * kh (low nibble) and 2 * kh + 1 (high nibble)
            k_mask = kh < K // 2
            ke = 2 * kh
            packed = tl.load(w_rows + kh[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            # The group index as a (BLOCK_N,) vector: under the interpreter ks is a Python int, and a mask
            # built from a bare bool is rejected.
            g = ks // GROUP_SIZE + tl.zeros((BLOCK_N,), dtype=tl.int32)
            sz_mask = n_mask & (g < K // GROUP_SIZE)
            s = tl.load(s_ptr + s_rows + g, mask=sz_mask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + s_rows + g, mask=sz_mask, other=0.0).to(tl.float32)[:, None]
            w_even = ((packed & 0xF).to(tl.float32) - z) * s  # (BLOCK_N, SUB_K // 2), exact in fp32
            w_odd = ((packed >> 4).to(tl.float32) - z) * s
            x_mask = m_mask[:, None] & k_mask[None, :]
            x_even = tl.load(x_rows + ke[None, :], mask=x_mask, other=0.0).to(tl.float32)  # (BLOCK_M, SUB_K // 2)
            x_odd = tl.load(x_rows + ke[None, :] + 1, mask=x_mask, other=0.0).to(tl.float32)
            if HAS_ACT:
                x_even = x_even * tl.load(act_ptr + ke, mask=k_mask, other=0.0)[None, :]
                x_odd = x_odd * tl.load(act_ptr + ke + 1, mask=k_mask, other=0.0)[None, :]
            if BLOCK_M >= 16:
                # 5..16 rows: FMAs would make the kernel compute-bound (64 FLOPs per weight byte at M=16), so pad
                # M to the tensor cores' 16 and round both operands to x's dtype, as the GEMM does.
                dt = x_ptr.dtype.element_ty
                acc = dot_fp32(x_even.to(dt), tl.trans(w_even.to(dt)), acc, UPCAST)
                acc = dot_fp32(x_odd.to(dt), tl.trans(w_odd.to(dt)), acc, UPCAST)
            else:
                # 1..4 rows: fp32 FMAs, with the dequantized tile reused across the rows.
                prod = x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :]
                acc += tl.sum(prod, axis=2)
    store_output(acc, bias_ptr, out_ptr, rm, rn, m_mask, n_mask, stride_om, HAS_BIAS)


@triton.jit
def _w4_gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    act_ptr,
    out_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP_SIZE: tl.constexpr,
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
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rkh = tl.arange(0, HALF_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    w_cols = qw_ptr + rn.to(tl.int64)[None, :] * stride_qn  # (1, BLOCK_N): the tile is loaded as (HALF_K, BLOCK_N)
    s_cols = rn.to(tl.int64) * stride_sn
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kh = k0 // 2 + rkh
        k_mask = kh < K // 2
        ke = 2 * kh
        x_mask = m_mask[:, None] & k_mask[None, :]
        x_even = tl.load(x_rows + ke[None, :], mask=x_mask, other=0.0)  # (BLOCK_M, HALF_K)
        x_odd = tl.load(x_rows + ke[None, :] + 1, mask=x_mask, other=0.0)
        if HAS_ACT:
            x_even = (x_even.to(tl.float32) * tl.load(act_ptr + ke, mask=k_mask, other=0.0)[None, :]).to(dt)
            x_odd = (x_odd.to(tl.float32) * tl.load(act_ptr + ke + 1, mask=k_mask, other=0.0)[None, :]).to(dt)
        packed = tl.load(w_cols + kh[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        if BLOCK_K <= GROUP_SIZE:
            # BLOCK_K divides GROUP_SIZE (both powers of two): the step lies in one group.
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + s_cols + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + s_cols + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            # Per-k group index (an even k and the odd k after it share a group): the gathered scale and zero
            # loads hit L1 and are shared by BLOCK_M rows, and the dots stay BLOCK_K / 2 deep.
            g = ke // GROUP_SIZE
            sz_mask = k_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + s_cols[None, :] + g[:, None], mask=sz_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + s_cols[None, :] + g[:, None], mask=sz_mask, other=0.0).to(tl.float32)
        w_even = (((packed & 0xF).to(tl.float32) - z) * s).to(dt)  # (HALF_K, BLOCK_N)
        w_odd = (((packed >> 4).to(tl.float32) - z) * s).to(dt)
        acc = dot_fp32(x_even, w_even, acc, UPCAST)
        acc = dot_fp32(x_odd, w_odd, acc, UPCAST)
    store_output(acc, bias_ptr, out_ptr, rm, rn, m_mask, n_mask, stride_om, HAS_BIAS)


@triton.jit
def _w4_dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    act_ptr,
    out_ptr,
    N,
    K,
    stride_qn,
    stride_sn,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    HAS_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kh = tl.program_id(1) * HALF_K + tl.arange(0, HALF_K)
    n_mask = rn < N
    k_mask = kh < K // 2
    mask = n_mask[:, None] & k_mask[None, :]
    ke = 2 * kh
    rn64 = rn.to(tl.int64)[:, None]
    packed = tl.load(qw_ptr + rn64 * stride_qn + kh[None, :], mask=mask, other=0)
    g = ke // GROUP_SIZE
    s = tl.load(s_ptr + rn64 * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rn64 * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
    w_even = ((packed & 0xF).to(tl.float32) - z) * s
    w_odd = ((packed >> 4).to(tl.float32) - z) * s
    if HAS_ACT:
        # (x * a) @ W.T == x @ (W * a).T: folding act_scale into the weight saves the dense path a pass over x.
        w_even = w_even * tl.load(act_ptr + ke, mask=k_mask, other=0.0)[None, :]
        w_odd = w_odd * tl.load(act_ptr + ke + 1, mask=k_mask, other=0.0)[None, :]
    out = out_ptr + rn64 * stride_on + ke[None, :]
    tl.store(out, w_even.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + 1, w_odd.to(out_ptr.dtype.element_ty), mask=mask)


# GPU configs are untuned guesses pending H100 measurement (no GPU was available when this was written):
# GEMV steps of 16-64 outputs by 64-256 k (the FMA buckets hold BLOCK_M x BLOCK_N x BLOCK_K / 2 products in
# registers, so at 4 rows the larger ones may spill and lose the tuning); GEMM tiles `GEMM_CONFIGS`, after the
# Triton matmul tutorial's fp16 configs. Keyed on (M bucket, N, K, GROUP_SIZE). Under the interpreter one small
# fixed config runs instead.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=st)
    for bn, bk, st in [(16, 128, 3), (16, 256, 3), (32, 128, 3), (32, 256, 2), (64, 64, 4), (64, 128, 2)]
]
_GEMV_INTERP = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}
_GEMM_INTERP = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 4}
# Memory-bound elementwise: one config everywhere.
_DEQUANT_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) that spill registers, in bytes per thread (ptxas, M = 512,
# K = N = 4096, benchmarks/gpu_compile.py): left out where they spill.
_SPILLS = {
    ("sm_90", "16-bit"): {(128, 64, 64, 4)},  # bf16 20 B
    ("sm_80", "16-bit"): {(128, 64, 64, 4), (128, 128, 64, 8), (128, 256, 64, 8)},  # bf16 16, 136, 308 B
}
# Shared memory: the packed weight tile (BLOCK_K / 2 bytes per output) as loaded, plus its conversion to x's
# dtype staged for the dot (sm_90 bf16 128x256x64, 3 stages: 65,536 B compiled, 106,496 estimated).
_X_BYTES = common.element_size("x_ptr")
_SHARED = common.tile_shared_bytes(_X_BYTES, 1, _X_BYTES, converted_bytes=_X_BYTES, b_k_fraction=0.5)
# GEMV tiles (row bucket, BLOCK_N, BLOCK_K, num_warps) that spill: fp32 at 3 rows (bucket 4), 32x256: 28 B on sm_90
# (left out on sm_80 too, not measured there).
_GEMV_SPILLS = {(arch, "fp32"): {(4, 32, 256, 4)} for arch in ("sm_90", "sm_80")}
_gemv_tuned = common.autotuned(_w4_gemv_kernel, _GEMV_CONFIGS + common.GEMV_CONFIGS_FP32_DOT,
                               key=["BLOCK_M", "N", "K", "GROUP_SIZE"], shared_bytes=_SHARED,
                               choose=common.gemv_choice(spills=_GEMV_SPILLS))
_gemm_tuned = common.autotuned(_w4_gemm_kernel, common.GEMM_CONFIGS + common.GEMM_CONFIGS_FP32,
                               key=["m_bucket", "N", "K", "GROUP_SIZE"], shared_bytes=_SHARED,
                               choose=common.gemm_choice(_SPILLS))


def linear_w4a16_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    act_scale: Optional[torch.Tensor] = None,
    gemv_max_m: int = GEMV_MAX_M,
    dense_min_m: int = DENSE_OFF,
) -> torch.Tensor:
    """The op's numerics, in plain torch: the CPU path and the oracle for the kernels.

    y = ((x.float() * act_scale) @ W.T + bias.float()).to(x.dtype), with W = dequantize_int4(...) in float32
    (exact: 4-bit codes times fp16 scales fit fp32's mantissa): everything in fp32, rounded once to x.dtype.
    The kernels round less or differently only where they must (tensor-core operands in x.dtype, fp32 sum order).

    Args:
        x: (..., K) float16/bfloat16/float32.
        qweight: (N, K // 2) uint8, two codes per byte, even k in the low nibble.
        scales, zeros: (N, K // group_size) float16.
        group_size: 32, 64 or 128.
        bias: optional (N,), x.dtype.
        act_scale: optional (K,) float32, multiplies x per input channel.
        gemv_max_m, dense_min_m: kernel choice of the Triton path; ignored here.

    Returns:
        (..., N) in x.dtype.
    """
    w = dequantize_int4(qweight, scales, zeros, group_size)
    return common.weight_only_linear_reference(x, w, bias, act_scale)


def _check_weight(name, k, qweight, scales, zeros, group_size) -> None:
    """ValueError unless qweight, scales, zeros are the stored int4 format for an input size K = k."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{name}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{name}: K={k} must be a multiple of group_size={group_size}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise ValueError(
            f"{name}: qweight must be uint8 (N, K // 2) = (N, {k // 2}) for K={k}, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    for t, what in ((scales, "scales"), (zeros, "zeros")):
        if t.dtype != torch.float16 or tuple(t.shape) != (n, k // group_size):
            raise ValueError(
                f"{name}: {what} must be float16 (N, K // group_size) = ({n}, {k // group_size}), "
                f"got {t.dtype} {tuple(t.shape)}"
            )


def _check_inputs(x, qweight, scales, zeros, group_size, bias, act_scale, name="linear_w4a16") -> None:
    common.check_activation(name, x)
    _check_weight(name, x.shape[-1], qweight, scales, zeros, group_size)
    common.check_bias_act_scale(name, x, qweight.shape[0], bias, act_scale)
    common.check_devices(name, x, qweight, scales, zeros, bias, act_scale)


def _check_triton_device(x: torch.Tensor) -> None:
    common.check_launchable("linear_w4a16_triton", x, "linear_w4a16_reference")


def _prepare(x2d, qweight, scales, zeros):
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return x2d, qweight.contiguous(), scales.contiguous(), zeros.contiguous()


def _gemv(x2d, qweight, scales, zeros, group_size, bias=None, act_scale=None) -> torch.Tensor:
    """GEMV path: x2d (M, K) with M <= 16 -> (M, N); one pass over the packed weight."""
    m = x2d.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"linear_w4a16 GEMV: M must be <= {GEMV_MAX_M}, got {m}")
    x2d, qweight, scales, zeros = _prepare(x2d, qweight, scales, zeros)
    n, k = qweight.shape[0], x2d.shape[1]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if out.numel() == 0:
        return out
    common.launch(
        _w4_gemv_kernel,
        _gemv_tuned,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, qweight, scales, zeros, x2d if bias is None else bias, x2d if act_scale is None else act_scale, out,
         m, n, k, x2d.stride(0), qweight.stride(0), scales.stride(0), out.stride(0)),
        _GEMV_INTERP,
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        HAS_ACT=act_scale is not None,
        UPCAST=common.INTERPRETED,
        BLOCK_M=common.gemv_bucket(m),
    )
    return out


def _gemm(x2d, qweight, scales, zeros, group_size, bias=None, act_scale=None) -> torch.Tensor:
    """Tensor-core GEMM path: x2d (M, K) -> (M, N), codes dequantized to x's dtype tile by tile in the K loop."""
    x2d, qweight, scales, zeros = _prepare(x2d, qweight, scales, zeros)
    m, k, n = x2d.shape[0], x2d.shape[1], qweight.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if out.numel() == 0:
        return out
    common.launch(
        _w4_gemm_kernel,
        _gemm_tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, qweight, scales, zeros, x2d if bias is None else bias, x2d if act_scale is None else act_scale, out,
         m, n, k, common.gemm_bucket(m), x2d.stride(0), qweight.stride(0), scales.stride(0), out.stride(0)),
        _GEMM_INTERP,
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        HAS_ACT=act_scale is not None,
        UPCAST=common.INTERPRETED,
    )
    return out


def dequantize_w4_triton(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    act_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantize packed int4 to a dense (N, K) `dtype` weight: (q - zero) * scale [* act_scale[k]] in fp32.

    Args:
        qweight: (N, K // 2) uint8; scales, zeros: (N, K // group_size) float16.
        dtype: float16, bfloat16 or float32.
        act_scale: optional (K,) float32, folded into the weight's columns.
    """
    name = "dequantize_w4_triton"
    common.check_dtype(name, "dtype", dtype)
    if qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be uint8 (N, K // 2), got {qweight.dtype} {tuple(qweight.shape)}")
    k = qweight.shape[1] * 2
    _check_weight(name, k, qweight, scales, zeros, group_size)
    common.check_act_scale(name, act_scale, k)
    common.check_devices(name, qweight, scales, zeros, act_scale)
    _check_triton_device(qweight)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    n = qweight.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    cfg = _DEQUANT_BLOCKS
    common.wrap(_w4_dequant_kernel)[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))](
        qweight, scales, zeros, qweight if act_scale is None else act_scale, out,
        n, k, qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size, HAS_ACT=act_scale is not None, **cfg,
    )
    return out


def _dense(x2d, qweight, scales, zeros, group_size, bias=None, act_scale=None) -> torch.Tensor:
    """Dense path for large M: dequantize once (act_scale folded in), then cuBLAS; the weight's extra write and
    read cost little next to a compute-bound GEMM."""
    w = dequantize_w4_triton(qweight, scales, zeros, group_size, x2d.dtype, act_scale)
    return F.linear(x2d, w, bias)


def linear_w4a16_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    act_scale: Optional[torch.Tensor] = None,
    gemv_max_m: int = GEMV_MAX_M,
    dense_min_m: int = DENSE_OFF,
) -> torch.Tensor:
    """y = linear(x * act_scale, dequantized W, bias) on the kernel that M = x.numel() // K picks.

    Args: as `linear_w4a16_reference`, all on one Triton device (CPU only under TRITON_INTERPRET=1), plus
        gemv_max_m: the GEMV kernel for M <= gemv_max_m (at most 16, the kernel's row capacity);
        dense_min_m: dequantize + F.linear for M >= dense_min_m; the tl.dot GEMM in between.

    Returns:
        (..., N) contiguous, x.dtype.
    """
    _check_inputs(x, qweight, scales, zeros, group_size, bias, act_scale)
    _check_triton_device(x)
    return common.run_by_rows("linear_w4a16", x, qweight.shape[0], gemv_max_m, dense_min_m, _gemv, _gemm, _dense,
                              qweight, scales, zeros, group_size, bias, act_scale)


# triton_op infers the schema from the annotations (torch 2.13 ignores its schema= argument), so the ints read
# SymInt there; callers pass plain ints either way.
@triton_op("llmcompress::linear_w4a16", mutates_args=())
def _linear_w4a16_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    act_scale: Optional[torch.Tensor] = None,
    gemv_max_m: int = GEMV_MAX_M,
    dense_min_m: int = DENSE_OFF,
) -> torch.Tensor:
    # triton_op reuses this body as the fake impl and inlines it under torch.compile without going through the
    # CPU kernel below, so it calls that kernel's function itself for CPU tensors (see rms_norm.py).
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        return _linear_w4a16_cpu(x, qweight, scales, zeros, group_size, bias, act_scale)
    return linear_w4a16_triton(x, qweight, scales, zeros, group_size, bias, act_scale, gemv_max_m, dense_min_m)


@_linear_w4a16_op.register_kernel("cpu")
def _linear_w4a16_cpu(x, qweight, scales, zeros, group_size, bias=None, act_scale=None, gemv_max_m=GEMV_MAX_M,
                      dense_min_m=DENSE_OFF):
    _check_inputs(x, qweight, scales, zeros, group_size, bias, act_scale)
    return linear_w4a16_reference(x, qweight, scales, zeros, group_size, bias, act_scale)


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, group_size, bias, act_scale = inputs[:7]
    ctx.save_for_backward(qweight, scales, zeros, act_scale)
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out: torch.Tensor):
    qweight, scales, zeros, act_scale = ctx.saved_tensors
    grad_x, grad_bias = common.linear_backward(
        ctx, grad_out, lambda: dequantize_int4(qweight, scales, zeros, ctx.group_size), act_scale, ctx.bias_dtype, 5
    )
    return grad_x, None, None, None, None, grad_bias, None, None, None


_linear_w4a16_op.register_autograd(_backward, setup_context=_setup_context)


@register_cost(torch.ops.llmcompress.linear_w4a16.default)
def _linear_w4a16_cost(node):
    """2·M·N·K (+M·N bias, +M·K act_scale); bytes at stored dtypes, so the packed weight counts K/2 per row."""
    return common.weight_only_linear_cost(node, bias_index=5, act_scale_index=6)
