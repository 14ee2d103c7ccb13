"""2:4 sparse linears: y = x @ W.T + bias with W stored as its kept values and 2-bit positions (`formats/sparse.py`).

Entry points:
- `torch.ops.llmcompress.linear_2of4(x, values, meta, bias=None, gemv_max_m=16, dense_min_m=2**62)`: W in x's dtype as values
  (N, K // 2) + meta; CUDA runs `linear_2of4_triton`, CPU runs `linear_2of4_reference`.
- `torch.ops.llmcompress.linear_2of4_w4a16(x, qvalues, meta, scales, zeros, group_size, bias=None,
  gemv_max_m=16, dense_min_m=2**62)`: the kept values as int4 codes, w = (q - zero) * scale; `linear_2of4_w4a16_triton` /
  `linear_2of4_w4a16_reference`.
- The launchers pick a kernel by M, the rows of x: M <= gemv_max_m: `_s24_gemv_kernel` (one program per BLOCK_N
  outputs and all M rows: the stored values and metadata are streamed once); M >= dense_min_m: the weight expanded
  once to x's dtype and F.linear (cuBLAS); in between: `_s24_gemm_kernel`
  (tensor-core `tl.dot` on tiles expanded from the stored form in registers). Triton cannot emit the sparse
  tensor-core MMA, so both multiply the zeros too: the win is bytes (at fp16 0.5625 of dense, int4 + 2:4 at group
  128 0.76 of packed int4), i.e. small M. Where dense or torch's semi-structured path (cuSPARSELt) is faster,
  `sparse_path.py` says so, and the layer is not lowered to these ops.

Expansion, the same in both kernels: a K step of BLOCK_K holds G = BLOCK_K // 4 groups. The two kept values of each
group (v0, v1, from contiguous loads split in registers) and its nibble (i0, i1) give, for each position p of 0..3,
a (BLOCK_N, G) tile w_p = v0 where i0 == p, v1 where i1 == p, else 0; x's columns 4g + p, a (BLOCK_M, G) tile,
multiply it: four dots (or FMA sums) of depth G per step, which is the dense product of the step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import io_bytes, numel, register_cost, sym
from llmcompress.formats.quantized import check_group_size
from llmcompress.formats.sparse import meta_columns, unpack_2of4, unpack_2of4_int4
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.linear_common import DENSE_OFF, GEMV_MAX_M, dot_fp32, grouped_pid, node_arg, store_output

__all__ = ["linear_2of4_reference", "linear_2of4_triton", "linear_2of4_w4a16_reference",
           "linear_2of4_w4a16_triton"]


@triton.jit
def _s24_expand(v_rows, m_rows, s_rows, z_rows, k0, K, n_mask, QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The step's kept values v0, v1 (fp32) and positions i0, i1 (int32), each (BLOCK_N, G) over groups
    k0 // 4 + 0..G-1. QUANT = 0: values in x's dtype (N, K // 2); 1: int4 codes, a byte per group (N, K // 4)."""
    G: tl.constexpr = BLOCK_K // 4
    # Metadata: G // 2 bytes per row, the even group in the low nibble; bytes past the row load as 0.
    rb = k0 // 8 + tl.arange(0, G // 2)
    byte = tl.load(m_rows + rb[None, :], mask=n_mask[:, None] & (rb < (K // 4 + 1) // 2)[None, :], other=0)
    byte = byte.to(tl.int32)
    nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, G))
    i0 = nib & 3
    i1 = nib >> 2
    rg = k0 // 4 + tl.arange(0, G)
    w_mask = n_mask[:, None] & (rg < K // 4)[None, :]
    if QUANT:
        q = tl.load(v_rows + rg[None, :], mask=w_mask, other=0).to(tl.int32)
        if BLOCK_K <= GROUP_SIZE:
            # BLOCK_K divides GROUP_SIZE (powers of two, K a multiple of GROUP_SIZE): one scale per row and step.
            # The index as a (BLOCK_N,) vector: under the interpreter k0 is a Python int, and a bare bool mask fails.
            gi = k0 // GROUP_SIZE + tl.zeros((BLOCK_N,), dtype=tl.int32)
            sz_mask = n_mask & (gi < K // GROUP_SIZE)
            s = tl.load(s_rows + gi, mask=sz_mask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_rows + gi, mask=sz_mask, other=0.0).to(tl.float32)[:, None]
        else:
            # Both kept values of a group share its quantization group (GROUP_SIZE is a multiple of 4); the
            # gathered loads repeat GROUP_SIZE // 4 times along a row and hit L1.
            gq = (4 * rg) // GROUP_SIZE
            s = tl.load(s_rows[:, None] + gq[None, :], mask=w_mask, other=0.0).to(tl.float32)
            z = tl.load(z_rows[:, None] + gq[None, :], mask=w_mask, other=0.0).to(tl.float32)
        v0 = ((q & 0xF).to(tl.float32) - z) * s
        v1 = ((q >> 4).to(tl.float32) - z) * s
    else:
        rv = k0 // 2 + tl.arange(0, 2 * G)
        v = tl.load(v_rows + rv[None, :], mask=n_mask[:, None] & (rv < K // 2)[None, :], other=0.0)
        v0, v1 = tl.split(tl.reshape(v.to(tl.float32), (BLOCK_N, G, 2)))
    return v0, v1, i0, i1


@triton.jit
def _s24_gemv_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_vn,
    stride_mn,
    stride_sn,
    stride_om,
    QUANT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per BLOCK_N outputs and every row of x (M <= BLOCK_M <= 16): it walks the whole of K, so each
    # stored byte is loaded once per call.
    G: tl.constexpr = BLOCK_K // 4
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    rn64 = rn.to(tl.int64)
    v_rows = v_ptr + rn64[:, None] * stride_vn
    m_rows = meta_ptr + rn64[:, None] * stride_mn
    s_rows = s_ptr + rn64 * stride_sn
    z_rows = z_ptr + rn64 * stride_sn
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v0, v1, i0, i1 = _s24_expand(v_rows, m_rows, s_rows, z_rows, k0, K, n_mask, QUANT, GROUP_SIZE, BLOCK_N,
                                     BLOCK_K)
        rg = k0 // 4 + tl.arange(0, G)
        x_mask = m_mask[:, None] & (rg < K // 4)[None, :]
        for p in tl.static_range(4):
            w_p = tl.where(i0 == p, v0, tl.where(i1 == p, v1, 0.0))  # (BLOCK_N, G)
            x_p = tl.load(x_rows + 4 * rg[None, :] + p, mask=x_mask, other=0.0)  # (BLOCK_M, G)
            if BLOCK_M >= 16:
                # 5..16 rows: padded to the tensor cores' 16, operands in x's dtype, as the GEMM does.
                acc = dot_fp32(x_p, tl.trans(w_p.to(dt)), acc, UPCAST)
            else:
                # 1..4 rows: fp32 FMAs on the expanded tile, reused across the rows.
                acc += tl.sum(x_p.to(tl.float32)[:, None, :] * w_p[None, :, :], axis=2)
    store_output(acc, bias_ptr, out_ptr, rm, rn, m_mask, n_mask, stride_om, HAS_BIAS)


@triton.jit
def _s24_gemm_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_xm,
    stride_vn,
    stride_mn,
    stride_sn,
    stride_om,
    QUANT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # m_bucket is only the autotuner's key. Grouped program order: GROUP_M row blocks share weight tiles in L2.
    G: tl.constexpr = BLOCK_K // 4
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    v_rows = v_ptr + rn64[:, None] * stride_vn
    m_rows = meta_ptr + rn64[:, None] * stride_mn
    s_rows = s_ptr + rn64 * stride_sn
    z_rows = z_ptr + rn64 * stride_sn
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v0, v1, i0, i1 = _s24_expand(v_rows, m_rows, s_rows, z_rows, k0, K, n_mask, QUANT, GROUP_SIZE, BLOCK_N,
                                     BLOCK_K)
        rg = k0 // 4 + tl.arange(0, G)
        x_mask = m_mask[:, None] & (rg < K // 4)[None, :]
        for p in tl.static_range(4):
            w_p = tl.where(i0 == p, v0, tl.where(i1 == p, v1, 0.0)).to(dt)  # (BLOCK_N, G)
            x_p = tl.load(x_rows + 4 * rg[None, :] + p, mask=x_mask, other=0.0)  # (BLOCK_M, G)
            acc = dot_fp32(x_p, tl.trans(w_p), acc, UPCAST)
    store_output(acc, bias_ptr, out_ptr, rm, rn, m_mask, n_mask, stride_om, HAS_BIAS)


# GPU configs are untuned guesses pending H100 measurement (no GPU was lent when this was written); those that spill
# on a target are left out there (`_GEMM_SPILLS`, `_GEMV_SPILLS`). BLOCK_K >= 64:
# a step's G = BLOCK_K // 4 groups are the dots' depth, which tl.dot needs >= 16.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=st)
    for bn, bk, st in [(16, 128, 3), (16, 256, 3), (32, 128, 3), (32, 256, 2), (64, 64, 4), (64, 128, 2)]
]
# fp32 x at the tensor-core bucket (an fp32 tl.dot on FMAs): small tiles, as `linear_common.GEMV_CONFIGS_FP32_DOT`
# but with the 64-deep K steps the expansion needs.
_GEMV_CONFIGS_FP32_DOT = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=3) for bn, bk in [(8, 64), (8, 128),
                                                                                          (16, 64)]
]
_GEMM_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=3)
    for bm, bn, w in [(16, 64, 4), (32, 32, 4), (32, 64, 4), (32, 64, 8)]
]
_GEMV_INTERP = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}
_GEMM_INTERP = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 4}


