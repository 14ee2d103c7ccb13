"""Device profiles: measured bandwidth, launch overhead and matmul efficiency of the current device.

Entry points: `profile_device(...)` measures the current device and writes a profile (the CLI verb `llmcompress
calibrate` calls it; not to be confused with calibration *data*, `calibration/`, which compressing passes run on);
`load_profile(hardware)` returns the stored profile for the current device (or None), which the backend hands to
`CostModel` so that it predicts with measured numbers instead of datasheet peaks.

A profile is one JSON file per device, `PROFILE_DIR/<device_key()>.json` (`LLMCOMPRESS_PROFILE_DIR` overrides the
folder), e.g. `profiles/nvidia-h100-80gb-hbm3.json`:

* `hardware`: the `HARDWARE` row it calibrates (`load_profile` returns it only for that row); `device`: the device's
  own name; `versions`: torch, triton, CUDA, Python (a profile from other versions is still used; it is logged);
  `created`; `grid`: the M values and (N, K) shapes measured; `method`: how times were taken.
* `bandwidth_bytes_per_s`: a large device-to-device copy, 2 x its size in bytes / (median time - launch overhead)
  (the time floored at 5 % of the median, as for every `time_s` below).
* `copy`: `[{bytes, measured_s, bandwidth_bytes_per_s}]`, copies from 64 KiB up to the large one: achieved
  bandwidth against bytes moved (`bandwidth_at` interpolates it; the cost model does not read it yet).
* `launch_overhead_s`: the median time of a one-element kernel, measured the same way as every other time here (on
  CUDA `triton.testing.do_bench`: CUDA events around one call after an L2 flush, so the GPU time plus event overhead,
  not the CPU's dispatch). On CUDA also `launch_overhead_graph_s`: the same kernel back to back inside a CUDA graph,
  the cost per kernel of a graph replayed without host overhead.
* `matmul`: `{dtype name: [point, ...]}`, one point per (M, N, K) of the grid, `F.linear(x (M, K), w (N, K))` (what
  the captured graph runs), sorted by M and then in the grid's (N, K) order. A point holds `m`, `n`, `k`, `measured_s`
  (median time of the call) and the two numbers the cost model's correction divides:
    - `roofline_time_s` = max(2·M·N·K / table peak FLOP/s, bytes / measured bandwidth), bytes = (M·K + N·K + M·N) x
      element size: what `CostModel(hardware, profile)` computes for that node before the correction and the launch
      overhead;
    - `time_s` = `measured_s` - `launch_overhead_s` (floored at 5 % of `measured_s`): the part the correction scales.
  So `CostModel` (time = roofline_time · time_s / roofline_time_s + launch) predicts `measured_s` exactly at a
  calibrated point. Also `datasheet_s` (the uncalibrated model's prediction: table peaks, table bandwidth, table
  launch), `efficiency` (datasheet roofline without launch / measured: the fraction of the datasheet peak reached),
  `tflops` and `gbps` achieved.

* `cpu_weight_only` (CPU only): `{int8, int4, bfloat16: {n, k, m, weight_bytes, measured_s,
  bandwidth_bytes_per_s}}`, one decode row (M = 1) through an (N, K) weight with torch's CPU kernels as the packed
  ops call them (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu` with groups of 128, bf16
  `F.linear`): the weight-streaming bandwidth each achieves, weight bytes / (median time - launch overhead). The
  quantize pass prices its CPU kernels with it (`kernels/cpu_path.py`).

The cost model looks a correction up by M alone (the nearest M in log space, and the first point of the grid's (N, K)
order at that M, which is (4096, 4096) in the default grid). `matmul_correction` here also does the lookup over
(M, N, K), for the validation benchmark to compare the two.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcompress._logging import logger
from llmcompress.cost.hardware import Hardware, resolve
from llmcompress.errors import OptionError

PROFILE_DIR = Path(__file__).parent / "profiles"
PROFILE_VERSION = 1


def device_key() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def profile_path(key: str | None = None) -> Path:
    override = os.environ.get("LLMCOMPRESS_PROFILE_DIR")
    return (Path(override) if override else PROFILE_DIR) / f"{key or device_key()}.json"


def load_profile(hardware: Hardware) -> dict[str, Any] | None:
    """The device profile of the current device if one is stored and calibrates `hardware` (its `hardware`
    field is `hardware.name`). A CPU row reads `cpu.json` also on a machine with a GPU."""
    if hardware.kind == "cuda" and not torch.cuda.is_available():
        return None
    path = profile_path(None if hardware.kind == "cuda" else "cpu")
    if not path.is_file():
        return None
    profile = json.loads(path.read_text())
    if profile.get("hardware") != hardware.name:
        return None
    stored, now = profile.get("versions", {}), versions()
    changed = [k for k in ("torch", "triton", "cuda") if k in stored and stored[k] != now.get(k)]
    if changed:
        logger.info("device profile %s was measured with %s; now %s: still used, recalibrate with "
                    "`llmcompress calibrate`", path, {k: stored[k] for k in changed}, {k: now.get(k) for k in changed})
    return profile


@dataclasses.dataclass(frozen=True)
class Grid:
    """The matmul shapes measured: every M with every (N, K); `F.linear(x (M, K), w (N, K))`."""

    m: tuple[int, ...]
    nk: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.m or not self.nk or any(v < 1 for v in self.m) or any(v < 1 for p in self.nk for v in p):
            raise OptionError(f"calibration grid needs positive sizes, got m={self.m}, nk={self.nk}")

    def shapes(self) -> list[tuple[int, int, int]]:
        return [(m, n, k) for m in self.m for n, k in self.nk]

    def to_json(self) -> dict[str, Any]:
        return {"m": list(self.m), "nk": [list(p) for p in self.nk]}


# Llama-7B-sized linears: q/k/v/o (4096 x 4096), gate/up (11008 x 4096), down (4096 x 11008); decode M = 1 up to a
# 4096-token prefill.
DEFAULT_GRID = Grid((1, 16, 64, 256, 4096), ((4096, 4096), (11008, 4096), (4096, 11008)))
# The same proportions at a quarter of the width, at most M = 256: a CPU measures it in tens of seconds.
CPU_GRID = Grid((1, 16, 64, 256), ((1024, 1024), (2752, 1024), (1024, 2752)))
# A few seconds on a 2-core CPU (the tests); on a GPU a rough profile in about a second.
QUICK_GRID = Grid((1, 16, 64, 256), ((512, 512), (1024, 512)))


def default_grid(kind: str, quick: bool = False) -> Grid:
    """The grid `profile_device` measures by default on a device of `kind` ('cuda' or 'cpu')."""
    return QUICK_GRID if quick else DEFAULT_GRID if kind == "cuda" else CPU_GRID


def device_name(device: torch.device | None = None) -> str:
    """`torch.cuda.get_device_name`, or the CPU's model name."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "triton": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def measure(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            min_repeats: int = 5) -> float:
    """Median seconds of one `fn()` call.

    CUDA: `triton.testing.do_bench(return_mode="median")`: CUDA events around each call, the L2 cache flushed before
    it (weights are read cold, as in a forward pass), so the GPU time, not the host's dispatch.
    CPU: median of `time.perf_counter` samples, at least `min_repeats`, until about `rep_ms` have passed.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < min_repeats or (time.perf_counter() < deadline and len(samples) < 10_000):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _measure_graph(fn: Callable[[], Any]) -> float:
    """CUDA only: median seconds per `fn()` replayed back to back in a CUDA graph (no host overhead, no L2 flush)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=20, return_mode="median") / 1e3


