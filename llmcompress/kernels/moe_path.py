"""Which path `llmcompress::moe_experts` takes at each token count T: the GEMV per (token, expert) slot or the grouped
GEMM over block-aligned tokens, and the GEMM's block size.

`choose_moe_path(cost_model, hidden, intermediate, num_experts, top_k, dtype, device)` prices both with the cost
model (`CostModel.kernel_time`) at every T of `kernel_path.M_GRID` from the routed counts' expected values under
uniform routing, and returns the op's `gemv_max_tokens` and `moe_route`'s / the op's `block_m` (`MoePath`); it is the
one place that decides them. What each path does is said here once; what that costs is the cost model's answer:

* `gemv` (CUDA): each of the T·k slots streams its expert's 3·H·I weights once (`expert_bytes`: float, int8 or int4) (an expert hit by several slots is
  counted as read again: the L2 may save it, the price does not assume so), FLOPs on CUDA cores (no `tl.dot`);
  two launches.
* `gemm` (CUDA): the `expected_experts_hit` experts are read, once per GROUP_M (8) blocks of their rows; the
  FLOPs of the padded rows (each hit expert's T·k / hit rows rounded up to `block_m`) on tensor cores; h and the
  fp32 per-slot buffer written and read; three launches (two kernels and the sum over k). One `block_m` of
  `moe_route.BLOCK_MS` for all T (`MoePath.block_m`).
* `reference` (CPU): the op's CPU path, a loop over the hit experts; the only path there, priced for the report.

Ties go to the GEMV (fewer launches).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from llmcompress.kernels.kernel_path import M_GRID, REPORTED_M
from llmcompress.kernels.linear_common import SUPPORTED_DTYPES
from llmcompress.kernels.moe_experts import expected_experts_hit
from llmcompress.kernels.moe_route import BLOCK_MS

PATHS = ("gemv", "gemm", "reference")
# The GEMM kernels' program grouping (`moe_experts._GEMM_CONFIGS`' GROUP_M): that many blocks share a weight tile.
GEMM_GROUP_M = 8


@dataclasses.dataclass(frozen=True)
class MoePath:
    gemv_max_tokens: int
    """The op's `gemv_max_tokens`: the GEMV for T <= it (0: never)."""
    block_m: int
    """`moe_route`'s and the op's `block_m`: the GEMM's rows per block, the one of `BLOCK_MS` whose worst ratio to
    the best block size over the T the GEMM takes is smallest."""
    priced: dict[str, dict[str, float | None]]
    """Predicted seconds per path at the `REPORTED_M` token counts (``{"t=1": {"gemv_s": ..., "gemm_s": ...}}``)."""
    device: str

    def path_at(self, tokens: int) -> str:
        """The path T tokens take (one of `PATHS`)."""
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        if self.device != "cuda":
            return "reference"
        return "gemv" if tokens <= self.gemv_max_tokens else "gemm"


def _check(hidden, intermediate, num_experts, top_k, dtype, device) -> str:
    name = "choose_moe_path"
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    if min(hidden, intermediate) < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"{name}: need hidden, intermediate >= 1 and 1 <= top_k <= num_experts, got H={hidden}, "
                         f"I={intermediate}, E={num_experts}, k={top_k}")
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"{name}: device must be cuda or cpu, got {kind}")
    return kind


def _gemm_time(cost_model, t, h, i, e, k, es, w_bytes, block_m, dtype) -> float:
    hit = expected_experts_hit(e, k, t)
    rows = t * k / hit  # per hit expert
    blocks = math.ceil(rows / block_m)
    reads = math.ceil(blocks / GEMM_GROUP_M)
    flops = 6.0 * hit * blocks * block_m * h * i
    nbytes = hit * reads * w_bytes + 2 * t * h * es + 2 * t * k * i * es + 2 * t * k * h * 4 + t * k * 8
    return cost_model.kernel_time(flops, nbytes, dtype, rows=blocks * block_m, launches=3)