def _shared_bytes(config, nargs) -> int:
    """Upper bound of a config's shared memory: num_stages buffers of the x tile and of the stored weight tile
    (values: BLOCK_K / 2 elements per output, or int4 codes BLOCK_K / 4 bytes, + BLOCK_K / 8 bytes of metadata),
    plus the four expanded (G, BLOCK_N) tiles staged for the dots; or the fp32 output tile when larger."""
    kw = {**nargs, **config.kwargs}
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    e = nargs["x_ptr"].element_size()
    stored = bk / 4 if kw["QUANT"] else bk / 2 * nargs["v_ptr"].element_size()
    stages = max(config.num_stages, 1)
    pipeline = stages * (bm * bk * e + bn * (stored + bk / 8)) + bk * bn * e
    return math.ceil(max(pipeline, bm * bn * 4))


# Tiles (BLOCK_M or the GEMV's row bucket, BLOCK_N, BLOCK_K, num_warps) that spill registers, per format (QUANT) and
# `linear_common.spill_key`: the largest spill in bytes per thread over the full set (M = 1, 3, 16, 64, 512 at
# K = N = 4096; M = 3, 77 at K = 5504, N = 1000; benchmarks/gpu_compile.py --families sparse): left out there.
_GEMM_SPILLS = {
    0: {("sm_80", "16-bit"): {(64, 128, 64, 4), (64, 128, 128, 8), (128, 64, 64, 4), (128, 256, 64, 8)},  # 24-132 B
        ("sm_90", "16-bit"): {(128, 256, 64, 8)},  # 88 B
        ("sm_80", "fp32"): {(32, 64, 64, 4)}, ("sm_90", "fp32"): {(32, 64, 64, 4)}},  # 8 B, 36 B
    1: {("sm_80", "16-bit"): {(64, 128, 64, 4), (64, 128, 128, 8), (128, 64, 64, 4), (128, 256, 64, 8)},  # 4-152 B
        ("sm_90", "16-bit"): {(32, 64, 128, 4), (64, 128, 128, 8), (128, 256, 64, 8)}},  # 12-120 B
}
_GEMV_SPILLS = {0: {}, 1: {("sm_80", "fp32"): {(16, 8, 128, 4)}}}  # 8 B


