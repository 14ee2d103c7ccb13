"""The CPU weight-only linears side by side at decode shapes: bf16 `F.linear`, our ops' reference path (what
`linear_w8a16` / `linear_w4a16` run on a CPU: dequantize the whole weight to float32 per call), the packed ops
(`linear_w8a16_cpu` / `linear_w4a16_cpu`: torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`) called
eagerly, and the packed ops inside `torch.compile` (Inductor inlines them: default, and `max-autotune`, where
Inductor may offer its own CPU weight-only GEMM template for `_weight_int8pack_mm`).

Each time is a median over samples of back-to-back calls (the compiled ones after their compile), wall time and the
process's CPU time, all in one process, one shape after another, so ratios within a row are comparable; on a shared
machine the CPU-time ratios are the steadier ones. Writes
`benchmarks/results/cpu_weight_only.json` (device, threads, versions, medians in microseconds, ratios to bf16
`F.linear`) and prints a Markdown table.

    python benchmarks/cpu_weight_only.py                  # 5632 x 2048 and 2048 x 5632 at M = 1 and 16
    python benchmarks/cpu_weight_only.py --quick          # M = 1 only, no max-autotune
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmcompress.kernels  # noqa: F401  (registers the ops)
from llmcompress.formats import cpu_packed
from llmcompress.formats import quantized as formats

OPS = torch.ops.llmcompress


def _median_s(fn, rep_s: float) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of one call: samples of `inner` back-to-back calls, `inner`
    chosen so a sample takes >= 50 ms (a shared machine's scheduler slices wall time into ~20 ms quanta)."""
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
    wall, cpu, deadline = [], [], time.perf_counter() + rep_s
    while len(wall) < 5 or time.perf_counter() < deadline:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        wall.append((time.perf_counter() - w0) / inner)
        cpu.append((time.process_time() - c0) / inner)
    return statistics.median(wall), statistics.median(cpu)


def _row(n: int, k: int, m: int, rep_s: float, autotune: bool) -> dict:
    dtype, group = torch.bfloat16, 128
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    q8, s8 = formats.quantize_int8_per_channel(w)
    q4, s4, z4 = formats.quantize_int4_rtn(w, group)
    p8, ps8 = cpu_packed.pack_int8_for_cpu(q8, s8, dtype)
    p4, sz4 = cpu_packed.pack_int4_for_cpu(q4, s4, z4, group, dtype)
    cases = {
        "bf16_linear": lambda x: F.linear(x, w),
        "w8_reference": lambda x: OPS.linear_w8a16(x, q8, s8),
        "w4_reference": lambda x: OPS.linear_w4a16(x, q4, s4, z4, group),
        "w8_packed": lambda x: OPS.linear_w8a16_cpu(x, p8, ps8),
        "w4_packed": lambda x: OPS.linear_w4a16_cpu(x, p4, sz4, group),
    }
    compiled = {"w8_packed_inductor": ("default", cases["w8_packed"]),
                "w4_packed_inductor": ("default", cases["w4_packed"])}
    if autotune:
        compiled["w8_packed_inductor_autotune"] = ("max-autotune-no-cudagraphs", cases["w8_packed"])
    times = {}
    with torch.no_grad():
        for name, fn in cases.items():
            times[name] = _median_s(lambda fn=fn: fn(x), rep_s)
        for name, (mode, fn) in compiled.items():
            torch._dynamo.reset()
            c = torch.compile(fn, mode=mode)
            c(x)
            times[name] = _median_s(lambda c=c: c(x), rep_s)
    wall0, cpu0 = times["bf16_linear"]
    return {"n": n, "k": k, "m": m, "dtype": "bfloat16", "group_size": group,
            "median_us": {k_: round(v[0] * 1e6, 1) for k_, v in times.items()},
            "median_cpu_us": {k_: round(v[1] * 1e6, 1) for k_, v in times.items()},
            "speedup_vs_bf16_linear": {k_: round(wall0 / v[0], 3) for k_, v in times.items()},
            "cpu_time_ratio_bf16_linear_over": {k_: round(cpu0 / v[1], 3) for k_, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rep-s", type=float, default=1.0, help="seconds of samples per timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_weight_only.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(5632, 2048), (2048, 5632)]
    ms = (1,) if args.quick else (1, 16)
    rows = [_row(n, k, m, args.rep_s, not args.quick) for n, k in shapes for m in ms]
    result = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "method": f"medians over {args.rep_s} s per case of samples of back-to-back calls (>= 50 ms each), wall "
                  "(perf_counter) and process CPU time (process_time), one process",
        "load_average": list(os.getloadavg()),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    names = list(rows[0]["median_us"])
    print("| N | K | M | " + " | ".join(names) + " |")
    print("|" + "---|" * (3 + len(names)))
    for r in rows:
        cells = [f"{r['median_us'][n]:.0f} us ({r['speedup_vs_bf16_linear'][n]:.2f}x; cpu "
                 f"{r['cpu_time_ratio_bf16_linear_over'][n]:.2f}x)" for n in names]
        print(f"| {r['n']} | {r['k']} | {r['m']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
