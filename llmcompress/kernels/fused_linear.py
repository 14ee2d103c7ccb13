"""Dense linear with a fused prologue (RMSNorm without weight) and epilogue (bias, activation, SiLU(gate)·up,
residual add, output cast): one kernel where eager runs up to ten.

Entry points:
- `torch.ops.llmcompress.fused_linear(x, w, bias=None, residual=None, activation="none", gated=False,
  rms_eps=None, gemv_max_m=16, out_dtype=None)`: the custom op graphs call; CUDA runs `fused_linear_triton`, CPU
  runs `fused_linear_reference`. With every option off it is the plain dense linear of the Triton lowering.
- `fused_linear_triton(...)`: checks inputs and picks a kernel by M, the number of rows of x:
  M <= gemv_max_m: `_fused_gemv_kernel` (one program per BLOCK_N outputs and all M rows, so W is streamed once,
  its tiles loaded along K, the contiguous dimension: the batch-1 decode path, memory bound);
  M > gemv_max_m: `_fused_gemm_kernel` (tensor-core tl.dot tiles, grouped program order).
  Both accumulate in fp32 and run the whole epilogue on the accumulator before one rounding to the output dtype.
- `fused_linear_reference(...)`: plain torch in float32, the numerics every path is tested against.

Semantics, with x' = x * rsqrt(mean(x² over K) + rms_eps) per row when rms_eps is not None, else x:
  h = x' @ w.T + bias; y = act(h) or, gated, act(h[..., :N]) * h[..., N:]; y = y + residual; out = y.to(out_dtype).

RMSNorm is applied as a per-row scale of the accumulator ((x·r) @ W.T = r·(x @ W.T)): the kernels sum x² while
they stream x for the matmul, so the prologue costs no extra pass over x. Hugging Face's LlamaRMSNorm rounds the
normalized row to x's dtype before the matmul; here it is never rounded, so fp16/bf16 results differ from HF by
up to about one ulp of x' times |W| summed over K (the fused result is the more exact one). fp32 agrees to fp32
sum order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import io_bytes, numel, register_cost, sym
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.linear_common import DENSE_OFF, GEMV_MAX_M, dot_fp32, grouped_pid, node_arg

__all__ = ["ACTIVATIONS", "fused_linear_reference", "fused_linear_triton"]

# Activation name -> the kernels' ACTIVATION constexpr (ints: plain constexprs across wrap_triton and Inductor).
ACTIVATIONS = {"none": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}
_ACTIVATIONS_TEXT = ", ".join(repr(a) for a in ACTIVATIONS)


@triton.jit
def _activation(v, ACTIVATION: tl.constexpr):
    """ACTIVATIONS[name](v) on an fp32 tile."""
    if ACTIVATION == 1:
        v = v * tl.sigmoid(v)
    elif ACTIVATION == 2:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACTIVATION == 3:
        # tanh(z) = 2·sigmoid(2z) - 1: Triton has no portable tanh (libdevice is CUDA-only, not in the interpreter).
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
    elif ACTIVATION == 4:
        v = tl.maximum(v, 0.0)
    return v


@triton.jit
def _fused_epilogue(
    acc,
    acc_up,
    sumsq,
    bias_ptr,
    res_ptr,
    out_ptr,
    rm,
    rn,
    m_mask,
    n_mask,
    N,
    K,
    stride_rm,
    stride_om,
    rms_eps,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RMS: tl.constexpr,
):
    """out[rm, rn] = (act(r·acc + b) [* (r·acc_up + b_up)] + residual) in fp32, rounded once; r the RMS scale."""
    if HAS_RMS:
        r = tl.rsqrt(sumsq / K + rms_eps)[:, None]
        acc = acc * r
        if GATED:
            acc_up = acc_up * r
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    if GATED:
        acc = acc * acc_up
    rm64 = rm.to(tl.int64)[:, None]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rm64 * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64 * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_step(x, w, acc, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ w.T for x (BLOCK_M, BLOCK_K), w (BLOCK_N, BLOCK_K) in fp32."""
    if BLOCK_M >= 16:
        # 5..16 rows: FMAs would make the kernel compute-bound (32 FLOPs per bf16 weight byte at M=16), so pad M
        # to the tensor cores' 16.
        acc = dot_fp32(x, tl.trans(w), acc, UPCAST)
    else:
        # 1..4 rows: fp32 FMAs, the weight tile reused across the rows.
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _fused_gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    rms_eps,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RMS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per BLOCK_N outputs (and, gated, the BLOCK_N up rows N further down) and every row of x: each
    # program walks the whole of K, so W is read exactly once; W tiles are (BLOCK_N, BLOCK_K) rows of contiguous K.
    # Every program also sums x² for the RMS scale: x is M·K elements, negligible next to W at M <= 16.
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    g_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    u_rows = w_ptr + (rn.to(tl.int64) + N)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_RMS:
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(g_rows + k[None, :], mask=w_mask, other=0.0)
        acc = _gemv_step(x, w, acc, BLOCK_M, UPCAST)
        if GATED:
            wu = tl.load(u_rows + k[None, :], mask=w_mask, other=0.0)
            acc_up = _gemv_step(x, wu, acc_up, BLOCK_M, UPCAST)
    _fused_epilogue(acc, acc_up, sumsq, bias_ptr, res_ptr, out_ptr, rm, rn, m_mask, n_mask, N, K, stride_rm,
                    stride_om, rms_eps, ACTIVATION, GATED, HAS_BIAS, HAS_RES, HAS_RMS)