def _gemm_choice(configs, nargs, capability):
    fp32 = nargs["x_ptr"].dtype == torch.float32
    spills = _GEMM_SPILLS[nargs["QUANT"]]
    return [c for c in configs
            if any(c is x for x in _GEMM_CONFIGS_FP32) == fp32 and not common.spilling(spills, c, nargs, capability)]


def _gemv_choice(configs, nargs, capability):
    return common.gemv_choice(_GEMV_CONFIGS_FP32_DOT, _GEMV_SPILLS[nargs["QUANT"]])(configs, nargs, capability)


_gemv_tuned = common.autotuned(_s24_gemv_kernel, _GEMV_CONFIGS + _GEMV_CONFIGS_FP32_DOT,
                               key=["BLOCK_M", "N", "K", "QUANT", "GROUP_SIZE"], shared_bytes=_shared_bytes,
                               choose=_gemv_choice)
_gemm_tuned = common.autotuned(_s24_gemm_kernel, common.GEMM_CONFIGS + _GEMM_CONFIGS_FP32,
                               key=["m_bucket", "N", "K", "QUANT", "GROUP_SIZE"], shared_bytes=_shared_bytes,
                               choose=_gemm_choice)


def linear_2of4_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, gemv_max_m: int = GEMV_MAX_M,
                          dense_min_m: int = DENSE_OFF) -> torch.Tensor:
    """The op's numerics in plain torch, the CPU path and the kernels' oracle: the weight unpacked
    (`formats.sparse.unpack_2of4`) to float32, y = (x.float() @ W.T + bias.float()).to(x.dtype).

    Args:
        x: (..., K) float16/bfloat16/float32, K % 4 == 0.
        values: (N, K // 2) in x's dtype; meta: uint8 (N, ceil(K / 8)) (layout in `formats/sparse.py`).
        bias: optional (N,), x.dtype.
        gemv_max_m, dense_min_m: kernel choice of the Triton path; ignored here.

    Returns:
        (..., N) in x.dtype.
    """
    w = unpack_2of4(values, meta, x.shape[-1]).float()
    return common.weight_only_linear_reference(x, w, bias, None)