def _peak(hardware: Hardware, dtype: torch.dtype) -> float:
    from llmcompress.cost.roofline import CostModel

    # The cost model's own choice (tensor-core peak per dtype, TF32 under the float32 matmul precision setting), so a
    # profile's roofline_time_s is exactly what CostModel computes before its correction.
    return CostModel(hardware)._peak(dtype, True)


def profile_device(hardware: str = "auto", dtypes: Sequence[str] = ("bfloat16",), grid: Grid | None = None,
              quick: bool = False, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Measure the current device, write its profile (to `out`, else `profile_path()`) and return it.

    `hardware`: a `HARDWARE` row or "auto" (the current device's row: `cpu` without CUDA); its kind decides the device
    measured (a CUDA row without a GPU is refused). `dtypes`: floating dtype names of the matmuls. `grid`: default
    `DEFAULT_GRID` on CUDA, `CPU_GRID` on a CPU, `QUICK_GRID` with `quick` (which also shortens every measurement).
    """
    hw = resolve(hardware)
    if hw.kind == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"hardware {hw.name!r} is a CUDA device, but CUDA is not available here")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch_dtypes = []
    for name in dtypes:
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise OptionError(f"llmcompress calibrate: dtype {name!r} is not a floating torch dtype name (e.g. 'bfloat16')")
        torch_dtypes.append(dt)
    grid = grid or default_grid(device.type, quick)
    timing = {"warmup_ms": 5, "rep_ms": 20} if quick else {"warmup_ms": 25, "rep_ms": 100}
    start = time.perf_counter()

    with torch.no_grad():
        # Called as the graph calls an op (an OpOverload): on a CPU the host's dispatch is the launch overhead, and
        # the Python path of torch.neg is 1.2 us against 2.1 us for aten.neg.default (2-core EPYC).
        tiny, neg = torch.zeros(1, device=device), torch.ops.aten.neg.default
        launch = measure(lambda: neg(tiny), device, **timing)
        launch_graph = _measure_graph(lambda: neg(tiny)) if device.type == "cuda" else None

        # The bandwidth: far beyond any cache, 1 GiB on a GPU (50 MiB L2), 64 MiB on a CPU (32 MiB L3 per EPYC CCD).
        # Smaller copies give the curve of achieved bandwidth against bytes moved (`copy`).
        size = (256 << 20 if quick else 1 << 30) if device.type == "cuda" else (32 << 20 if quick else 64 << 20)
        src = torch.empty(size, dtype=torch.uint8, device=device).random_(0, 255)
        dst = torch.empty_like(src)
        copies = []
        for shift in range(16, size.bit_length() - 1, 4 if quick else 2):  # 64 KiB, x16 (quick) or x4, ..., size
            n = min(1 << shift, size)
            s_, d_ = src[:n], dst[:n]
            copies.append((n, measure(lambda: d_.copy_(s_), device, **timing)))
        copy_s = measure(lambda: dst.copy_(src), device, **timing)
        copies.append((size, copy_s))
        # Moved bytes = 2 x size (read + write); the launch overhead is the model's separate term.
        copy_points = [{"bytes": 2 * n, "measured_s": t, "bandwidth_bytes_per_s": 2 * n / max(t - launch, 0.05 * t)}
                       for n, t in copies]
        bandwidth = copy_points[-1]["bandwidth_bytes_per_s"]
        del src, dst

        matmul: dict[str, list[dict[str, Any]]] = {}
        for dt in torch_dtypes:
            peak, esize = _peak(hw, dt), torch.empty((), dtype=dt).element_size()
            points = []
            for m, n, k in grid.shapes():
                gen = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(m, k, dtype=dt, device=device, generator=gen)
                w = torch.randn(n, k, dtype=dt, device=device, generator=gen)
                measured = measure(lambda: F.linear(x, w), device, **timing)
                flops, nbytes = 2 * m * n * k, (m * k + n * k + m * n) * esize
                roofline = max(flops / peak, nbytes / bandwidth)
                datasheet_core = max(flops / peak, nbytes / hw.memory_bandwidth)
                t = max(measured - launch, 0.05 * measured)
                points.append({"m": m, "n": n, "k": k, "time_s": t, "roofline_time_s": roofline,
                               "measured_s": measured, "datasheet_s": datasheet_core + hw.launch_overhead_s,
                               "efficiency": datasheet_core / measured, "tflops": flops / measured / 1e12,
                               "gbps": nbytes / measured / 1e9})
                del x, w
            matmul[str(dt).removeprefix("torch.")] = points
        weight_only = _cpu_weight_only(launch, timing, quick) if device.type == "cpu" else None

    profile: dict[str, Any] = {
        "profile_version": PROFILE_VERSION,
        "hardware": hw.name,
        "device": device_name(device),
        "device_key": device_key() if device.type == "cuda" else "cpu",
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "grid": grid.to_json(),
        "method": {"timer": "triton.testing.do_bench median, L2 flushed (launch_overhead_graph_s: "
                            "do_bench_cudagraph median)" if device.type == "cuda" else "time.perf_counter median",
                   **timing,
                   "threads": torch.get_num_threads() if device.type == "cpu" else None,
                   "copy_bytes": size, "wall_s": round(time.perf_counter() - start, 2)},
        "bandwidth_bytes_per_s": bandwidth,
        "launch_overhead_s": launch,
        "copy": copy_points,
        "matmul": matmul,
    }
    if launch_graph is not None:
        profile["launch_overhead_graph_s"] = launch_graph
    if weight_only is not None:
        profile["cpu_weight_only"] = weight_only
    path = Path(out) if out is not None else profile_path(profile["device_key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1) + "\n")
    profile["path"] = str(path)  # not stored: where this call wrote it
    return profile


# The decode shape measured: an MLP projection of a 1-2 B model (hidden 2048, MLP 5632: 11.5 MB of int8, 23 MB of
# bf16, past the 2-core EPYC's share of L3), 2048 x 2048 with `quick`.
CPU_WEIGHT_ONLY_SHAPE = (5632, 2048)
CPU_WEIGHT_ONLY_QUICK_SHAPE = (2048, 2048)


def _cpu_weight_only(launch: float, timing: Mapping[str, Any], quick: bool) -> dict[str, dict[str, Any]]:
    """Weight-streaming bandwidth of torch's CPU weight-only kernels at M = 1 (see the module docstring)."""
    n, k = CPU_WEIGHT_ONLY_QUICK_SHAPE if quick else CPU_WEIGHT_ONLY_SHAPE
    group = 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s8 = torch.rand(n, generator=gen).to(torch.bfloat16)
    q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32), 2)
    sz = torch.rand(k // group, n, 2, generator=gen).to(torch.bfloat16)
    w16 = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    cases = {
        "int8": (lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8), n * k + 2 * n),
        "int4": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, group, sz), n * k // 2 + sz.numel() * 2),
        "bfloat16": (lambda: F.linear(x, w16), 2 * n * k),
    }
    out = {}
    for name, (fn, weight_bytes) in cases.items():
        t = measure(fn, torch.device("cpu"), **timing)
        out[name] = {"n": n, "k": k, "m": 1, "weight_bytes": weight_bytes, "measured_s": t,
                     "bandwidth_bytes_per_s": weight_bytes / max(t - launch, 0.05 * t)}
    return out


