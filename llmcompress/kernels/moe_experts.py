"""Fused MoE experts: y[t] = Σ_j w[t, j] · down_e(SiLU(gate_e(x[t])) · up_e(x[t])), e = ids[t, j], in two launches.

Entry points, both -> (T, H) in x's dtype, fed by `llmcompress::moe_route` (`moe_route.py`):
- `torch.ops.llmcompress.moe_experts(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids,
  num_padded, block_m=16, gemv_max_tokens=0)`: float experts; CUDA runs `moe_experts_triton`, CPU
  `moe_experts_reference`.
- `torch.ops.llmcompress.moe_experts_w4a16(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size,
  topk_weights, ..., gemv_max_tokens=0, act_gate_up=None, act_down=None)`: int4 experts in `formats/quantized.py`'s
  layout per expert (qgate_up uint8 (E, 2I, H // 2), sgate_up / zgate_up float16 (E, 2I, H // group_size); qdown
  (E, H, I // 2), sdown / zdown (E, H, I // group_size)), x float16 or bfloat16, dequantized in registers by the same
  kernels (`QUANT` = 1); CUDA `moe_experts_w4a16_triton`, CPU `moe_experts_w4a16_reference`. AWQ experts add their
  per-input-channel 1/s, float32 act_gate_up (E, H) and act_down (E, I): the kernels multiply the x / h tile of
  expert e by row e as it is loaded (`HAS_ACT`), in fp32, as `grouped_linear_w4a16`'s act_scale does. x's rows are
  shared by all experts and h is made per slot in registers, so neither can be folded into an earlier op exactly
  (folding 1/s into the up rows' float16 group scales would round them again).
- `torch.ops.llmcompress.moe_experts_w8a16(x, qgate_up, sgate_up, qdown, sdown, topk_weights, ...,
  gemv_max_tokens=0)`: int8 experts in `formats.quantize_int8_per_channel`'s layout per expert (qgate_up int8
  (E, 2I, H), sgate_up float32 (E, 2I); qdown int8 (E, H, I), sdown float32 (E, H)), dequantized in registers
  (`QUANT` = 2); CUDA `moe_experts_w8a16_triton`, CPU `moe_experts_w8a16_reference`.
Quantized experts are what `quantize-linear` makes of a `moe_experts` node (`passes/quantize/experts.py`).
The CPU paths loop over the experts that received tokens, behind the opaque ops `llmcompress::moe_experts_cpu` /
`moe_experts_w4a16_cpu` / `moe_experts_w8a16_cpu` (the loop's shapes depend on the routing, and a triton_op body is
traced).

Args:
    x: (T, H) float16/bfloat16/float32.
    w_gate_up: (E, 2·I, H) in x's dtype: transformers' `MixtralExperts.gate_up_proj` (also Qwen2-MoE's and OLMoE's
        experts), rows [0, I) the gate, [I, 2I) the up projection. Any strides: a checkpoint stored transposed
        (E, H, 2I) (transformers' `is_transposed`) is passed as its `.transpose(1, 2)` view.
    w_down: (E, H, I) in x's dtype: `MixtralExperts.down_proj`; any strides.
    topk_weights: (T, k) float32; topk_ids: (T, k) int32 (ids outside [0, E) add nothing);
    sorted_ids, block_expert_ids, num_padded: `moe_route`'s block-aligned layout for `block_m` (the GEMM path only).
    block_m: the block size `moe_route` aligned to; the GEMM's BLOCK_M.
    gemv_max_tokens: T <= it runs the GEMV path, above the GEMM path (`moe_path.choose_moe_path` decides).

Two paths, each two Triton kernels (+ one sum on the GEMM path):
* GEMV (small T): kernel 1, one program per (slot, BLOCK_N of I), streams its expert's gate and up rows once and
  stores h = SiLU(gate)·up for the slot; kernel 2, one program per (token, BLOCK_N of H), loops over the token's k
  slots, streams each one's down rows, multiplies by the routing weight and writes the token's output: the sum over
  k stays in registers, so there is no scatter at all. An expert hit by two slots is read twice (from L2 the second
  time, at best): the reason this path is for small T.
* GEMM (large T): over the blocks of `sorted_ids` (one expert per block): kernel 1 `tl.dot` of the block's gathered
  x rows with the expert's gate and up tiles, SiLU·up epilogue, h stored per slot; kernel 2 `tl.dot` of h with the
  down tile, times the routing weight, stored per slot into an fp32 (T·k, H) buffer; then the sum over k in torch.
  A per-slot buffer rather than atomics: the sum is deterministic and in fp32 (bf16 atomics would round every add
  and their order would vary run to run), and its cost is small beside the weights (Mixtral-8x7B at 512 tokens:
  16 MiB written and read against 704 MiB of the eight experts).
Only experts that received tokens are read: a program finds its expert from the routing, never loops over E.
h is stored in x's dtype (the rounding the eager model has between its linears); everything else accumulates in
fp32 and y is rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import numel, register_cost, sym
from llmcompress.formats.quantized import check_group_size, dequantize_int4, dequantize_int8
from llmcompress.kernels import linear_common as common
from llmcompress.kernels.linear_common import dot_fp32, grouped_pid
from llmcompress.kernels.moe_route import BLOCK_MS, padded_sizes

__all__ = ["KEPT_SLOTS_META", "expected_experts_hit", "moe_experts_reference", "moe_experts_triton", "moe_experts_w4a16_reference",
           "moe_experts_w4a16_triton", "moe_experts_w8a16_reference", "moe_experts_w8a16_triton"]


@triton.jit
def _weight_tile(rows, s_rows, z_rows, rk, mask, stride_wk, QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """An fp32 weight tile at K indices `rk` (broadcast against `rows`): QUANT = 0, stored in x's dtype; 1, packed int4
    (`formats/quantized.py`: k = 2i in the low nibble of byte i, w = (q - zero) * scale per GROUP_SIZE along K);
    2, int8 codes (`formats.quantize_int8_per_channel`), unscaled: w = q * scale of the row, the scale applied to the
    accumulator after the K loop (`_row_scale`; exact codes in the dot, and no scale tile staged beside the weight
    tile: loaded as a (BLOCK_K, BLOCK_N) broadcast it took 45,056 B of shared memory at 16 x 32 x 64 on sm_90, the
    launcher's estimate 26,624 B)."""
    if QUANT == 2:
        return tl.load(rows + rk * stride_wk, mask=mask, other=0).to(tl.float32)
    elif QUANT == 1:
        byte = tl.load(rows + (rk // 2) * stride_wk, mask=mask, other=0).to(tl.int32)
        q = ((byte >> ((rk % 2) * 4)) & 0xF).to(tl.float32)
        # The group's scale and zero: gathered loads repeating GROUP_SIZE times along K, served by L1.
        s = tl.load(s_rows + rk // GROUP_SIZE, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_rows + rk // GROUP_SIZE, mask=mask, other=0.0).to(tl.float32)
        return (q - z) * s
    else:
        return tl.load(rows + rk * stride_wk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_scale(s_ptr, e64, rn, n_mask, stride_se, stride_sn):
    """int8 experts: the per-row scales of expert e64 at output rows rn (1-D), fp32."""
    return tl.load(s_ptr + e64 * stride_se + rn.to(tl.int64) * stride_sn, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit
def _moe_gate_up_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    act_ptr,
    ids_ptr,
    h_ptr,
    I,
    H,
    E,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_ae,
    TOP_K: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    slot = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < I
    e = tl.load(ids_ptr + slot)
    if (e >= 0) & (e < E):
        x_row = x_ptr + (slot // TOP_K).to(tl.int64) * stride_xt
        e64 = e.to(tl.int64)
        rn64 = rn.to(tl.int64)[:, None]
        g_rows = w_ptr + e64 * stride_we + rn64 * stride_wn
        gs_rows = s_ptr + e64 * stride_se + rn64 * stride_sn
        gz_rows = z_ptr + e64 * stride_se + rn64 * stride_sn
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < H
            xv = tl.load(x_row + rk, mask=k_mask, other=0.0).to(tl.float32)
            if HAS_ACT:
                xv = xv * tl.load(act_ptr + e64 * stride_ae + rk, mask=k_mask, other=0.0)
            w_mask = n_mask[:, None] & k_mask[None, :]
            wg = _weight_tile(g_rows, gs_rows, gz_rows, rk[None, :], w_mask, stride_wk, QUANT, GROUP_SIZE)
            wu = _weight_tile(g_rows + I * stride_wn, gs_rows + I * stride_sn, gz_rows + I * stride_sn, rk[None, :],
                              w_mask, stride_wk, QUANT, GROUP_SIZE)
            acc_g += tl.sum(wg * xv[None, :], axis=1)
            acc_u += tl.sum(wu * xv[None, :], axis=1)
        if QUANT == 2:
            acc_g = acc_g * _row_scale(s_ptr, e64, rn, n_mask, stride_se, stride_sn)
            acc_u = acc_u * _row_scale(s_ptr, e64, I + rn, n_mask, stride_se, stride_sn)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + slot.to(tl.int64) * I + rn, h.to(h_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _moe_down_gemv_kernel(
    h_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    act_ptr,
    ids_ptr,
    weights_ptr,
    out_ptr,
    I,
    H,
    E,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_ae,
    stride_ot,
    TOP_K: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < H
    rn64 = rn.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(TOP_K):
        slot = t * TOP_K + j
        e = tl.load(ids_ptr + slot)
        if (e >= 0) & (e < E):
            e64 = e.to(tl.int64)
            w_rows = w_ptr + e64 * stride_we + rn64 * stride_wn
            s_rows = s_ptr + e64 * stride_se + rn64 * stride_sn
            z_rows = z_ptr + e64 * stride_se + rn64 * stride_sn
            h_row = h_ptr + slot.to(tl.int64) * I
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_mask = rk < I
                hv = tl.load(h_row + rk, mask=k_mask, other=0.0).to(tl.float32)
                if HAS_ACT:
                    hv = hv * tl.load(act_ptr + e64 * stride_ae + rk, mask=k_mask, other=0.0)
                wd = _weight_tile(w_rows, s_rows, z_rows, rk[None, :], n_mask[:, None] & k_mask[None, :], stride_wk,
                                  QUANT, GROUP_SIZE)
                part += tl.sum(wd * hv[None, :], axis=1)
            if QUANT == 2:
                part = part * _row_scale(s_ptr, e64, rn, n_mask, stride_se, stride_sn)
            acc += part * tl.load(weights_ptr + slot)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _moe_gate_up_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    act_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_padded_ptr,
    h_ptr,
    num_slots,
    num_blocks,
    I,
    H,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_ae,
    TOP_K: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M blocks share each weight tile while it is in L2 (an expert's blocks are
    # adjacent). Programs past num_padded (the grid is sized for the worst case, no host sync) return at once.
    pid_m, pid_n = grouped_pid(num_blocks * BLOCK_M, I, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M < tl.load(num_padded_ptr):
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = slot < num_slots
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < I
        rn64 = rn.to(tl.int64)[None, :]
        x_rows = x_ptr + (slot // TOP_K).to(tl.int64)[:, None] * stride_xt
        g_cols = w_ptr + e * stride_we + rn64 * stride_wn
        gs_cols = s_ptr + e * stride_se + rn64 * stride_sn
        gz_cols = z_ptr + e * stride_se + rn64 * stride_sn
        dt = x_ptr.dtype.element_ty
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < H
            a = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_ACT:
                # AWQ's 1/s of this expert, in fp32 as the tile is loaded, then x's dtype for the dot (as
                # int4_linear's GEMM): x rows are shared by every expert, so no earlier op can carry it.
                a = (a.to(tl.float32) * tl.load(act_ptr + e * stride_ae + rk, mask=k_mask, other=0.0)[None, :]).to(dt)
            w_mask = k_mask[:, None] & n_mask[None, :]
            bg = _weight_tile(g_cols, gs_cols, gz_cols, rk[:, None], w_mask, stride_wk, QUANT, GROUP_SIZE).to(dt)
            bu = _weight_tile(g_cols + I * stride_wn, gs_cols + I * stride_sn, gz_cols + I * stride_sn, rk[:, None],
                              w_mask, stride_wk, QUANT, GROUP_SIZE).to(dt)
            acc_g = dot_fp32(a, bg, acc_g, UPCAST)
            acc_u = dot_fp32(a, bu, acc_u, UPCAST)
        if QUANT == 2:
            acc_g = acc_g * _row_scale(s_ptr, e, rn, n_mask, stride_se, stride_sn)[None, :]
            acc_u = acc_u * _row_scale(s_ptr, e, I + rn, n_mask, stride_se, stride_sn)[None, :]
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        h_out = h_ptr + slot.to(tl.int64)[:, None] * I + rn[None, :]
        tl.store(h_out, h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_gemm_kernel(
    h_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    act_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_padded_ptr,
    weights_ptr,
    out_ptr,
    num_slots,
    num_blocks,
    I,
    H,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_ae,
    QUANT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(num_blocks * BLOCK_M, H, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M < tl.load(num_padded_ptr):
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = slot < num_slots
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < H
        rn64 = rn.to(tl.int64)[None, :]
        h_rows = h_ptr + slot.to(tl.int64)[:, None] * I
        w_cols = w_ptr + e * stride_we + rn64 * stride_wn
        s_cols = s_ptr + e * stride_se + rn64 * stride_sn
        z_cols = z_ptr + e * stride_se + rn64 * stride_sn
        dt = h_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < I
            a = tl.load(h_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_ACT:
                a = (a.to(tl.float32) * tl.load(act_ptr + e * stride_ae + rk, mask=k_mask, other=0.0)[None, :]).to(dt)
            b = _weight_tile(w_cols, s_cols, z_cols, rk[:, None], k_mask[:, None] & n_mask[None, :], stride_wk,
                             QUANT, GROUP_SIZE).to(dt)
            acc = dot_fp32(a, b, acc, UPCAST)
        if QUANT == 2:
            acc = acc * _row_scale(s_ptr, e, rn, n_mask, stride_se, stride_sn)[None, :]
        acc = acc * tl.load(weights_ptr + slot, mask=m_mask, other=0.0)[:, None]
        out = out_ptr + slot.to(tl.int64)[:, None] * H + rn[None, :]
        tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


# Untuned guesses pending a GPU (none lent when this was written). GEMV: BLOCK_K 128 of 16-bit weights is 256 B per
# row, two full lines; BLOCK_N 32 outputs per program gives 14336 / 32 x 2 = 896 programs at Mixtral's gate-up,
# M = 1 (6.8 per SM of an H100's 132).
_GEMV = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}
# int4: the dequantized tile and its gathered scales and zeros are three tiles in registers; at 32 x 128 the gate-up
# GEMV spilled 1,756-2,116 B per thread (sm_80 / sm_90, benchmarks/gpu_compile.py --families moe-int4).
_GEMV_INT4 = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4}
_GEMV_INTERP = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}
# GEMM tiles: BLOCK_M is the routing's block_m; the tutorial's BLOCK_N / BLOCK_K, fp32 on small tiles (CUDA-core
# FMAs spill the 16-bit tiles, `linear_common.GEMM_CONFIGS_FP32`). (64, 64, 8 warps): at block_m 128 on sm_80 the
# gate-up kernel's other 16-bit tiles spill or exceed its 166,912 B of shared memory.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                          (256, 64, 8, 3)]
]
# (32, 32, 8 warps): the one fp32 tile of the gate-up kernel at block_m 128 that does not spill on sm_80.
_GEMM_CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=3)
    for bn, bk, w in [(32, 32, 4), (32, 32, 8), (64, 32, 4), (64, 32, 8)]
]
# int4 experts (QUANT = 1) with 16-bit x: the dequantized tile and its gathered scales and zeros live in registers
# beside the accumulators, and every tile above spilled somewhere (up to 15 KB per thread at block_m 128 on sm_80,
# benchmarks/gpu_compile.py --families moe-int4): narrower tiles.
_GEMM_CONFIGS_INT4 = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=3)
    for bn, bk, w in [(32, 64, 4), (32, 64, 8), (64, 32, 8), (64, 64, 8)]
]
_GEMM_INTERP = {"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4}

# Tiles (BLOCK_M = block_m, BLOCK_N, BLOCK_K, num_warps) that spill registers, per kernel and
# `linear_common.spill_key`: the largest spill in bytes per thread over the full `moe` set (Mixtral-8x7B and OLMoE
# blocks at T = 1, 16, 512, block_m 16 / 64 / 128; benchmarks/gpu_compile.py --families moe): left out there. The
# gate-up kernel holds two accumulators (gate and up), hence most of them.
_SPILLS = {
    "_moe_gate_up_gemm_kernel": {
        ("sm_80", "16-bit"): {(64, 128, 64, 4), (128, 64, 64, 4), (128, 128, 64, 4), (128, 128, 64, 8)},  # 72-900 B
        ("sm_90", "16-bit"): {(128, 128, 64, 4)},  # 1,280 B
        ("sm_80", "fp32"): {(64, 64, 32, 4), (128, 32, 32, 4), (128, 64, 32, 4), (128, 64, 32, 8)},  # 572-17,656 B
        ("sm_90", "fp32"): {(128, 64, 32, 4)},  # 76 B
    },
    "_moe_down_gemm_kernel": {
        ("sm_80", "16-bit"): {(128, 256, 64, 8)},  # 80 B
        ("sm_90", "fp32"): {(128, 64, 32, 4)},  # 8 B
    },
}


# As `_SPILLS` for int4 experts (benchmarks/gpu_compile.py --families moe-int4, the Mixtral-8x7B block).
_SPILLS_INT4 = {"_moe_gate_up_gemm_kernel": {("sm_80", "16-bit"): {(64, 32, 64, 4), (64, 64, 64, 8)}},  # 4 B, 88 B
                "_moe_down_gemm_kernel": {}}
# As `_SPILLS_INT4` for AWQ's int4 experts (HAS_ACT: the 1/s row gathered beside the x tile), sm_90
# (benchmarks/gpu_compile.py --families moe-int4): the gate-up GEMM's (64, 64, 64, 8 warps) 8 B per thread and
# (64, 32, 64, 4 warps) 32-56 B, the down GEMM's (16, 32, 64, 4 warps) 36 B (bfloat16).
_SPILLS_INT4_AWQ = {"_moe_gate_up_gemm_kernel": {**_SPILLS_INT4["_moe_gate_up_gemm_kernel"],
                                                 ("sm_90", "16-bit"): {(64, 64, 64, 8), (64, 32, 64, 4)}},
                    "_moe_down_gemm_kernel": {("sm_90", "16-bit"): {(16, 32, 64, 4)}}}
# As `_SPILLS` for int8 experts (benchmarks/gpu_compile.py --families moe-int8, the Mixtral-8x7B block).
_SPILLS_INT8 = {"_moe_gate_up_gemm_kernel": {},
                "_moe_down_gemm_kernel": {("sm_80", "16-bit"): {(64, 64, 32, 8)}}}  # 16 B


def _gemm_choice(configs, nargs, capability):
    fp32 = nargs["x_ptr" if "x_ptr" in nargs else "h_ptr"].dtype == torch.float32
    kernel = "_moe_gate_up_gemm_kernel" if "x_ptr" in nargs else "_moe_down_gemm_kernel"
    # int8 experts take int4's narrow tiles: one dequantized tile in registers beside the accumulators, as int4's.
    listed = _GEMM_CONFIGS_FP32 if fp32 else _GEMM_CONFIGS_INT4 if nargs["QUANT"] else _GEMM_CONFIGS
    awq = nargs["QUANT"] == 1 and nargs.get("HAS_ACT", False)
    spills = (_SPILLS_INT4_AWQ if awq else (_SPILLS, _SPILLS_INT4, _SPILLS_INT8)[nargs["QUANT"]])[kernel]
    return [c for c in configs if any(c is x for x in listed)
            and not common.spilling(spills, c, {**nargs, "x_ptr": nargs.get("x_ptr", nargs.get("h_ptr"))},
                                    capability)]


def _shared_bytes(a_name, b_tiles):
    """`Tuned` shared_bytes: float experts stage their weight tiles as loaded; int4 experts stage the packed bytes
    (half of BLOCK_K, one byte each), int8 experts one byte per weight, and both the tile converted to x's dtype
    once more for the dot."""
    def a_bytes(nargs):
        return nargs[a_name].element_size()

    float_tiles = common.tile_shared_bytes(a_bytes, a_bytes, 4, b_tiles=b_tiles)
    int4_tiles = common.tile_shared_bytes(a_bytes, 1, 4, b_tiles=b_tiles, converted_bytes=a_bytes, b_k_fraction=0.5)
    int8_tiles = common.tile_shared_bytes(a_bytes, 1, 4, b_tiles=b_tiles, converted_bytes=a_bytes)
    return lambda config, nargs: (float_tiles, int4_tiles, int8_tiles)[nargs["QUANT"]](config, nargs)


_gate_up_tuned = common.autotuned(
    _moe_gate_up_gemm_kernel, _GEMM_CONFIGS + _GEMM_CONFIGS_FP32 + _GEMM_CONFIGS_INT4,
    key=["BLOCK_M", "I", "H", "TOP_K", "QUANT", "HAS_ACT"],
    shared_bytes=_shared_bytes("x_ptr", 2), choose=_gemm_choice)
_down_tuned = common.autotuned(
    _moe_down_gemm_kernel, _GEMM_CONFIGS + _GEMM_CONFIGS_FP32 + _GEMM_CONFIGS_INT4,
    key=["BLOCK_M", "I", "H", "QUANT", "HAS_ACT"],
    shared_bytes=_shared_bytes("h_ptr", 1), choose=_gemm_choice)


def _check_routing(name, x, num_experts, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
                   gemv_max_tokens) -> None:
    t = x.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.dtype != torch.int32:
        raise ValueError(f"{name}: topk_ids must be int32 (T={t}, k), got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    if topk_weights.dtype != torch.float32 or tuple(topk_weights.shape) != (t, k):
        raise ValueError(f"{name}: topk_weights must be float32 ({t}, {k}), got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    if block_m not in BLOCK_MS:
        raise ValueError(f"{name}: block_m must be one of {BLOCK_MS}, got {block_m!r}")
    max_padded, max_blocks = padded_sizes(t * k, num_experts, block_m)
    for tensor, what, size in ((sorted_ids, "sorted_ids", max_padded), (block_expert_ids, "block_expert_ids",
                                                                         max_blocks), (num_padded, "num_padded", 1)):
        if tensor.dtype != torch.int32 or tuple(tensor.shape) != (size,):
            raise ValueError(f"{name}: {what} must be int32 ({size},) (moe_route's layout for block_m={block_m}), "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")
    if not isinstance(gemv_max_tokens, int) or gemv_max_tokens < 0:
        raise ValueError(f"{name}: gemv_max_tokens must be an int >= 0, got {gemv_max_tokens!r}")


def _check_x(name, x) -> None:
    common.check_dtype(name, "x", x.dtype)
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be (T, H), got {tuple(x.shape)}")


def _check(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
           gemv_max_tokens, name="moe_experts") -> None:
    _check_x(name, x)
    h = x.shape[1]
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2 or w_gate_up.dtype != x.dtype:
        raise ValueError(f"{name}: w_gate_up must be (E, 2 * I, H={h}) in x's dtype {x.dtype} (transformers' "
                         f"gate_up_proj), got {w_gate_up.dtype} {tuple(w_gate_up.shape)}")
    e, i = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (e, h, i) or w_down.dtype != x.dtype:
        raise ValueError(f"{name}: w_down must be (E, H, I) = ({e}, {h}, {i}) in x's dtype {x.dtype} (transformers' "
                         f"down_proj), got {w_down.dtype} {tuple(w_down.shape)}")
    _check_routing(name, x, e, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
                   gemv_max_tokens)
    common.check_devices(name, x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids,
                         num_padded)


def _check_w4(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights, topk_ids, sorted_ids,
              block_expert_ids, num_padded, block_m, gemv_max_tokens, name="moe_experts_w4a16", act_gate_up=None,
              act_down=None) -> None:
    _check_x(name, x)
    # fp32 x is taken (a float32 model quantized by quantize-linear, the quality benchmarks' setting) but untuned on
    # a GPU: the in-register dequantization spilled in every GEMV and GEMM tile tried (424-2,148 B per thread,
    # benchmarks/gpu_compile.py --families moe-int4).
    h = x.shape[1]
    if qgate_up.dim() != 3 or qgate_up.dtype != torch.uint8 or qgate_up.shape[1] % 2 or qgate_up.shape[2] * 2 != h:
        raise ValueError(f"{name}: qgate_up must be uint8 (E, 2 * I, H // 2) with H={h} (`formats.quantized` packed "
                         f"int4 per expert), got {qgate_up.dtype} {tuple(qgate_up.shape)}")
    e, i = qgate_up.shape[0], qgate_up.shape[1] // 2
    if qdown.dtype != torch.uint8 or tuple(qdown.shape) != (e, h, i // 2) or i % 2:
        raise ValueError(f"{name}: qdown must be uint8 (E, H, I // 2) = ({e}, {h}, {i // 2}), got {qdown.dtype} "
                         f"{tuple(qdown.shape)}")
    for k_in in (h, i):
        try:
            check_group_size(k_in, group_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    for t, what, shape in ((sgate_up, "sgate_up", (e, 2 * i, h // group_size)), (zgate_up, "zgate_up",
                           (e, 2 * i, h // group_size)), (sdown, "sdown", (e, h, i // group_size)),
                           (zdown, "zdown", (e, h, i // group_size))):
        if t.dtype != torch.float16 or tuple(t.shape) != shape:
            raise ValueError(f"{name}: {what} must be float16 {shape}, got {t.dtype} {tuple(t.shape)}")
    for t, what in ((qgate_up, "qgate_up"), (qdown, "qdown"), (sgate_up, "sgate_up"), (zgate_up, "zgate_up"),
                    (sdown, "sdown"), (zdown, "zdown")):
        if t.stride(2) != 1:
            raise ValueError(f"{name}: {what} must be contiguous along its last dimension")
    for t, what, shape in ((act_gate_up, "act_gate_up", (e, h)), (act_down, "act_down", (e, i))):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != shape or t.stride(1) != 1):
            raise ValueError(f"{name}: {what} (AWQ's per-expert 1/s) must be float32 {shape} contiguous along its last "
                             f"dimension, or None; got {t.dtype} {tuple(t.shape)}")
    _check_routing(name, x, e, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
                   gemv_max_tokens)
    common.check_devices(name, x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, topk_weights, topk_ids,
                         sorted_ids, block_expert_ids, num_padded, act_gate_up, act_down)


def _check_w8(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
              block_m, gemv_max_tokens, name="moe_experts_w8a16") -> None:
    _check_x(name, x)
    h = x.shape[1]
    if qgate_up.dim() != 3 or qgate_up.dtype != torch.int8 or qgate_up.shape[1] % 2 or qgate_up.shape[2] != h:
        raise ValueError(f"{name}: qgate_up must be int8 (E, 2 * I, H={h}) (`formats.quantize_int8_per_channel` per "
                         f"expert), got {qgate_up.dtype} {tuple(qgate_up.shape)}")
    e, i = qgate_up.shape[0], qgate_up.shape[1] // 2
    if qdown.dtype != torch.int8 or tuple(qdown.shape) != (e, h, i):
        raise ValueError(f"{name}: qdown must be int8 (E, H, I) = ({e}, {h}, {i}), got {qdown.dtype} "
                         f"{tuple(qdown.shape)}")
    for t, what, shape in ((sgate_up, "sgate_up", (e, 2 * i)), (sdown, "sdown", (e, h))):
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise ValueError(f"{name}: {what} must be float32 {shape}, got {t.dtype} {tuple(t.shape)}")
    _check_routing(name, x, e, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
                   gemv_max_tokens)
    common.check_devices(name, x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids,
                         block_expert_ids, num_padded)


def _experts_loop(x, gate_up_of, down_of, num_experts, i, topk_weights, topk_ids, compute_dtype, acts=(None, None)):
    acc = compute_dtype or torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in topk_ids.unique().tolist():  # the host reads the routing: fine on the CPU, the only path it serves
        if not 0 <= e < num_experts:
            continue
        tok, j = torch.where(topk_ids == e)
        a_gu, a_d = (None if a is None else a[e].to(acc) for a in acts)
        xe = x[tok].to(acc)
        gu = (xe if a_gu is None else xe * a_gu) @ gate_up_of(e).to(acc).T
        h = (F.silu(gu[:, :i]) * gu[:, i:]).to(x.dtype).to(acc)
        y = (h if a_d is None else h * a_d) @ down_of(e).to(acc).T
        # index_put_ with accumulate, not index_add_: on torch 2.13's CPU build index_add_ of one (1, 384) row took
        # 22 ms (a scatter_add_ path), index_put_ 5 us.
        out.index_put_((tok,), y * topk_weights[tok, j].to(acc)[:, None], accumulate=True)
    return out if compute_dtype else out.to(x.dtype)


def moe_experts_reference(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids=None, block_expert_ids=None,
                          num_padded=None, block_m=16, gemv_max_tokens=0, compute_dtype=None) -> torch.Tensor:
    """The op's numerics in plain torch (the CPU path and the kernels' oracle): a loop over the experts that
    received tokens, in float32, h rounded to x's dtype between the projections as the kernels store it, y rounded
    once to x's dtype. With `compute_dtype` (float64: the tests' oracle) the sums are in it and y is returned in it
    unrounded. The routing layout arguments are not needed here."""
    return _experts_loop(x, lambda e: w_gate_up[e], lambda e: w_down[e], w_gate_up.shape[0],
                         w_gate_up.shape[1] // 2, topk_weights, topk_ids, compute_dtype)


def moe_experts_w4a16_reference(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights,
                                topk_ids, sorted_ids=None, block_expert_ids=None, num_padded=None, block_m=16,
                                gemv_max_tokens=0, act_gate_up=None, act_down=None,
                                compute_dtype=None) -> torch.Tensor:
    """As `moe_experts_reference` with each hit expert's weights dequantized (`formats.quantized.dequantize_int4`,
    exact in float32); with AWQ's scales, expert e's x rows times act_gate_up[e] and its h rows times act_down[e]
    before the projections (the grouped path's `grouped_linear_w4a16` with act_scale)."""
    def gate_up_of(e):
        return dequantize_int4(qgate_up[e], sgate_up[e], zgate_up[e], group_size)

    def down_of(e):
        return dequantize_int4(qdown[e], sdown[e], zdown[e], group_size)

    return _experts_loop(x, gate_up_of, down_of, qgate_up.shape[0], qgate_up.shape[1] // 2, topk_weights, topk_ids,
                         compute_dtype, (act_gate_up, act_down))


def moe_experts_w8a16_reference(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids=None,
                                block_expert_ids=None, num_padded=None, block_m=16, gemv_max_tokens=0,
                                compute_dtype=None) -> torch.Tensor:
    """As `moe_experts_reference` with each hit expert's weights dequantized (`formats.quantized.dequantize_int8`,
    exact in float32)."""
    return _experts_loop(x, lambda e: dequantize_int8(qgate_up[e], sgate_up[e]),
                         lambda e: dequantize_int8(qdown[e], sdown[e]), qgate_up.shape[0], qgate_up.shape[1] // 2,
                         topk_weights, topk_ids, compute_dtype)


def _stored(w, scales, zeros):
    """A projection's kernel arguments: pointers (w, scales, zeros) and strides (e, n, k of w; e, n of scales);
    float weights pass w for the unused scales and zeros."""
    if scales is None:
        return (w, w, w), (*w.stride(), 0, 0)
    return (w, scales, zeros), (*w.stride(), scales.stride(0), scales.stride(1))


def _act(act, x):
    """An AWQ scale's kernel arguments (pointer, stride over experts, HAS_ACT): x stands in when there is none."""
    return (x, 0, False) if act is None else (act, act.stride(0), True)


def _gemv_path(x, gate_up, down, acts, e, i, topk_weights, topk_ids, quant, group_size):
    t, h = x.shape
    k = topk_ids.shape[1]
    cfg = _GEMV_INTERP if common.INTERPRETED else _GEMV_INT4 if quant else _GEMV
    hbuf = torch.empty((t * k, i), dtype=x.dtype, device=x.device)
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    ids = topk_ids.contiguous()
    gu_ptrs, gu_strides = gate_up
    d_ptrs, d_strides = down
    (a_gu, sa_gu, has_gu), (a_d, sa_d, has_d) = (_act(a, x) for a in acts)
    common.wrap(_moe_gate_up_gemv_kernel)[(t * k, triton.cdiv(i, cfg["BLOCK_N"]))](
        x, *gu_ptrs, a_gu, ids, hbuf, i, h, e, x.stride(0), *gu_strides, sa_gu, TOP_K=k, QUANT=quant,
        GROUP_SIZE=group_size, HAS_ACT=has_gu, **cfg)
    common.wrap(_moe_down_gemv_kernel)[(t, triton.cdiv(h, cfg["BLOCK_N"]))](
        hbuf, *d_ptrs, a_d, ids, topk_weights.contiguous(), out, i, h, e, *d_strides, sa_d, out.stride(0), TOP_K=k,
        QUANT=quant, GROUP_SIZE=group_size, HAS_ACT=has_d, **cfg)
    return out


def _gemm_path(x, gate_up, down, acts, i, topk_weights, sorted_ids, block_expert_ids, num_padded, block_m, k, quant,
               group_size):
    t, h = x.shape
    n_slots = t * k
    n_blocks = block_expert_ids.shape[0]
    hbuf = torch.empty((n_slots, i), dtype=x.dtype, device=x.device)
    # Zeroed: slots whose id is outside [0, E) are in no block and must add nothing.
    slots = torch.zeros((n_slots, h), dtype=torch.float32, device=x.device)
    upcast = common.INTERPRETED
    gu_ptrs, gu_strides = gate_up
    d_ptrs, d_strides = down
    (a_gu, sa_gu, has_gu), (a_d, sa_d, has_d) = (_act(a, x) for a in acts)
    interp = {**_GEMM_INTERP, "BLOCK_M": block_m}
    common.launch(
        _moe_gate_up_gemm_kernel, _gate_up_tuned, lambda meta: (n_blocks * triton.cdiv(i, meta["BLOCK_N"]),),
        (x, *gu_ptrs, a_gu, sorted_ids, block_expert_ids, num_padded, hbuf, n_slots, n_blocks, i, h, x.stride(0),
         *gu_strides, sa_gu),
        interp, TOP_K=k, QUANT=quant, GROUP_SIZE=group_size, HAS_ACT=has_gu, UPCAST=upcast, BLOCK_M=block_m)
    common.launch(
        _moe_down_gemm_kernel, _down_tuned, lambda meta: (n_blocks * triton.cdiv(h, meta["BLOCK_N"]),),
        (hbuf, *d_ptrs, a_d, sorted_ids, block_expert_ids, num_padded, topk_weights.contiguous(), slots, n_slots,
         n_blocks, i, h, *d_strides, sa_d),
        interp, QUANT=quant, GROUP_SIZE=group_size, HAS_ACT=has_d, UPCAST=upcast, BLOCK_M=block_m)
    return slots.view(t, k, h).sum(1).to(x.dtype)


def _run(x, gate_up, down, e, i, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
         gemv_max_tokens, quant, group_size, acts=(None, None)):
    t = x.shape[0]
    if t == 0:
        return x.new_empty(x.shape)
    if t <= gemv_max_tokens:
        return _gemv_path(x, gate_up, down, acts, e, i, topk_weights, topk_ids, quant, group_size)
    return _gemm_path(x, gate_up, down, acts, i, topk_weights, sorted_ids, block_expert_ids, num_padded, block_m,
                      topk_ids.shape[1], quant, group_size)


def moe_experts_triton(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
                       block_m=16, gemv_max_tokens=0) -> torch.Tensor:
    """The op on a Triton device (CPU only under TRITON_INTERPRET=1): the GEMV path for T <= gemv_max_tokens, the
    GEMM path above (args: module docstring). Returns (T, H) in x's dtype."""
    _check(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
           gemv_max_tokens, "moe_experts_triton")
    common.check_launchable("moe_experts_triton", x, "moe_experts_reference")
    x = x if x.stride(1) == 1 else x.contiguous()
    return _run(x, _stored(w_gate_up, None, None), _stored(w_down, None, None), w_gate_up.shape[0],
                w_gate_up.shape[1] // 2, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
                gemv_max_tokens, 0, 1)


def moe_experts_w4a16_triton(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights,
                             topk_ids, sorted_ids, block_expert_ids, num_padded, block_m=16, gemv_max_tokens=0,
                             act_gate_up=None, act_down=None) -> torch.Tensor:
    """As `moe_experts_triton` with int4 experts (args: module docstring, `moe_experts_w4a16`)."""
    _check_w4(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights, topk_ids, sorted_ids,
              block_expert_ids, num_padded, block_m, gemv_max_tokens, "moe_experts_w4a16_triton", act_gate_up,
              act_down)
    common.check_launchable("moe_experts_w4a16_triton", x, "moe_experts_w4a16_reference")
    x = x if x.stride(1) == 1 else x.contiguous()
    return _run(x, _stored(qgate_up, sgate_up, zgate_up), _stored(qdown, sdown, zdown), qgate_up.shape[0],
                qgate_up.shape[1] // 2, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
                gemv_max_tokens, 1, group_size, (act_gate_up, act_down))


def moe_experts_w8a16_triton(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids, block_expert_ids,
                             num_padded, block_m=16, gemv_max_tokens=0) -> torch.Tensor:
    """As `moe_experts_triton` with int8 experts (args: module docstring, `moe_experts_w8a16`)."""
    _check_w8(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
              block_m, gemv_max_tokens, "moe_experts_w8a16_triton")
    common.check_launchable("moe_experts_w8a16_triton", x, "moe_experts_w8a16_reference")
    x = x if x.stride(1) == 1 else x.contiguous()
    return _run(x, _stored(qgate_up, sgate_up, sgate_up), _stored(qdown, sdown, sdown), qgate_up.shape[0],
                qgate_up.shape[1] // 2, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
                gemv_max_tokens, 2, 1)


@torch.library.custom_op("llmcompress::moe_experts_cpu", mutates_args=())
def _moe_experts_cpu_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """moe_experts' CPU path, opaque to tracing (its loop's shapes depend on the routing)."""
    return moe_experts_reference(x, w_gate_up, w_down, topk_weights, topk_ids)


@_moe_experts_cpu_op.register_fake
def _(x, w_gate_up, w_down, topk_weights, topk_ids):
    return x.new_empty(x.shape)


@triton_op("llmcompress::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, sorted_ids: torch.Tensor, block_expert_ids: torch.Tensor,
                    num_padded: torch.Tensor, block_m: int = 16, gemv_max_tokens: int = 0) -> torch.Tensor:
    # The body is also the fake impl and is inlined under torch.compile (see rms_norm.py).
    if x.device.type != "cuda":
        _check(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
               gemv_max_tokens)
        return torch.ops.llmcompress.moe_experts_cpu(x, w_gate_up, w_down, topk_weights, topk_ids)
    return moe_experts_triton(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
                              block_m, gemv_max_tokens)


@_moe_experts_op.register_kernel("cpu")
def _moe_experts_cpu(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
                     block_m=16, gemv_max_tokens=0):
    _check(x, w_gate_up, w_down, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded, block_m,
           gemv_max_tokens)
    return moe_experts_reference(x, w_gate_up, w_down, topk_weights, topk_ids)


def expected_experts_hit(num_experts, top_k, tokens):
    """E·(1 − (1 − k/E)^T): the distinct experts T tokens hit in expectation when each picks k of E uniformly (each
    expert is missed by one token with probability 1 − k/E). tokens may be a sympy expression (a symbolic T)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


@torch.library.custom_op("llmcompress::moe_experts_w4a16_cpu", mutates_args=())
def _moe_experts_w4a16_cpu_op(x: torch.Tensor, qgate_up: torch.Tensor, sgate_up: torch.Tensor, zgate_up: torch.Tensor,
                              qdown: torch.Tensor, sdown: torch.Tensor, zdown: torch.Tensor, group_size: int,
                              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              act_gate_up: torch.Tensor | None = None,
                              act_down: torch.Tensor | None = None) -> torch.Tensor:
    """moe_experts_w4a16's CPU path, opaque to tracing."""
    return moe_experts_w4a16_reference(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights,
                                       topk_ids, act_gate_up=act_gate_up, act_down=act_down)


@_moe_experts_w4a16_cpu_op.register_fake
def _(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights, topk_ids, act_gate_up=None,
      act_down=None):
    return x.new_empty(x.shape)


@triton_op("llmcompress::moe_experts_w4a16", mutates_args=())
def _moe_experts_w4a16_op(x: torch.Tensor, qgate_up: torch.Tensor, sgate_up: torch.Tensor, zgate_up: torch.Tensor,
                          qdown: torch.Tensor, sdown: torch.Tensor, zdown: torch.Tensor, group_size: int,
                          topk_weights: torch.Tensor, topk_ids: torch.Tensor, sorted_ids: torch.Tensor,
                          block_expert_ids: torch.Tensor, num_padded: torch.Tensor, block_m: int = 16,
                          gemv_max_tokens: int = 0, act_gate_up: torch.Tensor | None = None,
                          act_down: torch.Tensor | None = None) -> torch.Tensor:
    args = (x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights, topk_ids, sorted_ids,
            block_expert_ids, num_padded, block_m, gemv_max_tokens)
    if x.device.type != "cuda":
        _check_w4(*args, act_gate_up=act_gate_up, act_down=act_down)
        return torch.ops.llmcompress.moe_experts_w4a16_cpu(*args[:10], act_gate_up, act_down)
    return moe_experts_w4a16_triton(*args, act_gate_up, act_down)


@_moe_experts_w4a16_op.register_kernel("cpu")
def _moe_experts_w4a16_cpu(x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights, topk_ids,
                           sorted_ids, block_expert_ids, num_padded, block_m=16, gemv_max_tokens=0, act_gate_up=None,
                           act_down=None):
    args = (x, qgate_up, sgate_up, zgate_up, qdown, sdown, zdown, group_size, topk_weights, topk_ids)
    _check_w4(*args, sorted_ids, block_expert_ids, num_padded, block_m, gemv_max_tokens, act_gate_up=act_gate_up,
              act_down=act_down)
    return moe_experts_w4a16_reference(*args, act_gate_up=act_gate_up, act_down=act_down)


@torch.library.custom_op("llmcompress::moe_experts_w8a16_cpu", mutates_args=())
def _moe_experts_w8a16_cpu_op(x: torch.Tensor, qgate_up: torch.Tensor, sgate_up: torch.Tensor, qdown: torch.Tensor,
                              sdown: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """moe_experts_w8a16's CPU path, opaque to tracing."""
    return moe_experts_w8a16_reference(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids)


@_moe_experts_w8a16_cpu_op.register_fake
def _(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids):
    return x.new_empty(x.shape)


@triton_op("llmcompress::moe_experts_w8a16", mutates_args=())
def _moe_experts_w8a16_op(x: torch.Tensor, qgate_up: torch.Tensor, sgate_up: torch.Tensor, qdown: torch.Tensor,
                          sdown: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          sorted_ids: torch.Tensor, block_expert_ids: torch.Tensor, num_padded: torch.Tensor,
                          block_m: int = 16, gemv_max_tokens: int = 0) -> torch.Tensor:
    args = (x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
            block_m, gemv_max_tokens)
    if x.device.type != "cuda":
        _check_w8(*args)
        return torch.ops.llmcompress.moe_experts_w8a16_cpu(*args[:7])
    return moe_experts_w8a16_triton(*args)


@_moe_experts_w8a16_op.register_kernel("cpu")
def _moe_experts_w8a16_cpu(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids, block_expert_ids,
                           num_padded, block_m=16, gemv_max_tokens=0):
    _check_w8(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
              block_m, gemv_max_tokens)
    return moe_experts_w8a16_reference(x, qgate_up, sgate_up, qdown, sdown, topk_weights, topk_ids)


KEPT_SLOTS_META = "llmcompress.moe_kept_slots"
"""Meta key of a fused experts node under dynamic skipping: the slots per token expected to be evaluated, k × (1 −
the calibrated skipped fraction), which its cost prices; absent: all k (`fuse-moe` sets it)."""


def _experts_cost(node, weight_indices, ids_index):
    """(flops, bytes) of the experts for T tokens: 6·T·k·H·I FLOPs (gate, up and down per slot); bytes: the stored
    weights (and scales, zeros) of only the experts expected to be hit under uniform routing
    (`expected_experts_hit`), x and y, and h written and read (T·k·I elements). Under dynamic skipping k is the
    expected kept slots per token (`KEPT_SLOTS_META`): skipped slots read no expert. The GEMM path's fp32 per-slot
    buffer and padded rows are left out: the op's price is the path the chooser took (`moe_path`)."""
    x, ids = node.args[0].meta["val"], node.args[ids_index].meta["val"]
    # AWQ's per-expert scales (moe_experts_w4a16's last two arguments, when given) are read with their expert.
    weights = [node.args[i].meta["val"] for i in weight_indices if i < len(node.args) and node.args[i] is not None]
    t, h = sym(x.shape[0]), sym(x.shape[1])
    e, k = int(weights[0].shape[0]), int(ids.shape[1])
    i = sym(weights[0].shape[1]) / 2
    per_expert = sum(numel(w) * w.element_size() for w in weights) / e
    kept = node.meta.get(KEPT_SLOTS_META, k)
    hit = expected_experts_hit(e, kept, t)
    es = x.element_size()
    return 6 * t * kept * h * i, hit * per_expert + 2 * t * h * es + 2 * t * kept * i * es + t * k * 8


for _op in (torch.ops.llmcompress.moe_experts.default, torch.ops.llmcompress.moe_experts_cpu.default):
    register_cost(_op)(lambda node: _experts_cost(node, (1, 2), 4))
register_cost(torch.ops.llmcompress.moe_experts_w4a16.default)(
    lambda node: _experts_cost(node, (1, 2, 3, 4, 5, 6, 15, 16), 9))
register_cost(torch.ops.llmcompress.moe_experts_w4a16_cpu.default)(
    lambda node: _experts_cost(node, (1, 2, 3, 4, 5, 6, 10, 11), 9))
for _op in (torch.ops.llmcompress.moe_experts_w8a16.default, torch.ops.llmcompress.moe_experts_w8a16_cpu.default):
    register_cost(_op)(lambda node: _experts_cost(node, (1, 2, 3, 4), 6))