@triton.jit
def _fused_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    rms_eps,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RMS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # m_bucket is unused here: it is only the autotuner's key, so each power-of-two range of M gets its config.
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    g_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn  # the tile is loaded as (BLOCK_K, BLOCK_N)
    u_cols = w_ptr + (rn.to(tl.int64) + N)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_RMS:
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(g_cols + k[:, None], mask=w_mask, other=0.0)
        acc = dot_fp32(x, w, acc, UPCAST)
        if GATED:
            wu = tl.load(u_cols + k[:, None], mask=w_mask, other=0.0)
            acc_up = dot_fp32(x, wu, acc_up, UPCAST)
    _fused_epilogue(acc, acc_up, sumsq, bias_ptr, res_ptr, out_ptr, rm, rn, m_mask, n_mask, N, K, stride_rm,
                    stride_om, rms_eps, ACTIVATION, GATED, HAS_BIAS, HAS_RES, HAS_RMS)


# GPU configs are untuned guesses pending H100 measurement (no GPU was available when this was written). GEMV:
# BLOCK_N 8-64 outputs (N=4096 at BLOCK_N=16 gives 256 programs, about two per SM on an H100) by BLOCK_K 128-512
# k, 16-byte vector loads along K; the FMA buckets hold BLOCK_M x BLOCK_N x BLOCK_K products in registers, so the
# large tiles may spill at 4 rows and lose the tuning. Keyed on (M bucket, N, K). GEMM: the tutorial's tiles.
# Under the interpreter one small fixed config runs instead.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(8, 256, 4, 4), (8, 512, 4, 3), (16, 128, 4, 4), (16, 256, 4, 3), (16, 512, 8, 3),
                          (32, 128, 4, 3), (32, 256, 8, 3), (64, 64, 4, 4), (64, 128, 8, 2)]
]
_GEMV_INTERP = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}
_GEMM_INTERP = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4}


# Gated tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) that spill registers (two accumulators), in bytes per thread
# (ptxas, M = 512, K = N = 4096, benchmarks/gpu_compile.py); 128x256 spilled ~2.5 KB in bf16 (issue 12) and its
# shared memory (229,376 B compiled on sm_90) is over the estimate's limit anyway.
_GATED_SPILLS = {
    ("sm_90", "16-bit"): {(128, 64, 64, 4), (128, 256, 64, 8)},  # bf16 40 B; ~2.5 KB
    ("sm_80", "16-bit"): {(64, 128, 64, 4), (128, 64, 64, 4), (128, 128, 64, 8), (128, 256, 64, 8)},  # 52, 88, 152 B
    ("sm_90", "fp32"): {(32, 64, 32, 4)},  # 16 B
    ("sm_80", "fp32"): {(16, 64, 32, 4), (32, 64, 32, 8)},  # 4, 8 B
}
_gated_choice = common.gemm_choice(_GATED_SPILLS)
_plain_choice = common.gemm_choice()