def linear_2of4_w4a16_reference(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                                zeros: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None,
                                gemv_max_m: int = GEMV_MAX_M, dense_min_m: int = DENSE_OFF) -> torch.Tensor:
    """As `linear_2of4_reference`, W = `formats.sparse.unpack_2of4_int4(...)` in float32 (exact).

    Args:
        qvalues: uint8 (N, K // 4); meta: uint8 (N, ceil(K / 8)); scales, zeros: float16 (N, K // group_size);
        group_size: 32, 64 or 128; the rest as `linear_2of4_reference`.
    """
    w = unpack_2of4_int4(qvalues, meta, scales, zeros, group_size, x.shape[-1])
    return common.weight_only_linear_reference(x, w, bias, None)


def _check_k_meta(name, x, n, meta) -> int:
    k = x.shape[-1]
    if k % 4:
        raise ValueError(f"{name}: K={k} must be a multiple of 4 (2:4 groups)")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, meta_columns(k)):
        raise ValueError(f"{name}: meta must be uint8 (N, ceil(K / 8)) = ({n}, {meta_columns(k)}) for K={k}, "
                         f"got {meta.dtype} {tuple(meta.shape)}")
    return k


def _check_inputs(x, values, meta, bias, name="linear_2of4") -> None:
    common.check_activation(name, x)
    if values.dim() != 2 or values.dtype != x.dtype:
        raise ValueError(f"{name}: values must be (N, K // 2) in x's dtype {x.dtype}, "
                         f"got {values.dtype} {tuple(values.shape)}")
    k = _check_k_meta(name, x, values.shape[0], meta)
    if values.shape[1] * 2 != k:
        raise ValueError(f"{name}: values must be (N, K // 2) = (N, {k // 2}) for K={k}, got {tuple(values.shape)}")
    common.check_bias_act_scale(name, x, values.shape[0], bias, None)
    common.check_devices(name, x, values, meta, bias)


def _check_inputs_w4(x, qvalues, meta, scales, zeros, group_size, bias, name="linear_2of4_w4a16") -> None:
    common.check_activation(name, x)
    if qvalues.dim() != 2 or qvalues.dtype != torch.uint8:
        raise ValueError(f"{name}: qvalues must be uint8 (N, K // 4), got {qvalues.dtype} {tuple(qvalues.shape)}")
    n = qvalues.shape[0]
    k = _check_k_meta(name, x, n, meta)
    if qvalues.shape[1] * 4 != k:
        raise ValueError(f"{name}: qvalues must be uint8 (N, K // 4) = (N, {k // 4}) for K={k}, "
                         f"got {tuple(qvalues.shape)}")
    try:
        check_group_size(k, group_size)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    for t, what in ((scales, "scales"), (zeros, "zeros")):
        if t.dtype != torch.float16 or tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"{name}: {what} must be float16 (N, K // group_size) = ({n}, {k // group_size}), "
                             f"got {t.dtype} {tuple(t.shape)}")
    common.check_bias_act_scale(name, x, n, bias, None)
    common.check_devices(name, x, qvalues, meta, scales, zeros, bias)