def matmul_correction(profile: Mapping[str, Any] | None, dtype: str, m: float, n: float | None = None,
                      k: float | None = None) -> float:
    """`time_s / roofline_time_s` of the profile's point nearest to (M, N, K) in log space; 1 without one.

    Without `n` and `k`, the nearest M and the first such point (what `CostModel._matmul_correction` does today).
    """
    points = (profile or {}).get("matmul", {}).get(dtype, [])
    if not points:
        return 1.0

    def dist(p: Mapping[str, Any]) -> float:
        d = (math.log(max(p["m"], 1)) - math.log(max(m, 1))) ** 2
        if n is not None and k is not None:
            d += (math.log(p["n"]) - math.log(max(n, 1))) ** 2 + (math.log(p["k"]) - math.log(max(k, 1))) ** 2
        return d

    best = min(points, key=dist)
    return float(best["time_s"]) / float(best["roofline_time_s"])


def bandwidth_at(profile: Mapping[str, Any], nbytes: float) -> float:
    """Achieved bandwidth for a kernel moving `nbytes`: the profile's copy curve interpolated in log(bytes), clamped
    to its ends; `bandwidth_bytes_per_s` without a curve."""
    curve = sorted((p["bytes"], p["bandwidth_bytes_per_s"]) for p in profile.get("copy", []))
    if not curve:
        return float(profile["bandwidth_bytes_per_s"])
    if nbytes <= curve[0][0]:
        return float(curve[0][1])
    for (b0, w0), (b1, w1) in zip(curve, curve[1:]):
        if nbytes <= b1:
            f = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return float(math.exp(math.log(w0) + f * (math.log(w1) - math.log(w0))))
    return float(curve[-1][1])


