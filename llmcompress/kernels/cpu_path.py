"""Whether a weight-only linear on the CPU runs torch's packed kernel (`cpu_weight_only.py`) or our op's reference.

`choose_cpu_kernel(cost_model, fmt, n, k, dtype, packed_bytes, stored_bytes)` prices both with the cost model at the
row counts of `REPORTED_M` and returns the packed kernel when it is no slower at any of them. What each candidate
does is said here once: the packed kernel streams the packed weight (and its scales) once per call at the weight-
streaming bandwidth the device profile measured for that format (`profile["cpu_weight_only"][fmt]`, written by
`llmcompress calibrate` on a CPU; without one, the profile's or the table's copy bandwidth); the reference
(`linear_w8a16` / `linear_w4a16` on a CPU) dequantizes the whole weight to float32 (reads the stored bytes, writes
4·N·K) and multiplies in float32 (reads 4·N·K again).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmcompress.kernels.kernel_path import REPORTED_M

FORMATS = ("int8", "int4")
# Activation dtypes torch 2.13's packed weight-only CPU kernels are fast for. With float32 activations they run a
# slow path: 1024x1024 on the 2-core EPYC (measured while other work ran), int8 7.2 ms against 3.6 ms for our
# reference at M = 1 and 2964 ms against 119 ms at M = 4096; int4 0.90 ms against 0.09 ms for a dense F.linear at
# M = 1 and 360 ms against 7 ms at M = 256. bfloat16: int4 0.03 ms against 0.14 ms dense at M = 1.
FAST_DTYPES = (torch.bfloat16, torch.float16)


def packed_dtype_unsupported(dtype: torch.dtype) -> str | None:
    """Why torch's packed CPU kernels are not offered for activations in `dtype`, or None."""
    if dtype in FAST_DTYPES:
        return None
    return (f"{dtype} activations: torch's packed CPU kernels are fast only for bfloat16 and float16 (float32 runs "
            "a path slower than the reference's dequantize + matmul)")


@dataclasses.dataclass(frozen=True)
class CpuKernel:
    packed: bool
    """True: the packed kernel (`linear_w8a16_cpu` / `linear_w4a16_cpu`); False: the reference op."""
    priced: dict[str, dict[str, float]]
    """Predicted seconds per M (``{"m=1": {"packed_s": ..., "reference_s": ...}}``)."""


def weight_stream_bandwidth(cost_model: Any, fmt: str) -> float | None:
    """The measured bytes/s of torch's `fmt` CPU kernel at M = 1 from the cost model's profile, or None."""
    profile = getattr(cost_model, "profile", None) or {}
    entry = profile.get("cpu_weight_only", {}).get(fmt)
    return float(entry["bandwidth_bytes_per_s"]) if entry else None


def choose_cpu_kernel(cost_model: Any, fmt: str, n: int, k: int, dtype: torch.dtype, packed_bytes: float,
                      stored_bytes: float) -> CpuKernel:
    """Packed kernel or reference for an (N, K) weight whose packed form takes `packed_bytes` and whose stored
    (our format) form `stored_bytes`, activations in `dtype`. Without a cost model: the packed kernel."""
    if fmt not in FORMATS:
        raise ValueError(f"choose_cpu_kernel: fmt must be one of {FORMATS}, got {fmt!r}")
    if cost_model is None:
        return CpuKernel(True, {})
    e = torch.empty((), dtype=dtype).element_size()
    dense32 = 4.0 * n * k
    stream = weight_stream_bandwidth(cost_model, fmt)
    packed_wins, priced = True, {}
    for m in REPORTED_M:
        act = float((m * k + m * n) * e)
        flops = 2.0 * m * n * k
        # One roofline: the weight at the kernel's measured streaming rate (already the kernel's own efficiency:
        # no matmul correction on top), the activations at the copy's, against the FLOPs.
        weight_equiv = packed_bytes * cost_model.bandwidth / stream if stream else packed_bytes
        t_packed = cost_model.kernel_time(flops, weight_equiv + act, dtype, rows=None if stream else m)
        t_reference = cost_model.kernel_time(0, stored_bytes + dense32, torch.float32, tensor_cores=False) + \
            cost_model.kernel_time(flops, dense32 + (m * k + m * n) * 4.0, torch.float32, rows=m)
        packed_wins = packed_wins and t_packed <= t_reference
        priced[f"m={m}"] = {"packed_s": t_packed, "reference_s": t_reference}
    return CpuKernel(packed_wins, priced)


__all__ = ["FAST_DTYPES", "FORMATS", "CpuKernel", "choose_cpu_kernel", "packed_dtype_unsupported",
           "weight_stream_bandwidth"]
