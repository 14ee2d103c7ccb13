"""Which kernel a 2:4-pruned linear runs at each row count M: our 2:4 op, torch's semi-structured path, or dense.

`choose_sparse_path(cost_model, n, k, dtype, device, variant)` prices each candidate with the cost model
(`CostModel.kernel_time`) at every M of `kernel_path.M_GRID` (and 17, the first M past the GEMV) and returns the M
ranges each wins (`SparsePath`); it is the one place that decides whether a 2:4 layer is lowered to a sparse kernel. What each candidate does is said here
once; what that costs on the hardware is the cost model's answer:

* `gemv` / `gemm` (`llmcompress::linear_2of4` or `linear_2of4_w4a16`, `sparse_linear.py`, on CUDA): stream the
  stored form once (`stored_bytes`) and multiply the expanded tile, zeros included (Triton has no sparse MMA): the
  dense FLOPs, the GEMV on its padded rows and engine (`gemv_bucket`, `gemv_on_tensor_cores`).
* `reference`: the op on a CPU: unpack to a float32 weight (reads the stored bytes, writes 4·N·K) and a float32
  matmul (reads 4·N·K again), so it never beats dense there.
* `semi-structured` (torch's `to_sparse_semi_structured`, cuSPARSELt/CUTLASS): only on CUDA, only fp16/bf16, only
  the float 2:4 variant. Priced from dense, honestly: for M <= `SEMI_STRUCTURED_SLOW_MAX_M`, dense time times
  `SEMI_STRUCTURED_SMALL_M_FACTOR`; above, the sparse tensor cores at `SEMI_STRUCTURED_SPEEDUP` over dense FLOPs,
  reading the kept values and metadata.
* `dense (masked)`: F.linear on the masked dense weight in the activations' dtype (cuBLAS, or torch's CPU matmul).

Ties go to dense: the masked dense weight is what the pass stores anyway, and a model is never slower pruned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmcompress.formats.quantized import check_group_size
from llmcompress.formats.sparse import meta_columns
from llmcompress.kernels.kernel_path import M_GRID, REPORTED_M
from llmcompress.kernels.linear_common import DENSE_OFF, GEMV_MAX_M, SUPPORTED_DTYPES, gemv_bucket, gemv_on_tensor_cores

VARIANTS = ("2of4", "2of4-w4a16")
KERNELS = ("gemv", "gemm", "reference", "semi-structured", "dense (masked)")
# The key of each kernel's predicted seconds in `SparsePath.priced`.
PRICED_KEYS = {"gemv": "gemv_s", "gemm": "gemm_s", "reference": "reference_s", "semi-structured": "semi_structured_s",
               "dense (masked)": "dense_masked_s"}
# torch's semi-structured path at M = 1 on an H100 (issue 13, measured): 25-46x slower than dense bf16 cuBLAS. The
# low end, so the model never overstates the loss; only measured at M = 1, assumed through the decode range.
SEMI_STRUCTURED_SMALL_M_FACTOR = 25.0
SEMI_STRUCTURED_SLOW_MAX_M = GEMV_MAX_M
# Large M: the sparse tensor cores halve the MMA work, but end to end torch's semi-structured linears gain about
# 1.3x over dense at large shapes (PyTorch's semi-structured sparsity tutorial, A100; not measured here).
SEMI_STRUCTURED_SPEEDUP = 1.3
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class SparsePath:
    ranges: tuple[tuple[int, int | None, str], ...]
    """(first M, last M or None for no end, kernel) in increasing M, covering M >= 1; a range's last M is one below
    the next priced M where another kernel wins."""
    gemv_max_m: int
    """The op's `gemv_max_m` argument: the GEMV for M <= it, the GEMM above (where the op runs at all)."""
    priced: dict[str, dict[str, float | None]]
    """Predicted seconds of each candidate at `REPORTED_M` (``{"m=1": {"gemv_s": ..., "dense_masked_s": ...}}``);
    None where a candidate is not offered."""

    def kernel_at(self, m: int) -> str:
        """The kernel that runs M rows (one of `KERNELS`)."""
        for first, last, kernel in self.ranges:
            if m >= first and (last is None or m <= last):
                return kernel
        raise ValueError(f"M must be >= 1, got {m}")

    @property
    def dense_min_m(self) -> int | None:
        """The op's `dense_min_m` argument where our op wins at M = 1 (decode): the first M past that where
        something else wins, from which the op expands the weight once and runs F.linear (torch's semi-structured
        path needs its own weight form, so it is not offered inside the op); `DENSE_OFF` if the op wins at every M.
        None where the op loses at M = 1: the layer keeps its masked dense weight."""
        if self.kernel_at(1) not in ("gemv", "gemm"):
            return None
        for first, _, kernel in self.ranges:
            if kernel not in ("gemv", "gemm"):
                return first
        return DENSE_OFF

    @property
    def uses_op(self) -> bool:
        """Whether our 2:4 op runs at some M (else the layer stays dense, or on torch's path only)."""
        return any(kernel in ("gemv", "gemm", "reference") for _, _, kernel in self.ranges)