def expert_bytes(hidden: int, intermediate: int, dtype: torch.dtype, group_size: int | None = None,
                 scheme: str | None = None) -> float:
    """Bytes of one expert's stored gate, up and down weights (3·H·I values): in `dtype`; with `group_size` (or
    `scheme` "w4a16") as packed int4 (half a byte each) plus float16 scales and zeros per group
    (`moe_experts_w4a16`); with `scheme` "w8a16" one byte each plus a float32 scale per output row (2·I + H rows,
    `moe_experts_w8a16`)."""
    n = 3.0 * hidden * intermediate
    if scheme == "w8a16":
        return n + (2.0 * intermediate + hidden) * 4
    if scheme not in (None, "w4a16"):
        raise ValueError(f"expert_bytes: scheme must be None, 'w4a16' or 'w8a16', got {scheme!r}")
    if group_size is None:
        return n * torch.empty((), dtype=dtype).element_size()
    return n / 2 + n / group_size * 4


def choose_moe_path(cost_model: Any, hidden: int, intermediate: int, num_experts: int, top_k: int,
                    dtype: torch.dtype, device: Any, group_size: int | None = None,
                    scheme: str | None = None) -> MoePath:
    """The cheaper experts path at each T for experts of `hidden` (H) x `intermediate` (I), E = `num_experts`,
    k = `top_k`, activations in `dtype` on `device` (cuda or cpu), weights in `dtype` or, with `group_size`, int4
    (`moe_experts_w4a16`), or with `scheme` "w8a16", int8 (`moe_experts_w8a16`). Without a cost model: the GEMM at every T with block_m 16 (correct everywhere; nothing
    says the GEMV pays)."""
    kind = _check(hidden, intermediate, num_experts, top_k, dtype, device)
    if cost_model is None:
        return MoePath(0, BLOCK_MS[0], {}, kind)
    h, i, e, k = hidden, intermediate, num_experts, top_k
    es = torch.empty((), dtype=dtype).element_size()
    w_bytes = expert_bytes(h, i, dtype, group_size, scheme)
    gemv_max, gemv_wins, priced, gemm_tables = 0, True, {}, []
    for t in M_GRID:
        act = 2.0 * t * h * es + 2.0 * t * k * i * es + t * k * 8
        flops = 6.0 * t * k * h * i
        hit = expected_experts_hit(e, k, t)
        prices: dict[str, float | None] = dict.fromkeys(("gemv_s", "gemm_s", "reference_s"))
        if kind == "cpu":
            prices["reference_s"] = cost_model.kernel_time(flops, hit * w_bytes + act, dtype, rows=t * k / hit,
                                                           launches=math.ceil(hit) * 4)
        else:
            t_gemv = cost_model.kernel_time(flops, t * k * w_bytes + act, dtype, tensor_cores=False, launches=2)
            by_block = {bm: _gemm_time(cost_model, t, h, i, e, k, es, w_bytes, bm, dtype) for bm in BLOCK_MS}
            best_bm = min(BLOCK_MS, key=lambda bm: (by_block[bm], bm))
            t_gemm = by_block[best_bm]
            gemv_wins = gemv_wins and t_gemv <= t_gemm
            if gemv_wins:
                gemv_max = t
            else:
                gemm_tables.append(by_block)
            prices["gemv_s"], prices["gemm_s"] = t_gemv, t_gemm
        if t in REPORTED_M:
            priced[f"t={t}"] = prices
    # One block_m serves every T (it is an argument of the graph's ops): the one whose worst ratio to the best block
    # size, over the T the GEMM takes, is smallest.
    def regret(bm):
        return max((table[bm] / min(table.values()) for table in gemm_tables), default=1.0)

    return MoePath(gemv_max, min(BLOCK_MS, key=lambda bm: (regret(bm), bm)), priced, kind)


__all__ = ["GEMM_GROUP_M", "PATHS", "MoePath", "choose_moe_path", "expert_bytes"]