def _launch_gemv(x2d, stored, meta, scales, zeros, group_size, bias, quant) -> torch.Tensor:
    m = x2d.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"2:4 GEMV: M must be <= {GEMV_MAX_M}, got {m}")
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    stored, meta = stored.contiguous(), meta.contiguous()
    n, k = stored.shape[0], x2d.shape[1]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if out.numel() == 0:
        return out
    s = stored if scales is None else scales.contiguous()
    z = stored if zeros is None else zeros.contiguous()
    common.launch(
        _s24_gemv_kernel,
        _gemv_tuned,
        lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]),),
        (x2d, stored, meta, s, z, x2d if bias is None else bias, out,
         m, n, k, x2d.stride(0), stored.stride(0), meta.stride(0), s.stride(0), out.stride(0)),
        _GEMV_INTERP,
        QUANT=quant,
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        UPCAST=common.INTERPRETED,
        BLOCK_M=common.gemv_bucket(m),
    )
    return out


def _launch_gemm(x2d, stored, meta, scales, zeros, group_size, bias, quant) -> torch.Tensor:
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    stored, meta = stored.contiguous(), meta.contiguous()
    m, k, n = x2d.shape[0], x2d.shape[1], stored.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if out.numel() == 0:
        return out
    s = stored if scales is None else scales.contiguous()
    z = stored if zeros is None else zeros.contiguous()
    common.launch(
        _s24_gemm_kernel,
        _gemm_tuned,
        lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),),
        (x2d, stored, meta, s, z, x2d if bias is None else bias, out,
         m, n, k, common.gemm_bucket(m), x2d.stride(0), stored.stride(0), meta.stride(0), s.stride(0),
         out.stride(0)),
        _GEMM_INTERP,
        QUANT=quant,
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        UPCAST=common.INTERPRETED,
    )
    return out


# Path functions as `linear_common.run_by_rows` calls them: path(x2d, *args) -> (M, N).
def _gemv(x2d, values, meta, bias=None):
    return _launch_gemv(x2d, values, meta, None, None, 4, bias, 0)


def _gemm(x2d, values, meta, bias=None):
    return _launch_gemm(x2d, values, meta, None, None, 4, bias, 0)


def _gemv_w4(x2d, qvalues, meta, scales, zeros, group_size, bias=None):
    return _launch_gemv(x2d, qvalues, meta, scales, zeros, group_size, bias, 1)


def _gemm_w4(x2d, qvalues, meta, scales, zeros, group_size, bias=None):
    return _launch_gemm(x2d, qvalues, meta, scales, zeros, group_size, bias, 1)


def _dense(x2d, values, meta, bias=None):
    """M >= dense_min_m: expand the 2:4 weight once to x's dtype and run F.linear (cuBLAS), where the chooser
    prices the dense GEMM below our tile-expanding one (the expansion reads the stored bytes once more)."""
    return F.linear(x2d, unpack_2of4(values, meta, x2d.shape[1]).to(x2d.dtype), bias)


def _dense_w4(x2d, qvalues, meta, scales, zeros, group_size, bias=None):
    w = unpack_2of4_int4(qvalues, meta, scales, zeros, group_size, x2d.shape[1], x2d.dtype)
    return F.linear(x2d, w, bias)


def linear_2of4_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, gemv_max_m: int = GEMV_MAX_M,
                       dense_min_m: int = DENSE_OFF) -> torch.Tensor:
    """y = linear(x, W, bias) with W in 2:4 form, on the GEMV for M <= gemv_max_m (at most 16), the GEMM above, and
    for M >= dense_min_m the weight expanded once and F.linear.

    Args: as `linear_2of4_reference`, all on one Triton device (CPU only under TRITON_INTERPRET=1).

    Returns:
        (..., N) contiguous, x.dtype.
    """
    _check_inputs(x, values, meta, bias)
    common.check_launchable("linear_2of4_triton", x, "linear_2of4_reference")
    return common.run_by_rows("linear_2of4", x, values.shape[0], gemv_max_m, dense_min_m, _gemv, _gemm, _dense,
                              values, meta, bias)


def linear_2of4_w4a16_triton(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                             zeros: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None,
                             gemv_max_m: int = GEMV_MAX_M, dense_min_m: int = DENSE_OFF) -> torch.Tensor:
    """As `linear_2of4_triton` for the int4 + 2:4 format (args as `linear_2of4_w4a16_reference`)."""
    _check_inputs_w4(x, qvalues, meta, scales, zeros, group_size, bias)
    common.check_launchable("linear_2of4_w4a16_triton", x, "linear_2of4_w4a16_reference")
    return common.run_by_rows("linear_2of4_w4a16", x, qvalues.shape[0], gemv_max_m, dense_min_m, _gemv_w4,
                              _gemm_w4, _dense_w4, qvalues, meta, scales, zeros, group_size, bias)