def stored_bytes(n: int, k: int, dtype: torch.dtype, variant: str, group_size: int = 128) -> float:
    """Bytes of the stored 2:4 form of an (N, K) weight: kept values (x's dtype) or int4 codes, metadata, and for
    the int4 variant fp16 scales and zeros."""
    meta = n * meta_columns(k)
    if variant == "2of4":
        return float(n * (k // 2) * torch.empty((), dtype=dtype).element_size() + meta)
    return float(n * (k // 4) + meta + 2 * n * (k // group_size) * 2)


def _check(n, k, dtype, device, variant, group_size) -> str:
    name = "choose_sparse_path"
    if variant not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    if k % 4 or n < 1:
        raise ValueError(f"{name}: K must be a multiple of 4 and N >= 1, got N={n}, K={k}")
    if variant == "2of4-w4a16":
        check_group_size(k, group_size)
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"{name}: device must be cuda or cpu, got {kind}")
    return kind


def choose_sparse_path(cost_model: Any, n: int, k: int, dtype: torch.dtype, device: Any, variant: str = "2of4",
                       group_size: int = 128) -> SparsePath:
    """The cheapest kernel at each priced M for a 2:4 linear of N outputs over K inputs, activations in
    `dtype` on `device` (cuda or cpu); variant "2of4" (values in `dtype`) or "2of4-w4a16" (int4 codes, groups of
    `group_size`). Without a cost model: dense everywhere (nothing says the op pays)."""
    kind = _check(n, k, dtype, device, variant, group_size)
    if cost_model is None:
        return SparsePath(((1, None, "dense (masked)"),), 0, {})
    e = torch.empty((), dtype=dtype).element_size()
    sparse = stored_bytes(n, k, dtype, variant, group_size)
    semi = kind == "cuda" and variant == "2of4" and dtype in SEMI_STRUCTURED_DTYPES
    # Priced M: `M_GRID` and the first M past the GEMV's capacity, so that no range gives the GEMV more rows.
    grid = sorted({*M_GRID, GEMV_MAX_M + 1})
    winners, priced = [], {}
    for m in grid:
        act = float((m * k + m * n) * e)
        flops = 2.0 * m * n * k
        t_dense = cost_model.kernel_time(flops, n * k * e + act, dtype, rows=m)
        t = dict.fromkeys(KERNELS)
        t["dense (masked)"] = t_dense
        if kind == "cpu":
            dense32 = 4.0 * n * k
            t["reference"] = cost_model.kernel_time(0, sparse + dense32, torch.float32, tensor_cores=False) + \
                cost_model.kernel_time(flops, dense32 + (m * k + m * n) * 4.0, torch.float32, rows=m)
        else:
            t["gemm"] = cost_model.kernel_time(flops, sparse + act, dtype, rows=m)
            if m <= GEMV_MAX_M:
                t["gemv"] = cost_model.kernel_time(2.0 * gemv_bucket(m) * n * k, sparse + act, dtype,
                                                   tensor_cores=gemv_on_tensor_cores(m))
            if semi and m <= SEMI_STRUCTURED_SLOW_MAX_M:
                t["semi-structured"] = t_dense * SEMI_STRUCTURED_SMALL_M_FACTOR
            elif semi:
                values = float(n * (k // 2) * e + n * meta_columns(k))
                t["semi-structured"] = cost_model.kernel_time(flops / SEMI_STRUCTURED_SPEEDUP, values + act, dtype,
                                                              rows=m)
        # Cheapest; on ties dense first, then the GEMV (as kernel_path: it wins ties with the GEMM).
        order = ("dense (masked)", "gemv", "gemm", "reference", "semi-structured")
        winners.append(min((c for c in order if t[c] is not None), key=lambda c: (t[c], order.index(c))))
        if m in REPORTED_M:
            priced[f"m={m}"] = {PRICED_KEYS[c]: t[c] for c in KERNELS}
    ranges = []
    for m, kernel in zip(grid, winners):
        if ranges and ranges[-1][2] == kernel:
            continue
        if ranges:
            ranges[-1] = (ranges[-1][0], m - 1, ranges[-1][2])
        ranges.append((m, None, kernel))
    gemv_max = 0
    for m, kernel in zip(grid, winners):
        if kernel != "gemv":
            break
        gemv_max = m
    return SparsePath(tuple(ranges), gemv_max, priced)


__all__ = ["KERNELS", "SEMI_STRUCTURED_SLOW_MAX_M", "SEMI_STRUCTURED_SMALL_M_FACTOR", "SEMI_STRUCTURED_SPEEDUP",
           "VARIANTS", "SparsePath", "choose_sparse_path", "stored_bytes"]