def format_table(profile: Mapping[str, Any]) -> str:
    """A short text table of a profile: bandwidth, launch overhead, then one line per matmul point."""
    lines = [f"{profile['device']}  (hardware {profile['hardware']}, torch {profile['versions']['torch']})",
             f"bandwidth  {profile['bandwidth_bytes_per_s'] / 1e9:10.1f} GB/s   launch overhead "
             f"{profile['launch_overhead_s'] * 1e6:.2f} us"
             + (f" ({profile['launch_overhead_graph_s'] * 1e6:.2f} us in a CUDA graph)"
                if profile.get("launch_overhead_graph_s") is not None else "")]
    for dtype, points in profile["matmul"].items():
        lines.append(f"{'dtype':9s} {'M':>5s} {'N':>6s} {'K':>6s} {'measured us':>12s} {'roofline us':>12s} "
                     f"{'efficiency':>10s} {'TFLOP/s':>8s} {'GB/s':>8s}")
        for p in points:
            lines.append(f"{dtype:9s} {p['m']:5d} {p['n']:6d} {p['k']:6d} {p['measured_s'] * 1e6:12.1f} "
                         f"{p['datasheet_s'] * 1e6:12.1f} {p['efficiency']:10.1%} {p['tflops']:8.2f} "
                         f"{p['gbps']:8.1f}")
    return "\n".join(lines)