def _gemm_choice(configs, nargs, capability):
    return (_gated_choice if nargs["GATED"] else _plain_choice)(configs, nargs, capability)


def _shared_bytes(config, nargs) -> int:
    """Upper bound of shared memory: x and one weight tile per half (gate, up) per stage, or the output tile."""
    x_bytes = common.element_size("x_ptr")
    return common.tile_shared_bytes(x_bytes, x_bytes, common.element_size("out_ptr"),
                                    b_tiles=2 if nargs["GATED"] else 1)(config, nargs)


# Gated GEMV tiles (row bucket, BLOCK_N, BLOCK_K, num_warps) that spill: bf16 at one row on sm_90, 8 B each.
_GATED_GEMV_SPILLS = {("sm_90", "16-bit"): {(1, 8, 512, 4), (1, 16, 512, 8)}}
_gated_gemv_choice = common.gemv_choice(spills=_GATED_GEMV_SPILLS)
_plain_gemv_choice = common.gemv_choice()


def _gemv_choice(configs, nargs, capability):
    return (_gated_gemv_choice if nargs["GATED"] else _plain_gemv_choice)(configs, nargs, capability)


_gemv_tuned = common.autotuned(_fused_gemv_kernel, _GEMV_CONFIGS + common.GEMV_CONFIGS_FP32_DOT,
                               key=["BLOCK_M", "N", "K"], shared_bytes=_shared_bytes, choose=_gemv_choice)
_gemm_tuned = common.autotuned(_fused_gemm_kernel, common.GEMM_CONFIGS + common.GEMM_CONFIGS_FP32,
                               key=["m_bucket", "N", "K"], shared_bytes=_shared_bytes, choose=_gemm_choice)


def fused_linear_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    activation: str = "none",
    gated: bool = False,
    rms_eps: Optional[float] = None,
    gemv_max_m: int = GEMV_MAX_M,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The op's numerics in plain torch: everything in float32, rounded once to the output dtype (float64 inputs,
    which the op refuses, are computed in float64: the tests' oracle).

    Args:
        x: (..., K) float16/bfloat16/float32.
        w: (N_w, K) in x's dtype; N_w = 2N when gated (rows [0, N) gate, [N, 2N) up), else N.
        bias: optional (N_w,) in x's dtype, added before the activation (to both halves when gated).
        residual: optional (..., N) in x's dtype, added last.
        activation: one of ACTIVATIONS; gated requires one other than "none".
        rms_eps: when not None, x is RMS-normalized over K first (RMSNorm without weight; the normalized row is
            not rounded to x's dtype, unlike Hugging Face's: see the module docstring).
        gemv_max_m: kernel choice of the Triton path; ignored here.
        out_dtype: the output's dtype, x's when None (a cast fused into the epilogue).

    Returns:
        (..., N) in out_dtype or x.dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # float64 inputs stay float64: the tests' oracle
    h = x.to(acc)
    if rms_eps is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + rms_eps)
    y = h @ w.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = _activation_reference(gate, activation) * up
    else:
        y = _activation_reference(y, activation)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(out_dtype or x.dtype)


