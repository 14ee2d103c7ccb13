"""Which kernel a linear on our kernels runs at each row count M: the GEMV, the GEMM, or dequantize + cuBLAS.

`choose_kernel_path(cost_model, n, k, dtype, weight_bytes, dense=...)` prices the candidates with the cost model
(`CostModel.kernel_time`) at each M and returns the crossovers the ops take as arguments (`gemv_max_m`,
`dense_min_m`, read by `linear_common.run_by_rows`). What each candidate does is the kernels' own fact, said here
once: the GEMV and the GEMM both stream the stored weight once; the GEMV holds up to `GEMV_MAX_M` rows, padded to
`gemv_bucket(m)` and multiplied on CUDA cores or tensor cores (`gemv_on_tensor_cores`); dequantize + cuBLAS writes
and reads a dense copy of the weight (two launches). What that costs on the hardware is the cost model's answer.
`quantize-linear` (packed weights, all three paths) and `fuse-linear-epilogue` (a dense weight, GEMV or GEMM) use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmcompress.kernels.linear_common import DENSE_OFF, GEMV_MAX_M, gemv_bucket, gemv_on_tensor_cores

# Row counts priced: every M the GEMV can hold, then powers of two up to long prefill chunks.
M_GRID = (*range(1, GEMV_MAX_M + 1), *(2**i for i in range(5, 14)))
# The M whose prices a decision keeps for the compile report.
REPORTED_M = (1, 4, 16, 256, 4096)


@dataclasses.dataclass(frozen=True)
class KernelPath:
    gemv_max_m: int
    """The GEMV for M <= gemv_max_m (0: never)."""
    dense_min_m: int
    """Dequantize + cuBLAS for M >= dense_min_m; `DENSE_OFF` when it never wins."""
    priced: dict[str, dict[str, float | None]]
    """Predicted seconds of each candidate at the `REPORTED_M` that were priced (``{"m=1": {"gemv_s": ...}}``)."""


def choose_kernel_path(cost_model: Any, n: int, k: int, dtype: torch.dtype, weight_bytes: float, *,
                       dense: bool = True) -> KernelPath:
    """The cheapest kernel at each M of `M_GRID` for a linear of N outputs over K inputs with activations in `dtype`
    and a stored weight of `weight_bytes` bytes; `dense`: whether dequantize + cuBLAS is a candidate.

    The GEMV keeps the rows up to the first M where the GEMM is faster (ties go to the GEMV); the dense path starts
    at the first M where it beats both. Without a cost model: the GEMV up to its capacity, never the dense path.
    """
    if cost_model is None:
        return KernelPath(GEMV_MAX_M, DENSE_OFF, {})
    e = torch.empty((), dtype=dtype).element_size()
    dense_bytes = float(n * k * e)
    gemv_max, gemv_wins, dense_min, priced = 0, True, DENSE_OFF, {}
    for m in M_GRID:
        if not gemv_wins and not dense:
            break  # nothing left to decide (with the dense path, the grid is priced whole for the report)
        act = float((m * k + m * n) * e)
        flops = 2.0 * m * n * k
        t_gemm = cost_model.kernel_time(flops, weight_bytes + act, dtype, rows=m)
        t_gemv = None
        if m <= GEMV_MAX_M:
            # The GEMV computes its padded rows, on the engine its bucket uses.
            t_gemv = cost_model.kernel_time(2.0 * gemv_bucket(m) * n * k, weight_bytes + act, dtype,
                                            tensor_cores=gemv_on_tensor_cores(m))
        gemv_wins = gemv_wins and t_gemv is not None and t_gemv <= t_gemm
        if gemv_wins:
            gemv_max = m
        t_dense = None
        if dense:
            t_dense = cost_model.kernel_time(0, weight_bytes + dense_bytes, dtype, tensor_cores=False) + \
                cost_model.kernel_time(flops, dense_bytes + act, dtype, rows=m)
            best = t_gemv if gemv_wins else t_gemm
            if dense_min == DENSE_OFF and t_dense < best:
                dense_min = m
        if m in REPORTED_M:
            priced[f"m={m}"] = {"gemv_s": t_gemv, "gemm_s": t_gemm} | ({"dequant_cublas_s": t_dense} if dense else {})
    return KernelPath(gemv_max, dense_min, priced)


def choose_gemv_max_m(cost_model: Any, n: int, k: int, dtype: torch.dtype) -> tuple[int, dict[str, Any]]:
    """(gemv_max_m, priced) for a dense weight (N, K) in `dtype` on the GEMV or GEMM (`fused_linear`)."""
    path = choose_kernel_path(cost_model, n, k, dtype, float(n * k * torch.empty((), dtype=dtype).element_size()),
                              dense=False)
    return path.gemv_max_m, path.priced


__all__ = ["M_GRID", "REPORTED_M", "KernelPath", "choose_gemv_max_m", "choose_kernel_path"]
