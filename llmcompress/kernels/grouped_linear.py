"""Quantized MoE expert matmuls: the grouped form of `linear_w4a16` / `linear_w8a16`, one matrix per expert.

Entry points: `torch.ops.llmcompress.grouped_linear_w4a16(x, qweight, scales, zeros, group_size, offs)` and
`grouped_linear_w8a16(x, qweight, scale, offs)`, drop-in replacements for transformers' grouped matmuls
(`torch._grouped_mm` / `transformers::grouped_mm_fallback`) on tokens sorted by expert: rows
`offs[e - 1]:offs[e]` of x go through expert e; rows past `offs[-1]` are zero. Each expert runs the single-matrix
op, so it gets that op's GEMV / GEMM kernels (a launch per expert with tokens). References: `*_reference`.

These are `torch.library.custom_op`s, not `triton_op`s: the expert loop reads `offs` on the host, which must stay
opaque to tracing (as in transformers' fallback).
"""

from __future__ import annotations

from typing import Optional

import torch

from llmcompress.cost.roofline import io_bytes, numel, register_cost, sym
from llmcompress.formats import quantized as formats
from llmcompress.kernels import int4_linear, int8_linear  # noqa: F401  (registers the single-matrix ops)


def _check(x: torch.Tensor, qweight: torch.Tensor, offs: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"grouped linear: x must be (tokens, K), got {tuple(x.shape)}")
    if qweight.dim() != 3:
        raise ValueError(f"grouped linear: qweight must be (experts, N, ...), got {tuple(qweight.shape)}")
    if offs.dim() != 1 or offs.shape[0] != qweight.shape[0] or offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped linear: offs must be int32/int64 of shape ({qweight.shape[0]},), got "
                         f"{offs.dtype} {tuple(offs.shape)}")


def _check_act_scale(qweight: torch.Tensor, k: int, act_scale: Optional[torch.Tensor]) -> None:
    if act_scale is not None and (act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (qweight.shape[0], k)):
        raise ValueError(f"grouped linear: act_scale must be float32 ({qweight.shape[0]}, {k}), got "
                         f"{act_scale.dtype} {tuple(act_scale.shape)}")


def _by_expert(x: torch.Tensor, n: int, offs: torch.Tensor, fn) -> torch.Tensor:
    out = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync per call
        if end > start:
            out[start:end] = fn(e, x[start:end])
        start = end
    return out


@torch.library.custom_op("llmcompress::grouped_linear_w4a16", mutates_args=())
def grouped_linear_w4a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         group_size: int, offs: torch.Tensor, act_scale: Optional[torch.Tensor] = None
                         ) -> torch.Tensor:
    """x: (T, K) sorted by expert; qweight (E, N, K // 2); scales, zeros (E, N, K // group_size); offs (E,);
    act_scale: optional float32 (E, K), each expert's AWQ 1/s."""
    _check(x, qweight, offs)
    _check_act_scale(qweight, x.shape[1], act_scale)
    op = torch.ops.llmcompress.linear_w4a16
    return _by_expert(x, qweight.shape[1], offs, lambda e, xe: op(
        xe, qweight[e], scales[e], zeros[e], group_size, None, None if act_scale is None else act_scale[e]))


@grouped_linear_w4a16.register_fake
def _(x, qweight, scales, zeros, group_size, offs, act_scale=None):
    return x.new_empty(x.shape[0], qweight.shape[1])


def grouped_linear_w4a16_reference(x, qweight, scales, zeros, group_size, offs, act_scale=None) -> torch.Tensor:
    """Plain torch: each expert's dequantized weight (float32) times its rows (times act_scale[e]), rounded once
    to x.dtype."""
    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        h = xe.float() if act_scale is None else xe.float() * act_scale[e].float()
        return (h @ formats.dequantize_int4(qweight[e], scales[e], zeros[e], group_size).T).to(x.dtype)
    return _by_expert(x, qweight.shape[1], offs, expert)


@torch.library.custom_op("llmcompress::grouped_linear_w8a16", mutates_args=())
def grouped_linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor
                         ) -> torch.Tensor:
    """x: (T, K) sorted by expert; qweight int8 (E, N, K); scale float32 (E, N); offs (E,)."""
    _check(x, qweight, offs)
    op = torch.ops.llmcompress.linear_w8a16
    return _by_expert(x, qweight.shape[1], offs, lambda e, xe: op(xe, qweight[e], scale[e], None, None))


@grouped_linear_w8a16.register_fake
def _(x, qweight, scale, offs):
    return x.new_empty(x.shape[0], qweight.shape[1])


def grouped_linear_w8a16_reference(x, qweight, scale, offs) -> torch.Tensor:
    return _by_expert(x, qweight.shape[1], offs, lambda e, xe: (xe.float() @ formats.dequantize_int8(
        qweight[e], scale[e]).T).to(x.dtype))


def _grouped_cost(node):
    """2·T·N·K FLOPs; bytes: every expert's packed weight (an upper bound: at decode only the routed experts are
    read), the activations and the output."""
    x, w = node.args[0].meta["val"], node.args[1].meta["val"]
    return 2 * numel(x) * sym(w.shape[1]), io_bytes(node)


register_cost(torch.ops.llmcompress.grouped_linear_w4a16.default)(_grouped_cost)
register_cost(torch.ops.llmcompress.grouped_linear_w8a16.default)(_grouped_cost)
