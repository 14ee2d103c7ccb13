"""quantize-linear on fused MoE experts: a `llmcompress::moe_experts` node (what `fuse-moe` made of a block) becomes
`llmcompress::moe_experts_w4a16` / `moe_experts_w8a16` on the same stored formats as the grouped matmuls' experts.

The order of the two passes is fixed once, by `fuse-moe` (it runs before `quantize-linear`, which it must: the
sibling fusion, before `quantize-linear`, would merge a router with the linears beside it). So `quantize-linear`
recognises the fused op, as it recognises the grouped matmuls, and is the one place that decides an expert's scheme
and method. Calibration gives each expert the same rows the grouped path does (the tokens routed to it, its down
projection the SiLU·up of the already-quantized gate-up, as the grouped ops compute it), so GPTQ's and AWQ's experts
are the grouped path's, bit for bit up to the statistics' row order. AWQ's per-expert 1/s (act_scale, (E, H) for
gate-up, (E, I) for down) rides along as the fused op's last two arguments, applied in-kernel as the grouped op does.

Entry points used by `quantize_linear.py`: `is_fused_experts`, `calibrate`, `replacement`, `apply`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from llmcompress.kernels import grouped_linear  # noqa: F401  (registers the grouped quantized ops)
from llmcompress.kernels import moe_experts as _moe_experts  # noqa: F401  (registers the fused experts ops)

ops = torch.ops.llmcompress
SCHEMES = ("w4a16", "w8a16")
# moe_experts' arguments after the two weights: topk_weights, topk_ids, sorted_ids, block_expert_ids, num_padded,
# block_m, gemv_max_tokens.
_ROUTING = slice(3, 8)


def is_fused_experts(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is ops.moe_experts.default


def weight_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The fused node's two stored weights: gate_up (E, 2I, H), down (E, H, I)."""
    return [node.args[1], node.args[2]]


def block_m_of(node: torch.fx.Node) -> int:
    return node.args[8] if len(node.args) > 8 else node.kwargs.get("block_m", 16)


def expert_sorted(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, offs): x's row of every slot (T·k, H), grouped by expert in slot order, and each expert's cumulative
    row end (E,) int64 — the grouped matmuls' layout, which `quantize_linear._calibrated_experts` reads."""
    flat = topk_ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < num_experts)
    slots = torch.nonzero(keep).flatten()
    order = slots[torch.sort(flat[slots], stable=True).indices]
    counts = torch.bincount(flat[slots], minlength=num_experts)
    return x.reshape(-1, x.shape[-1])[order // topk_ids.shape[1]], counts.cumsum(0)


def _hidden(rows: torch.Tensor, offs: torch.Tensor, gate_up: Sequence[torch.Tensor], scheme: str,
            group_size: int) -> torch.Tensor:
    """SiLU(gate)·up of the expert-sorted rows through the quantized gate-up, in x's dtype, as the grouped path
    (a grouped quantized matmul, then transformers' SiLU and product) computes it."""
    if scheme == "w4a16":
        gu = ops.grouped_linear_w4a16(rows, *gate_up[:3], group_size, offs, gate_up[3] if len(gate_up) > 3 else None)
    else:
        gu = ops.grouped_linear_w8a16(rows, *gate_up[:2], offs)
    i = gu.shape[1] // 2
    return F.silu(gu[:, :i]) * gu[:, i:]


def calibrate(gate_up: torch.Tensor, down: torch.Tensor, calls: list[tuple[tuple, dict]], scheme: str,
              group_size: int, quantize_3d: Callable[[torch.Tensor, list[torch.Tensor], list[torch.Tensor]], tuple]
              ) -> tuple[torch.Tensor, ...]:
    """The fused experts' quantized tensors (gate-up's, then down's) from the node's evaluated calls per chunk.

    quantize_3d(weight (E, N, K), rows per chunk, offs per chunk) quantizes each expert on its rows (the grouped
    path's `_calibrated_experts`). gate_up: (E, 2I, H); down: (E, H, I); both in y = x @ W.T orientation."""
    e = gate_up.shape[0]
    sorted_calls = [expert_sorted(args[0], args[4], e) for args, _ in calls]
    xs, offs = [r for r, _ in sorted_calls], [o for _, o in sorted_calls]
    gu = quantize_3d(gate_up, xs, offs)
    hs = [_hidden(r, o, gu, scheme, group_size) for r, o in zip(xs, offs)]
    return (*gu, *quantize_3d(down, hs, offs))


def split(tensors: Sequence[Any], scheme: str) -> tuple[tuple, tuple]:
    """(gate-up's, down's) of `calibrate`'s / round to nearest's tensors: 3 each for w4a16 (4 with AWQ's act_scale),
    2 for w8a16."""
    n = len(tensors) // 2
    if n not in ((3, 4) if scheme == "w4a16" else (2,)):
        raise AssertionError(f"fused experts {scheme}: {len(tensors)} quantized tensors")
    return tuple(tensors[:n]), tuple(tensors[n:])


def _w4a16_args(gu: Sequence[Any], dn: Sequence[Any]) -> tuple[tuple, tuple]:
    """(stored tensors, AWQ scales) of moe_experts_w4a16: (q, s, z) of gate-up then down; (act_gate_up, act_down),
    or () for round to nearest and GPTQ."""
    acts = (gu[3], dn[3]) if len(gu) > 3 else ()
    return (*gu[:3], *dn[:3]), acts


def replacement(node: torch.fx.Node, consts: Sequence[Any], scheme: str, group_size: int, gemv_max_tokens: int
                ) -> tuple[Any, tuple]:
    """(op, args) of the quantized fused experts replacing `node`, on the stored tensors (or their nodes)
    `consts` = gate-up's then down's; the routing arguments and block_m are the node's (moe_route was built for
    that block_m), the GEMV/GEMM switch the quantized format's."""
    x, routing, block_m = node.args[0], tuple(node.args[_ROUTING]), block_m_of(node)
    if scheme == "w4a16":
        stored, acts = _w4a16_args(*split(consts, scheme))
        return ops.moe_experts_w4a16.default, (x, *stored, group_size, *routing, block_m, gemv_max_tokens, *acts)
    return ops.moe_experts_w8a16.default, (x, *consts, *routing, block_m, gemv_max_tokens)


def apply(tensors: Sequence[torch.Tensor], scheme: str, group_size: int, args: tuple) -> torch.Tensor:
    """The quantized fused experts' output during calibration, from the float node's evaluated arguments (the
    op the graph will call; on the CPU, its reference)."""
    routing = tuple(args[_ROUTING])
    block_m = args[8] if len(args) > 8 else 16
    if scheme == "w4a16":
        stored, acts = _w4a16_args(*split(tensors, scheme))
        return ops.moe_experts_w4a16(args[0], *stored, group_size, *routing, block_m, 0, *acts)
    return ops.moe_experts_w8a16(args[0], *tensors, *routing, block_m, 0)


__all__ = ["SCHEMES", "apply", "block_m_of", "calibrate", "expert_sorted", "is_fused_experts", "replacement", "split",
           "weight_nodes"]
