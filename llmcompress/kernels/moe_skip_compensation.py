"""Compensation for dynamically skipped expert slots: a skipped slot adds its routing weight × its expert's
calibrated mean output instead of nothing.

Entry point: `torch.ops.llmcompress.moe_skip_compensate(out, topk_weights, topk_ids, means, skip_beta)` ->
out + Σ_j [w_j < skip_beta × max_j w] · w_j · means[id_j], accumulated in float32, rounded once to out's dtype.
CUDA runs `moe_skip_compensate_triton` (one launch, no host sync: it captures in CUDA graphs); the CPU runs
`moe_skip_compensate_reference`, the kernel's oracle. `fuse-moe` puts it after the block's experts output: a fused
block's reads `moe_route`'s own outputs (the routing is computed once), an unfused block's the block's own routing,
so the fused and the unfused block compute the same model; the skip rule is `moe_route`'s (`skip.skip_slots`).

Args:
    out: (T, H) float16/bfloat16/float32, the experts' output with the skipped slots left out.
    topk_weights: (T, k) float routing weights, the skipped slots' included (rank order or not; compared in
        float32).
    topk_ids: (T, k) integer expert ids in [0, E), or in [E, 2E) for a slot `moe_route` skipped (E + its expert's
        id): the same expert.
    means: (E, H) float32, the expert's mean output on the calibration tokens it would be skipped on (an expert
        never skipped there has a zero row).
    skip_beta: in (0, 1), the skip rule's β.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from llmcompress.cost.roofline import io_bytes, numel, register_cost
from llmcompress.kernels import linear_common as common

__all__ = ["moe_skip_compensate_reference", "moe_skip_compensate_triton", "skipped_weights"]


@triton.jit
def _compensate_kernel(
    out_ptr,
    w_ptr,
    ids_ptr,
    means_ptr,
    res_ptr,
    T,
    H,
    E,
    stride_ot,
    stride_rt,
    skip_beta,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = rt < T
    h_mask = rh < H
    top = tl.full((BLOCK_T,), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        top = tl.maximum(top, tl.load(w_ptr + rt * TOP_K + j, mask=t_mask, other=0.0))
    acc = tl.load(out_ptr + rt[:, None] * stride_ot + rh[None, :], mask=t_mask[:, None] & h_mask[None, :],
                  other=0.0).to(tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(w_ptr + rt * TOP_K + j, mask=t_mask, other=0.0)
        e = tl.load(ids_ptr + rt * TOP_K + j, mask=t_mask, other=0).to(tl.int64)
        e = tl.where(e >= E, e - E, e)  # moe_route's skipped slot: E + its expert's id
        skip = t_mask & (w < skip_beta * top) & (e >= 0) & (e < E)
        mu = tl.load(means_ptr + e[:, None] * H + rh[None, :], mask=skip[:, None] & h_mask[None, :], other=0.0)
        acc += tl.where(skip, w, 0.0)[:, None] * mu
    tl.store(res_ptr + rt[:, None] * stride_rt + rh[None, :], acc.to(res_ptr.dtype.element_ty),
             mask=t_mask[:, None] & h_mask[None, :])


# 16 tokens × 128 hidden per program: decode's T (1-16) is one row of programs across H, and a (16, 128) float32
# tile keeps the k gathered mean rows in registers.
_BLOCK_T, _BLOCK_H = 16, 128


def skipped_weights(topk_weights: torch.Tensor, skip_beta: float) -> torch.Tensor:
    """(T, k) float32: the weight of each slot the rule skips (w < β × the token's top weight), 0 elsewhere."""
    w = topk_weights.float()
    return w.masked_fill(~(w < skip_beta * w.amax(dim=-1, keepdim=True)), 0.0)


def moe_skip_compensate_reference(out: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                                  means: torch.Tensor, skip_beta: float) -> torch.Tensor:
    """out + the skipped slots' weight × their expert's mean row, in float32, rounded once to out's dtype."""
    ws = skipped_weights(topk_weights, skip_beta)
    e = means.shape[0]
    topk_ids = torch.where(topk_ids >= e, topk_ids - e, topk_ids)  # moe_route's skipped slot: E + its expert's id
    dense = torch.zeros(ws.shape[0], e, dtype=torch.float32, device=ws.device)  # (T, E) skipped mass per expert
    dense.scatter_add_(1, topk_ids.long().clamp(0, e - 1), ws.masked_fill((topk_ids < 0) | (topk_ids >= e), 0.0))
    return (out.float() + dense @ means.float()).to(out.dtype)


def _check(out, topk_weights, topk_ids, means, skip_beta) -> None:
    name = "moe_skip_compensate"
    if out.dim() != 2 or out.dtype not in common.SUPPORTED_DTYPES:
        raise ValueError(f"{name}: out must be (T, H) {common.SUPPORTED_DTYPES_TEXT}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if (topk_weights.dtype not in common.SUPPORTED_DTYPES or topk_weights.dim() != 2
            or topk_weights.shape[0] != out.shape[0]):
        raise ValueError(f"{name}: topk_weights must be {common.SUPPORTED_DTYPES_TEXT} (T={out.shape[0]}, k), got "
                         f"{topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: topk_ids must be int32 or int64 {tuple(topk_weights.shape)}, got "
                         f"{topk_ids.dtype} {tuple(topk_ids.shape)}")
    if means.dtype != torch.float32 or means.dim() != 2 or means.shape[1] != out.shape[1]:
        raise ValueError(f"{name}: means must be float32 (E, H={out.shape[1]}), got {means.dtype} "
                         f"{tuple(means.shape)}")
    if not isinstance(skip_beta, (int, float)) or not 0.0 < skip_beta < 1.0:
        raise ValueError(f"{name}: skip_beta must be in (0, 1) (β 0 skips nothing: leave the op out), got "
                         f"{skip_beta!r}")


def moe_skip_compensate_triton(out: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                               means: torch.Tensor, skip_beta: float) -> torch.Tensor:
    """As `moe_skip_compensate_reference`, on a Triton device (CPU only under TRITON_INTERPRET=1): one launch."""
    _check(out, topk_weights, topk_ids, means, skip_beta)
    common.check_launchable("moe_skip_compensate_triton", out, "moe_skip_compensate_reference")
    t, h = out.shape
    res = torch.empty((t, h), dtype=out.dtype, device=out.device)
    if t and h:
        out = out if out.stride(1) == 1 else out.contiguous()
        common.wrap(_compensate_kernel)[(triton.cdiv(t, _BLOCK_T), triton.cdiv(h, _BLOCK_H))](
            out, topk_weights.float().contiguous(), topk_ids.contiguous(), means.contiguous(), res, t, h, means.shape[0],
            out.stride(0), res.stride(0), float(skip_beta), TOP_K=topk_weights.shape[1], BLOCK_T=_BLOCK_T,
            BLOCK_H=_BLOCK_H, num_warps=4)
    return res


@torch.library.custom_op("llmcompress::moe_skip_compensate_cpu", mutates_args=())
def _moe_skip_compensate_cpu_op(out: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                                means: torch.Tensor, skip_beta: float) -> torch.Tensor:
    return moe_skip_compensate_reference(out, topk_weights, topk_ids, means, skip_beta)


@_moe_skip_compensate_cpu_op.register_fake
def _(out, topk_weights, topk_ids, means, skip_beta):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


@triton_op("llmcompress::moe_skip_compensate", mutates_args=())
def _moe_skip_compensate_op(out: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            means: torch.Tensor, skip_beta: float) -> torch.Tensor:
    # As moe_route's: the body is also the fake impl under torch.compile, so CPU and meta go to the opaque CPU op.
    if out.device.type != "cuda":
        _check(out, topk_weights, topk_ids, means, skip_beta)
        return torch.ops.llmcompress.moe_skip_compensate_cpu(out, topk_weights, topk_ids, means, skip_beta)
    return moe_skip_compensate_triton(out, topk_weights, topk_ids, means, skip_beta)


@_moe_skip_compensate_op.register_kernel("cpu")
def _moe_skip_compensate_cpu(out, topk_weights, topk_ids, means, skip_beta):
    _check(out, topk_weights, topk_ids, means, skip_beta)
    return _moe_skip_compensate_cpu_op(out, topk_weights, topk_ids, means, skip_beta)


@register_cost(torch.ops.llmcompress.moe_skip_compensate_cpu.default)
@register_cost(torch.ops.llmcompress.moe_skip_compensate.default)
def _moe_skip_compensate_cost(node):
    """(flops, bytes): one multiply-add per (slot, hidden unit); out read and written, the routing and the (E, H)
    means read (at most E rows, all of them at prefill)."""
    t_k = numel(node.args[1].meta["val"])
    h = node.args[0].meta["val"].shape[-1]
    return 2 * t_k * h, io_bytes(node)