def _activation_reference(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(y)
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if activation == "relu":
        return torch.relu(y)
    return y


def _check_inputs(x, w, bias, residual, activation, gated, rms_eps, gemv_max_m, out_dtype,
                  name="fused_linear") -> None:
    """ValueError naming what is allowed, for anything the kernels and the reference do not compute exactly."""
    common.check_activation(name, x)
    k = x.shape[-1]
    if k == 0:
        raise ValueError(f"{name}: x must be (..., K) with K >= 1, got shape {tuple(x.shape)}")
    if w.dim() != 2 or w.dtype != x.dtype or w.shape[1] != k:
        raise ValueError(f"{name}: w must be 2-D (N_w, K) = (N_w, {k}) in x's dtype {x.dtype}, "
                         f"got {w.dtype} {tuple(w.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {_ACTIVATIONS_TEXT}, got {activation!r}")
    n_w = w.shape[0]
    if gated:
        if activation == "none":
            raise ValueError(f"{name}: gated=True needs an activation other than 'none' (one of {_ACTIVATIONS_TEXT})")
        if n_w % 2:
            raise ValueError(f"{name}: gated=True needs an even number of weight rows (gate then up), got N_w={n_w}")
    n = n_w // 2 if gated else n_w
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n_w,)):
        raise ValueError(f"{name}: bias must be (N_w,) = ({n_w},) in x's dtype {x.dtype}, "
                         f"got {bias.dtype} {tuple(bias.shape)}")
    out_shape = (*x.shape[:-1], n)
    if residual is not None and (residual.dtype != x.dtype or tuple(residual.shape) != out_shape):
        raise ValueError(f"{name}: residual must be the output's shape {out_shape} in x's dtype {x.dtype} (no "
                         f"broadcasting), got {residual.dtype} {tuple(residual.shape)}")
    if rms_eps is not None and not (math.isfinite(rms_eps) and rms_eps >= 0):
        raise ValueError(f"{name}: rms_eps must be None or a finite float >= 0, got {rms_eps!r}")
    if not 0 <= gemv_max_m <= GEMV_MAX_M:
        raise ValueError(f"{name}: gemv_max_m must be in [0, {GEMV_MAX_M}], got {gemv_max_m}")
    if out_dtype is not None:
        common.check_dtype(name, "out_dtype", out_dtype)
    common.check_devices(name, x, w, bias, residual)


def _launch_args(x2d, w, bias, residual, rms_eps, out):
    """x2d (M, K) with unit column stride; residual as (M, N) rows; placeholders for the absent tensors."""
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    w = w.contiguous()
    res = None if residual is None else residual.reshape(out.shape).contiguous()
    return (x2d, w, x2d if bias is None else bias, out if res is None else res, out,
            0.0 if rms_eps is None else float(rms_eps), 0 if res is None else res.stride(0))


def _constexprs(bias, residual, activation, gated, rms_eps) -> dict:
    return dict(ACTIVATION=ACTIVATIONS[activation], GATED=gated, HAS_BIAS=bias is not None,
                HAS_RES=residual is not None, HAS_RMS=rms_eps is not None, UPCAST=common.INTERPRETED)


def _out(x2d, w, gated, out_dtype):
    n = w.shape[0] // 2 if gated else w.shape[0]
    return torch.empty((x2d.shape[0], n), dtype=out_dtype or x2d.dtype, device=x2d.device)


def _gemv(x2d, w, bias=None, residual=None, activation="none", gated=False, rms_eps=None, out_dtype=None):
    """GEMV path: x2d (M, K) with M <= 16 -> (M, N); one pass over W."""
    m = x2d.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"fused_linear GEMV: M must be <= {GEMV_MAX_M}, got {m}")
    out = _out(x2d, w, gated, out_dtype)
    if out.numel() == 0:
        return out
    x2d, w, b, r, out, eps, stride_rm = _launch_args(x2d, w, bias, residual, rms_eps, out)
    m, n, k = out.shape[0], out.shape[1], x2d.shape[1]
    common.launch(
        _fused_gemv_kernel,
        _gemv_tuned,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, w, b, r, out, m, n, k, x2d.stride(0), w.stride(0), stride_rm, out.stride(0), eps),
        _GEMV_INTERP,
        BLOCK_M=common.gemv_bucket(m),
        **_constexprs(bias, residual, activation, gated, rms_eps),
    )
    return out


def _gemm(x2d, w, bias=None, residual=None, activation="none", gated=False, rms_eps=None, out_dtype=None):
    """Tensor-core GEMM path: x2d (M, K) -> (M, N)."""
    out = _out(x2d, w, gated, out_dtype)
    if out.numel() == 0:
        return out
    x2d, w, b, r, out, eps, stride_rm = _launch_args(x2d, w, bias, residual, rms_eps, out)
    m, n, k = out.shape[0], out.shape[1], x2d.shape[1]
    common.launch(
        _fused_gemm_kernel,
        _gemm_tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        (x2d, w, b, r, out, m, n, k, common.gemm_bucket(m), x2d.stride(0), w.stride(0), stride_rm, out.stride(0),
         eps),
        _GEMM_INTERP,
        **_constexprs(bias, residual, activation, gated, rms_eps),
    )
    return out