# triton_op infers the schema from the annotations; its body is also the fake impl and is inlined under
# torch.compile without the CPU kernel, so it calls that kernel's function itself off CUDA (see rms_norm.py).
@triton_op("llmcompress::linear_2of4", mutates_args=())
def _linear_2of4_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    gemv_max_m: int = GEMV_MAX_M, dense_min_m: int = DENSE_OFF) -> torch.Tensor:
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        return _linear_2of4_cpu(x, values, meta, bias, gemv_max_m, dense_min_m)
    return linear_2of4_triton(x, values, meta, bias, gemv_max_m, dense_min_m)


@_linear_2of4_op.register_kernel("cpu")
def _linear_2of4_cpu(x, values, meta, bias=None, gemv_max_m=GEMV_MAX_M, dense_min_m=DENSE_OFF):
    _check_inputs(x, values, meta, bias)
    return linear_2of4_reference(x, values, meta, bias)


@triton_op("llmcompress::linear_2of4_w4a16", mutates_args=())
def _linear_2of4_w4a16_op(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None,
                          gemv_max_m: int = GEMV_MAX_M, dense_min_m: int = DENSE_OFF) -> torch.Tensor:
    if x.device.type != "cuda":
        return _linear_2of4_w4a16_cpu(x, qvalues, meta, scales, zeros, group_size, bias, gemv_max_m, dense_min_m)
    return linear_2of4_w4a16_triton(x, qvalues, meta, scales, zeros, group_size, bias, gemv_max_m, dense_min_m)


@_linear_2of4_w4a16_op.register_kernel("cpu")
def _linear_2of4_w4a16_cpu(x, qvalues, meta, scales, zeros, group_size, bias=None, gemv_max_m=GEMV_MAX_M,
                           dense_min_m=DENSE_OFF):
    _check_inputs_w4(x, qvalues, meta, scales, zeros, group_size, bias)
    return linear_2of4_w4a16_reference(x, qvalues, meta, scales, zeros, group_size, bias)


def _setup_context(ctx, inputs, output) -> None:
    ctx.x_dtype = inputs[0].dtype
    ctx.k = inputs[0].shape[-1]
    quant = len(inputs) == 9  # linear_2of4_w4a16's arguments
    ctx.save_for_backward(*inputs[1:5] if quant else inputs[1:3])
    ctx.group_size = inputs[5] if quant else None
    bias = inputs[6] if quant else inputs[3]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_index = 6 if quant else 3


def _backward(ctx, grad_out: torch.Tensor):
    """Gradients for x and bias with the weight frozen, in plain torch (see `linear_common.linear_backward`)."""
    saved = ctx.saved_tensors
    if ctx.group_size is None:
        weight = lambda: unpack_2of4(*saved, ctx.k).float()
    else:
        weight = lambda: unpack_2of4_int4(*saved, ctx.group_size, ctx.k)
    grad_x, grad_bias = common.linear_backward(ctx, grad_out, weight, None, ctx.bias_dtype, ctx.bias_index)
    grads = [grad_x] + [None] * (ctx.bias_index + 2)
    grads[ctx.bias_index] = grad_bias
    return tuple(grads)


_linear_2of4_op.register_autograd(_backward, setup_context=_setup_context)
_linear_2of4_w4a16_op.register_autograd(_backward, setup_context=_setup_context)


def _sparse_linear_cost(node, stored_name: str, bias_index: int):
    """(flops, bytes): 2·M·N·K (+M·N bias), as the kernels multiply the expanded tile, zeros included; bytes at the
    stored dtypes (`io_bytes`): the kept values or codes, metadata, scales, x and y."""
    x, stored = node_arg(node, 0, "x"), node_arg(node, 1, stored_name)
    k, n = sym(x.shape[-1]), sym(stored.shape[0])
    m = numel(x) / k
    flops = 2 * m * n * k
    if node_arg(node, bias_index, "bias") is not None:
        flops += m * n
    return flops, io_bytes(node)


@register_cost(torch.ops.llmcompress.linear_2of4.default)
def _linear_2of4_cost(node):
    return _sparse_linear_cost(node, "values", 3)


@register_cost(torch.ops.llmcompress.linear_2of4_w4a16.default)
def _linear_2of4_w4a16_cost(node):
    return _sparse_linear_cost(node, "qvalues", 6)
