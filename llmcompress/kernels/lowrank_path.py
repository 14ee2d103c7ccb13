"""Whether a linear split into factors U (N, r) · V (r, K) runs no slower than the dense weight, and on which kernel.

`choose_lowrank_path(cost_model, n, k, r, dtype, device)` prices each candidate with the cost model
(`CostModel.kernel_time`) and returns a `LowrankPath`: the op's `fused_max_m`, `pays_at(m)` and the predicted
seconds at `kernel_path.REPORTED_M`. It is the one place that decides whether a split pays. What each candidate does
is said here once; what that costs on the hardware is the cost model's answer:

* `fused` (`llmcompress::linear_lowrank`, `lowrank_linear._lowrank_fused_kernel`, CUDA, M <= 16): reads x, V and U
  once and writes y, never t; the rows padded to the kernel's bucket (`gemv_bucket`), FMAs below 16 rows and tensor
  cores at 16, where 16-bit t goes through the second dot as two terms (twice its FLOPs); two launches (the zero fill of
  its fp32 accumulator, then the kernel).
* `two-linears` (the op above fused_max_m on CUDA, and always on the CPU): F.linear twice in x's dtype, each a
  matmul on its own roofline (`rows` = M): x·Vᵀ writes t (M, r), t·Uᵀ reads it back.
* `dense`: F.linear on the (N, K) weight in x's dtype.

Ties go to the split: "no slower than dense" is what the issue asks of a split layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmcompress.kernels.kernel_path import REPORTED_M
from llmcompress.kernels.linear_common import GEMV_MAX_M, SUPPORTED_DTYPES, gemv_bucket, gemv_on_tensor_cores

KERNELS = ("fused", "two-linears", "dense")
# The key of each kernel's predicted seconds in `LowrankPath.priced`.
PRICED_KEYS = {"fused": "fused_s", "two-linears": "two_linears_s", "dense": "dense_s"}


@dataclasses.dataclass(frozen=True)
class LowrankPath:
    n: int
    k: int
    r: int
    dtype: torch.dtype
    device_type: str
    """"cuda" or "cpu"."""
    fused_max_m: int
    """The op's `fused_max_m` argument: the fused kernel for M <= it (0 on the CPU, or where it never wins)."""
    priced: dict[str, dict[str, float | None]]
    """Predicted seconds of each candidate at `REPORTED_M` (``{"m=1": {"fused_s": ..., "two_linears_s": ...,
    "dense_s": ...}}``); None where a candidate is not offered."""
    cost_model: Any = dataclasses.field(repr=False, compare=False, default=None)

    def times(self, m: int) -> dict[str, float | None]:
        """Predicted seconds of each candidate (`KERNELS`) at M rows; the fused kernel only where the op runs it."""
        if m < 1:
            raise ValueError(f"M must be >= 1, got {m}")
        return _times(self.cost_model, self.n, self.k, self.r, self.dtype, self.device_type, m,
                      fused=m <= self.fused_max_m)

    def kernel_at(self, m: int) -> str:
        """What the split op runs at M rows: "fused" or "two-linears"."""
        return "fused" if 1 <= m <= self.fused_max_m else "two-linears"

    def pays_at(self, m: int) -> bool:
        """Whether the split op is no slower than dense F.linear at M rows, per the cost model. Without a cost
        model: False (nothing says the split pays)."""
        if self.cost_model is None:
            return False
        t = self.times(m)
        return t[self.kernel_at(m)] <= t["dense"]


def _times(cost_model, n, k, r, dtype, kind, m, fused) -> dict[str, float | None]:
    e = torch.empty((), dtype=dtype).element_size()
    t = dict.fromkeys(KERNELS)
    t["dense"] = cost_model.kernel_time(2.0 * m * n * k, float((n * k + m * k + m * n) * e), dtype, rows=m)
    t["two-linears"] = (
        cost_model.kernel_time(2.0 * m * r * k, float((r * k + m * k + m * r) * e), dtype, rows=m)
        + cost_model.kernel_time(2.0 * m * r * n, float((n * r + m * r + m * n) * e), dtype, rows=m))
    if kind == "cuda" and fused:
        b = gemv_bucket(m)
        # At 16 rows 16-bit t is multiplied as hi + lo halves: the second dot's FLOPs twice.
        second = 2 if gemv_on_tensor_cores(m) and dtype != torch.float32 else 1
        flops = 2.0 * b * r * k + second * 2.0 * b * r * n
        factors = float((r * k + n * r + m * k + m * n) * e)
        t["fused"] = cost_model.kernel_time(flops, factors, dtype, tensor_cores=gemv_on_tensor_cores(m), launches=2)
    return t


def _check(n, k, r, dtype, device) -> str:
    name = "choose_lowrank_path"
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    if n < 1 or k < 1:
        raise ValueError(f"{name}: N and K must be >= 1, got N={n}, K={k}")
    if not 1 <= r < min(n, k):
        raise ValueError(f"{name}: r must be in [1, min(N, K)) = [1, {min(n, k)}), got {r}")
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"{name}: device must be cuda or cpu, got {kind}")
    return kind


def choose_lowrank_path(cost_model: Any, n: int, k: int, r: int, dtype: torch.dtype, device: Any) -> LowrankPath:
    """The split op's kernels for a linear of N outputs over K inputs at rank r, activations in `dtype` on `device`
    (cuda or cpu): the fused kernel for every M from 1 while it is no slower than the two linears (at most
    `GEMV_MAX_M` rows), the two linears above. Without a cost model: the fused kernel up to its capacity on CUDA, and
    `pays_at` False everywhere."""
    kind = _check(n, k, r, dtype, device)
    if cost_model is None:
        return LowrankPath(n, k, r, dtype, kind, GEMV_MAX_M if kind == "cuda" else 0, {})
    fused_max = 0
    if kind == "cuda":
        for m in range(1, GEMV_MAX_M + 1):
            t = _times(cost_model, n, k, r, dtype, kind, m, fused=True)
            if t["fused"] > t["two-linears"]:
                break
            fused_max = m
    priced = {}
    for m in REPORTED_M:
        t = _times(cost_model, n, k, r, dtype, kind, m, fused=m <= fused_max)
        priced[f"m={m}"] = {PRICED_KEYS[c]: t[c] for c in KERNELS}
    return LowrankPath(n, k, r, dtype, kind, fused_max, priced, cost_model)


__all__ = ["KERNELS", "PRICED_KEYS", "LowrankPath", "choose_lowrank_path"]