def fused_linear_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    activation: str = "none",
    gated: bool = False,
    rms_eps: Optional[float] = None,
    gemv_max_m: int = GEMV_MAX_M,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The fused linear on the kernel that M = x.numel() // K picks.

    Args: as `fused_linear_reference`, all on one Triton device (CPU only under TRITON_INTERPRET=1), plus
        gemv_max_m: the GEMV kernel for M <= gemv_max_m (at most 16, the kernel's row capacity), the GEMM above.

    Returns:
        (..., N) contiguous, out_dtype or x.dtype.
    """
    _check_inputs(x, w, bias, residual, activation, gated, rms_eps, gemv_max_m, out_dtype)
    common.check_launchable("fused_linear_triton", x, "fused_linear_reference")
    n = w.shape[0] // 2 if gated else w.shape[0]
    if x.numel() == 0 or n == 0:
        return torch.empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype, device=x.device)
    return common.run_by_rows("fused_linear", x, n, gemv_max_m, DENSE_OFF, _gemv, _gemm, _gemm,
                              w, bias, residual, activation, gated, rms_eps, out_dtype)


# triton_op infers the schema from the annotations (torch 2.13 ignores its schema= argument):
# (Tensor x, Tensor w, Tensor? bias=None, Tensor? residual=None, str activation="none", bool gated=False,
#  float? rms_eps=None, SymInt gemv_max_m=16, ScalarType? out_dtype=None) -> Tensor
@triton_op("llmcompress::fused_linear", mutates_args=())
def _fused_linear_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    activation: str = "none",
    gated: bool = False,
    rms_eps: Optional[float] = None,
    gemv_max_m: int = GEMV_MAX_M,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    # triton_op reuses this body as the fake impl and inlines it under torch.compile without going through the
    # CPU kernel below, so it calls that kernel's function itself for CPU tensors (see rms_norm.py).
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        return _fused_linear_cpu(x, w, bias, residual, activation, gated, rms_eps, gemv_max_m, out_dtype)
    return fused_linear_triton(x, w, bias, residual, activation, gated, rms_eps, gemv_max_m, out_dtype)


@_fused_linear_op.register_kernel("cpu")
def _fused_linear_cpu(x, w, bias=None, residual=None, activation="none", gated=False, rms_eps=None,
                      gemv_max_m=GEMV_MAX_M, out_dtype=None):
    _check_inputs(x, w, bias, residual, activation, gated, rms_eps, gemv_max_m, out_dtype)
    return fused_linear_reference(x, w, bias, residual, activation, gated, rms_eps, gemv_max_m, out_dtype)


@register_cost(torch.ops.llmcompress.fused_linear.default)
def _fused_linear_cost(node):
    """2·M·N_w·K for the matmul, plus per element: x² and its sum (2·M·K) and the row scale (M·N_w) for the RMS
    prologue, the bias (M·N_w), the activation (one FLOP an element, as the cost model counts pointwise ops), the
    gate product (M·N) and the residual (M·N); bytes: x, w, bias and residual read once, the output written once."""
    x, w = node_arg(node, 0, "x"), node_arg(node, 1, "w")
    k, n_w = sym(x.shape[-1]), sym(w.shape[0])
    m = numel(x) / k
    gated = bool(node_arg(node, 5, "gated"))
    n = n_w / 2 if gated else n_w
    flops = 2 * m * n_w * k
    if node_arg(node, 6, "rms_eps") is not None:
        flops += 2 * m * k + m * n_w
    if node_arg(node, 2, "bias") is not None:
        flops += m * n_w
    if (node_arg(node, 4, "activation") or "none") != "none":
        flops += m * n if gated else m * n_w
    if gated:
        flops += m * n
    if node_arg(node, 3, "residual") is not None:
        flops += m * n
    return flops, io_bytes(node)
