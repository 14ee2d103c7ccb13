"""Hardware descriptions the cost model reasons with; `resolve("auto")` picks the current device.

Numbers are datasheet peaks (dense, no sparsity); the cost-model calibration replaces them with measured ones.
"""

from __future__ import annotations

import dataclasses

import torch

from llmcompress.errors import OptionError, did_you_mean


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    kind: str
    """'cuda' or 'cpu'."""
    memory_bandwidth: float
    """Bytes per second."""
    peak_flops: dict[str, float]
    """FLOP/s per dtype name: float32, tfloat32, bfloat16, float16, int8, float8."""
    l2_bytes: int
    launch_overhead_s: float
    match: tuple[str, ...] = ()
    """Substrings of `torch.cuda.get_device_name()` that identify this device."""


_T = 1e12
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("h100-sxm", "cuda", 3.35e12, {"float32": 67 * _T, "tfloat32": 495 * _T, "bfloat16": 989 * _T,
                 "float16": 989 * _T, "int8": 1979 * _T, "float8": 1979 * _T}, 50 << 20, 4e-6, ("H100 80GB HBM3", "H100 SXM")),
        Hardware("h100-pcie", "cuda", 2.0e12, {"float32": 51 * _T, "tfloat32": 378 * _T, "bfloat16": 756 * _T,
                 "float16": 756 * _T, "int8": 1513 * _T, "float8": 1513 * _T}, 50 << 20, 4e-6, ("H100 PCIe",)),
        Hardware("h200", "cuda", 4.8e12, {"float32": 67 * _T, "tfloat32": 495 * _T, "bfloat16": 989 * _T,
                 "float16": 989 * _T, "int8": 1979 * _T, "float8": 1979 * _T}, 50 << 20, 4e-6, ("H200",)),
        Hardware("a100-40gb", "cuda", 1.555e12, {"float32": 19.5 * _T, "tfloat32": 156 * _T, "bfloat16": 312 * _T,
                 "float16": 312 * _T, "int8": 624 * _T}, 40 << 20, 4e-6, ("A100-SXM4-40GB", "A100-PCIE-40GB")),
        Hardware("a100-80gb", "cuda", 2.039e12, {"float32": 19.5 * _T, "tfloat32": 156 * _T, "bfloat16": 312 * _T,
                 "float16": 312 * _T, "int8": 624 * _T}, 40 << 20, 4e-6, ("A100-SXM4-80GB", "A100 80GB")),
        Hardware("l4", "cuda", 300e9, {"float32": 30.3 * _T, "tfloat32": 60 * _T, "bfloat16": 121 * _T,
                 "float16": 121 * _T, "int8": 242 * _T, "float8": 242 * _T}, 48 << 20, 4e-6, ("L4",)),
        Hardware("l40s", "cuda", 864e9, {"float32": 91.6 * _T, "tfloat32": 183 * _T, "bfloat16": 362 * _T,
                 "float16": 362 * _T, "int8": 733 * _T, "float8": 733 * _T}, 96 << 20, 4e-6, ("L40S",)),
        Hardware("rtx-4090", "cuda", 1008e9, {"float32": 82.6 * _T, "tfloat32": 82.6 * _T, "bfloat16": 165 * _T,
                 "float16": 165 * _T, "int8": 660 * _T, "float8": 330 * _T}, 72 << 20, 4e-6, ("RTX 4090",)),
        Hardware("cpu", "cpu", 50e9, {"float32": 1 * _T, "bfloat16": 1 * _T, "float16": 0.5 * _T, "int8": 2 * _T},
                 32 << 20, 5e-6),
    )
}


def resolve(name: str, device: torch.device | None = None) -> Hardware:
    """A table entry by name, or for "auto" the entry matching `device` (default: CUDA if present, else CPU)."""
    if name != "auto":
        if name not in HARDWARE:
            raise OptionError(f"hardware: unknown {name!r}{did_you_mean(name, ['auto', *HARDWARE])}; expected 'auto' "
                              f"or one of {', '.join(sorted(HARDWARE))}")
        return HARDWARE[name]
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return HARDWARE["cpu"]
    device_name = torch.cuda.get_device_name(device)
    for hw in HARDWARE.values():
        if any(m in device_name for m in hw.match):
            return hw
    # An unknown GPU: the closest generic answer is the H100 PCIe row, flagged by name so reports show it.
    return dataclasses.replace(HARDWARE["h100-pcie"], name=f"unknown-cuda({device_name})")
