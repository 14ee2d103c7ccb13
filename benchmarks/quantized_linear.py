"""Quantized linear kernels beside cuBLAS, torch's tinygemm and Inductor, per weight shape and row count: `main`.

One process, one weight per shape (N x K, random bf16, std 0.02, seeded), bf16 activations x (M, K), no bias. Per
(shape, M) every configuration runs on the same x:

  bf16-cublas                    F.linear(x, W) on the dense bf16 weight (cuBLAS; on a CPU, torch's CPU matmul)
  tinygemm-int4                  torch.ops.aten._weight_int4pack_mm (torch's tinygemm; `_for_cpu` on a CPU), fed our
                                 int4 g128 codes: packed by `_convert_weight_to_int4pack` (CUDA: uint8 (N, K / 2) with
                                 the even k in the high nibble, inner_k_tiles=8; CPU: int32 (N, K) codes), scales and
                                 zeros as its bf16 (K / g, N, 2) with zero' = (8 - zero) * scale, since tinygemm
                                 computes (q - 8) * scale + zero'
  llmcompress-w4a16              torch.ops.llmcompress.linear_w4a16 with the op's default thresholds (GEMV for M <= 16,
                                 the Triton GEMM above)
  llmcompress-w4a16-gemv         forced GEMV (gemv_max_m=16; only M <= 16)
  llmcompress-w4a16-gemm         forced Triton GEMM (gemv_max_m=0)
  llmcompress-w4a16-dequant-cublas  forced dequantize + cuBLAS (gemv_max_m=0, dense_min_m=1)
  llmcompress-w4a16-planned      the thresholds the quantize-linear pass would choose on this device (its cost model,
                                 with the device's calibration profile when there is one)
  llmcompress-w8a16              torch.ops.llmcompress.linear_w8a16, default thresholds (int8 per-channel weights)
  llmcompress-w8a8               torch.ops.llmcompress.linear_w8a8 (per-token int8 activations, int8 GEMM)
  llmcompress-fp8                torch.ops.llmcompress.linear_fp8 (e4m3; CUDA compute capability >= 8.9, else skipped)
  inductor-dequant-int4          torch.compile (Inductor, default mode, dynamic=False) of a plain torch function that
                                 unpacks our int4 format, dequantizes in fp32, rounds to bf16 and matmuls: what
                                 Inductor makes of weight-only int4 without a custom kernel

Weights are quantized by round to nearest (`llmcompress.formats.quantized`): int4 asymmetric g128 (w4a16,
tinygemm, Inductor), int8 per channel (w8a16, w8a8), e4m3 per channel (fp8). The forced kernel paths are Triton
kernels: on a CPU they are skipped (the op runs its plain-torch reference whatever the thresholds) unless
TRITON_INTERPRET=1, where the launcher `linear_w4a16_triton` runs them in the interpreter (numerics only). On a CPU
every llmcompress op runs its reference, so CPU times say nothing about the kernels.

Timing: CUDA: median of `triton.testing.do_bench(return_mode="all")` (CUDA events around each call, L2 flushed before
each, so weights are read cold as in a forward pass; `--bench-ms` of repetitions). CPU: median of perf_counter samples
(at least 5, about `--bench-ms`). Before the shapes, a large device-to-device copy (1 GiB on CUDA, 64 MiB on CPU) is
timed the same way: copy bandwidth = 2 x bytes / time (read + write).

Results: one JSON (`--out`, default `benchmarks/results/quantized_linear_<device-slug>.json`, rewritten after every
shape so a killed run keeps what it measured):

  benchmark, created, complete, command, device {type, name, capability, torch_threads}, versions,
  settings {shapes, ms, group_size, bench_ms, timer, seed, tolerance, inner_k_tiles, rel_err_ok},
  copy_bandwidth {bytes, median_us, gbps},
  results: list of {n, k, m, configs: {name: entry}} where an entry is
      {"skipped": reason} | {"error": message, "traceback"} | {
        median_us            median time of one call (do_bench on CUDA)
        median_us_queued     CUDA only: the same with ~0.1 ms of GPU spin queued before each call, so that the
                             host's launch overhead is hidden as under CUDA graphs (see `queued_us`); much below
                             median_us means do_bench timed host overhead
        weight_bytes         bytes of the weight as this configuration stores it (codes + scales + zeros)
        weight_gbps          weight_bytes / median time, GB/s (1e9 bytes)
        fraction_of_copy_bw  weight_gbps / copy_bandwidth.gbps
        speedup_vs_bf16_cublas, speedup_vs_tinygemm   reference time / this time (> 1: faster); absent when the
                             reference has no time
        max_rel_err          max |y - ref| / max |ref| against this format's own reference (the quantized weight
                             dequantized in fp32, x in fp32: the kernel's correctness; tinygemm and Inductor are
                             checked against our int4 reference, so their times are for the same result)
        max_rel_err_vs_dense the same against x @ W.T with the dense fp32 weight (quantization error, for context)
        numerics_ok          max_rel_err <= settings.rel_err_ok
        thresholds           {gemv_max_m, dense_min_m} for the w4a16 / w8a16 ops (dense_min_m None: never)
        note                 e.g. that a CPU op timed its reference
      }
  targets: list of {name, config, n, k, m, value, limit, met, detail}; met is None where not evaluated (not a CUDA
      device, or the shape / M / config was not measured):
      - int4 g128 M=1: llmcompress-w4a16 <= 6 us at 4096x4096 and <= 10 us at 4096x11008 (N x K; on an H100);
      - at M=16 and every M >= 256, per shape: llmcompress-w4a16 no slower than bf16-cublas (time ratio
        <= 1 + --tolerance); `detail` also gives the fastest llmcompress-w4a16 path and whether it meets the target.

A Markdown table goes to stdout.

GPU (about 3-5 minutes, mostly Triton autotuning and 12 Inductor compiles; not yet measured):

    python benchmarks/quantized_linear.py

CPU smoke run (tiny shapes, about 20 s on 2 cores):

    python benchmarks/quantized_linear.py --out benchmarks/results/quantized_linear_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import run_backend as rb  # benchmarks/ is the script's directory, so on sys.path
import torch
import torch.nn.functional as F

from llmcompress.cost.device_profile import device_name
from llmcompress.formats import quantized as formats

GROUP_SIZE = 128
INNER_K_TILES = 8  # tinygemm's packing; torchao's default for int4 weight-only
NEVER = 2**62  # dense_min_m that never takes dequantize + cuBLAS
GEMV_MAX_M = 16
GPU_SHAPES = "4096x4096,11008x4096,4096x11008"  # N x K: q/k/v/o, gate/up, down of Llama-2-7B
CPU_SHAPES = "256x256,256x512"
GPU_MS = "1,16,256,4096"
CPU_MS = "1,16,256"
# max |y - ref| / max |ref| below which an output counts as the same result. bf16 rounds each output by up to 2**-9
# of its magnitude and the tensor-core paths round the dequantized weight to bf16; tinygemm also rounds our fp16
# scales and its zero' to bf16 (0.4 % measured on a CPU at 256x512). Wrong packing gives O(1).
REL_ERR_OK = 2e-2

CONFIGS = (
    "bf16-cublas",
    "tinygemm-int4",
    "llmcompress-w4a16",
    "llmcompress-w4a16-gemv",
    "llmcompress-w4a16-gemm",
    "llmcompress-w4a16-dequant-cublas",
    "llmcompress-w4a16-planned",
    "llmcompress-w8a16",
    "llmcompress-w8a8",
    "llmcompress-fp8",
    "inductor-dequant-int4",
)
W4_PATHS = {  # name -> (gemv_max_m, dense_min_m)
    "llmcompress-w4a16": (GEMV_MAX_M, NEVER),
    "llmcompress-w4a16-gemv": (GEMV_MAX_M, NEVER),
    "llmcompress-w4a16-gemm": (0, NEVER),
    "llmcompress-w4a16-dequant-cublas": (0, 1),
}
# (name, N, K, M, limit in us) for config llmcompress-w4a16
LATENCY_TARGETS = (("int4 g128 M=1 4096x4096 <= 6 us", 4096, 4096, 1, 6.0),
                   ("int4 g128 M=1 4096x11008 <= 10 us", 4096, 11008, 1, 10.0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", help=f"comma-separated NxK (default {GPU_SHAPES} on CUDA, {CPU_SHAPES} on CPU)")
    p.add_argument("--m", help=f"comma-separated row counts M (default {GPU_MS} on CUDA, {CPU_MS} on CPU)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of the configurations")
    p.add_argument("--bench-ms", type=int, help="repetition time per measurement (default 100 on CUDA, 50 on CPU)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="targets: 'no slower than bf16 cuBLAS' passes at a time ratio <= 1 + tolerance")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default 1 on a CPU, see run_backend.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/quantized_linear_<device-slug>.json)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    cuda = args.device.type == "cuda"
    args.shapes = [_shape(s) for s in (args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)).split(",") if s.strip()]
    args.m = [int(m) for m in (args.m or (GPU_MS if cuda else CPU_MS)).split(",") if m.strip()]
    args.configs = rb._subset(args.configs, CONFIGS, "--configs")
    args.bench_ms = args.bench_ms or (100 if cuda else 50)
    # Tiny CPU matmuls gain nothing from threads; on a shared 2-core machine OpenMP barriers made a 256x256 bf16
    # F.linear take 8 ms instead of ~50 us (2 threads, this repository's CI machine).
    if args.threads is None and not cuda:
        args.threads = 1
    return args


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected NxK, got {text!r}") from None
    if k % GROUP_SIZE or k % (INNER_K_TILES * 16) or n % 8:
        raise SystemExit(f"--shapes: {text}: K must be a multiple of {GROUP_SIZE} and N of 8 (int4 g128, tinygemm)")
    return n, k


def load_ops() -> dict[str, str]:
    """Import the kernel modules (which register the ops); {module: error} for those that fail."""
    import importlib

    errors = {}
    for name in ("int4_linear", "int8_linear", "w8a8_linear", "fp8_linear"):
        try:
            importlib.import_module(f"llmcompress.kernels.{name}")
        except Exception as e:  # noqa: BLE001 - a missing kernel skips its configurations only
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def bench_us(fn: Callable[[], Any], args: argparse.Namespace) -> float:
    """Median microseconds of one call (see the module docstring)."""
    if args.device.type == "cuda":
        from triton.testing import do_bench

        return statistics.median(do_bench(fn, warmup=25, rep=args.bench_ms, return_mode="all")) * 1e3
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + args.bench_ms / 1e3
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 10_000):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


# do_bench records its start event right after its L2 flush (a 256 MiB memset, ~0.1 ms on an H100); a call whose
# host-side work (custom-op dispatch, input checks, Triton's launcher: tens of us) outlasts the flush leaves the GPU
# idle inside the timed interval. `queued_us` puts ~0.1 ms of GPU spin (1.98 GHz boost clock) after each flush, so
# the GPU is still busy when the call's kernels arrive: host overhead hidden, as it is under CUDA graphs.
_SPIN_CYCLES = 200_000


def queued_us(fn: Callable[[], Any], args: argparse.Namespace, estimate_us: float) -> float:
    """CUDA: median microseconds of one call with the GPU queue kept ahead of the host (see _SPIN_CYCLES)."""
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=args.device)
    n = max(10, min(2000, int(args.bench_ms * 1e3 / (estimate_us + 200))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        cache.zero_()
        torch.cuda._sleep(_SPIN_CYCLES)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(args.device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth(args: argparse.Namespace) -> dict[str, float]:
    nbytes = 2**30 if args.device.type == "cuda" else 64 * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), args)
    return {"bytes": nbytes, "median_us": us, "gbps": 2 * nbytes / (us * 1e-6) / 1e9}


def nbytes(*tensors: torch.Tensor) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def tinygemm(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Our int4 weight in torch's tinygemm layout -> (x -> y, weight bytes). Raises where tinygemm is missing."""
    q = formats.unpack_int4(qweight).to(torch.int32)  # (N, K) codes in [0, 15]
    # tinygemm dequantizes (q - 8) * scale + zero'; ours is (q - zero) * scale = (q - 8) * scale + (8 - zero) * scale.
    s, z = scales.float(), zeros.float()
    scales_and_zeros = torch.stack((s, (8 - z) * s), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if q.device.type == "cuda":
        # CUDA packs uint8 (N, K / 2) with the even k in the high nibble (torchao: `q[:, ::2] << 4 | q[:, 1::2]`);
        # torch >= 2.5, unchanged through 2.13.
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous(),
                                                            INNER_K_TILES)
        mm = torch.ops.aten._weight_int4pack_mm
    else:
        # CPU (torch >= 2.6): int32 (N, K) codes, packed by the op itself; inner_k_tiles is ignored.
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    return (lambda x: mm(x, packed, group_size, scales_and_zeros)), nbytes(packed, scales_and_zeros)


def int4_dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """Plain torch: unpack our int4 format (formats.py), dequantize in fp32, round to x.dtype, matmul."""
    n = qweight.shape[0]
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).view(n, -1, group_size)  # (N, K / g, g)
    w = (q.float() - zeros.float()[..., None]) * scales.float()[..., None]
    return x @ w.view(n, -1).to(x.dtype).T


def planned_thresholds(n: int, k: int, tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[int, int]:
    """(gemv_max_m, dense_min_m) that quantize-linear's cost model picks for a w4a16 (N, K) bf16 layer here."""
    from llmcompress.cost.device_profile import load_profile
    from llmcompress.cost.hardware import resolve
    from llmcompress.cost.roofline import CostModel
    from llmcompress.passes.quantize.quantize_linear import _choose_kernels

    hw = resolve("auto", device)
    ctx = types.SimpleNamespace(cost_model=CostModel(hw, load_profile(hw)))
    gemv_max, dense_min, _ = _choose_kernels(ctx, n, k, torch.bfloat16, tensors)
    return gemv_max, dense_min


def w4_runner(x, qweight, scales, zeros, gemv_max: int, dense_min: int) -> Callable[[], torch.Tensor] | str:
    """On a CPU, the Triton launcher under TRITON_INTERPRET=1 at the given thresholds, or why it cannot run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from llmcompress.kernels.int4_linear import linear_w4a16_triton

        return lambda: linear_w4a16_triton(x, qweight, scales, zeros, GROUP_SIZE, None, None, gemv_max, dense_min)
    return "CPU: the op runs its plain-torch reference whatever the thresholds; the forced paths are Triton " \
           "kernels (CUDA, or TRITON_INTERPRET=1 for numerics)"


class Shape:
    """The weights of one N x K shape in every format, and their fp32 references."""

    def __init__(self, n: int, k: int, args: argparse.Namespace) -> None:
        g = torch.Generator(device=args.device).manual_seed(args.seed + n * 7 + k)
        self.n, self.k = n, k
        self.w = (torch.randn(n, k, device=args.device, generator=g) * 0.02).to(torch.bfloat16)
        self.w4 = formats.quantize_int4_rtn(self.w, GROUP_SIZE)  # qweight, scales, zeros
        self.w8 = formats.quantize_int8_per_channel(self.w)  # qweight, scale
        self.fp8 = formats.quantize_fp8_per_channel(self.w) if _fp8_ok(args.device) else None
        self.planned: tuple[int, int] | str
        try:
            self.planned = planned_thresholds(n, k, self.w4, args.device)
        except Exception as e:  # noqa: BLE001 - a private helper of the pass: report, do not stop
            self.planned = f"quantize_linear._choose_kernels failed: {type(e).__name__}: {e}"
        self._deq: dict[str, torch.Tensor] = {}

    def dequantized(self, fmt: str) -> torch.Tensor:
        """(N, K) fp32 weight as `fmt` stores it ('dense', 'w4', 'w8')."""
        if fmt not in self._deq:
            self._deq[fmt] = {"dense": lambda: self.w.float(),
                              "w4": lambda: formats.dequantize_int4(*self.w4, GROUP_SIZE),
                              "w8": lambda: formats.dequantize_int8(*self.w8)}[fmt]()
        return self._deq[fmt]


def _fp8_ok(device: torch.device) -> bool:
    if device.type == "cpu":
        return True  # the op's CPU path is its reference
    try:
        from llmcompress.kernels.fp8_linear import fp8_supported
    except Exception:  # noqa: BLE001
        return False
    return fp8_supported(device)


def build(name: str, s: Shape, x: torch.Tensor, args: argparse.Namespace, op_errors: dict[str, str]
          ) -> tuple[Callable[[], torch.Tensor], torch.Tensor, int, dict[str, Any]] | str:
    """-> (call, its reference output (fp32), weight bytes, extra fields), or the reason to skip."""
    m = x.shape[0]
    cpu = x.device.type == "cpu"
    extra: dict[str, Any] = {}
    ref4 = lambda: x.float() @ s.dequantized("w4").T  # noqa: E731
    w4_bytes = nbytes(*s.w4)
    if name == "bf16-cublas":
        w = s.w
        return (lambda: F.linear(x, w)), x.float() @ s.dequantized("dense").T, nbytes(w), extra
    if name == "tinygemm-int4":
        try:
            mm, wbytes = tinygemm(*s.w4, GROUP_SIZE)
        except (AttributeError, RuntimeError, NotImplementedError) as e:
            return f"torch's tinygemm int4 ops unavailable here: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return (lambda: mm(x)), ref4(), wbytes, extra
    if name == "inductor-dequant-int4":
        torch._dynamo.reset()  # one compile per (shape, M): keeps clear of Dynamo's recompile limit
        compiled = torch.compile(int4_dequant_linear, backend="inductor", dynamic=False)
        qweight, scales, zeros = s.w4
        return (lambda: compiled(x, qweight, scales, zeros, GROUP_SIZE)), ref4(), w4_bytes, extra
    if name.startswith("llmcompress-w4a16"):
        if "int4_linear" in op_errors:
            return f"llmcompress.kernels.int4_linear did not import: {op_errors['int4_linear']}"
        if name == "llmcompress-w4a16-planned":
            if isinstance(s.planned, str):
                return s.planned
            gemv_max, dense_min = s.planned
        else:
            gemv_max, dense_min = W4_PATHS[name]
        if name == "llmcompress-w4a16-gemv" and m > GEMV_MAX_M:
            return f"the GEMV kernel holds at most {GEMV_MAX_M} rows"
        extra["thresholds"] = {"gemv_max_m": gemv_max, "dense_min_m": None if dense_min >= NEVER else dense_min}
        if not cpu or name in ("llmcompress-w4a16", "llmcompress-w4a16-planned"):
            op = torch.ops.llmcompress.linear_w4a16
            qweight, scales, zeros = s.w4
            call = lambda: op(x, qweight, scales, zeros, GROUP_SIZE, None, None, gemv_max, dense_min)  # noqa: E731
            if cpu:
                extra["note"] = "CPU: the op runs its plain-torch reference"
        else:
            call = w4_runner(x, *s.w4, gemv_max, dense_min)
            if isinstance(call, str):
                return call
            extra["note"] = "CPU: Triton interpreter (numerics only)"
        return call, ref4(), w4_bytes, extra
    if name == "llmcompress-w8a16":
        if "int8_linear" in op_errors or not hasattr(torch.ops.llmcompress, "linear_w8a16"):
            return f"op llmcompress::linear_w8a16 not available: {op_errors.get('int8_linear', 'not registered')}"
        op = torch.ops.llmcompress.linear_w8a16
        qweight, scale = s.w8
        extra["thresholds"] = {"gemv_max_m": GEMV_MAX_M, "dense_min_m": None}
        if cpu:
            extra["note"] = "CPU: the op runs its plain-torch reference"
        return (lambda: op(x, qweight, scale, None, None, GEMV_MAX_M, NEVER)), x.float() @ s.dequantized("w8").T, \
            nbytes(qweight, scale), extra
    if name == "llmcompress-w8a8":
        if "w8a8_linear" in op_errors:
            return f"llmcompress.kernels.w8a8_linear did not import: {op_errors['w8a8_linear']}"
        from llmcompress.kernels.w8a8_linear import linear_w8a8_reference

        op = torch.ops.llmcompress.linear_w8a8
        qweight, scale = s.w8
        if cpu:
            extra["note"] = "CPU: the op runs its plain-torch reference"
        return (lambda: op(x, qweight, scale, None, None)), linear_w8a8_reference(x, qweight, scale).float(), \
            nbytes(qweight, scale), extra
    if name == "llmcompress-fp8":
        if "fp8_linear" in op_errors:
            return f"llmcompress.kernels.fp8_linear did not import: {op_errors['fp8_linear']}"
        if s.fp8 is None:
            cap = torch.cuda.get_device_capability(x.device)
            return f"fp8 e4m3 kernels need CUDA compute capability >= 8.9; this GPU has {cap[0]}.{cap[1]}"
        from llmcompress.kernels.fp8_linear import linear_fp8_reference

        op = torch.ops.llmcompress.linear_fp8
        qweight, scale = s.fp8
        if cpu:
            extra["note"] = "CPU: the op runs its plain-torch reference"
        return (lambda: op(x, qweight, scale, None)), linear_fp8_reference(x, qweight, scale).float(), \
            nbytes(qweight, scale), extra
    raise AssertionError(name)


def run_config(name: str, s: Shape, x: torch.Tensor, copy_gbps: float, args: argparse.Namespace,
               op_errors: dict[str, str]) -> dict[str, Any]:
    try:
        built = build(name, s, x, args, op_errors)
        if isinstance(built, str):
            return {"skipped": built}
        call, ref, wbytes, extra = built
        y = call()  # compiles / autotunes
        rb.sync(args.device)
        err = rel_err(y, ref)
        err_dense = rel_err(y, x.float() @ s.dequantized("dense").T)
        del y, ref
        us = bench_us(call, args)
        if args.device.type == "cuda":
            extra["median_us_queued"] = queued_us(call, args, us)
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}",
                "traceback": traceback.format_exc()[-4000:]}
    gbps = wbytes / (us * 1e-6) / 1e9
    return {"median_us": us, "weight_bytes": wbytes, "weight_gbps": gbps, "fraction_of_copy_bw": gbps / copy_gbps,
            "max_rel_err": err, "max_rel_err_vs_dense": err_dense, "numerics_ok": err <= REL_ERR_OK, **extra}


def add_speedups(configs: dict[str, dict[str, Any]]) -> None:
    for ref_name, key in (("bf16-cublas", "speedup_vs_bf16_cublas"), ("tinygemm-int4", "speedup_vs_tinygemm")):
        ref = configs.get(ref_name, {}).get("median_us")
        if ref is None:
            continue
        for r in configs.values():
            if "median_us" in r:
                r[key] = ref / r["median_us"]


def targets(doc: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    cuda = args.device.type == "cuda"
    by_key = {(r["n"], r["k"], r["m"]): r["configs"] for r in doc["results"]}
    out = []
    for label, n, k, m, limit in LATENCY_TARGETS:
        r = by_key.get((n, k, m), {}).get("llmcompress-w4a16", {})
        value = r.get("median_us")
        entry = {"name": label, "config": "llmcompress-w4a16", "n": n, "k": k, "m": m, "value": value, "limit": limit,
                 "met": None}
        if not cuda:
            entry["detail"] = "not evaluated: CPU smoke run (the op runs its reference); the target is for an H100"
        elif value is None:
            entry["detail"] = "not measured: " + (r.get("skipped") or r.get("error") or "shape / M not in this run")
        else:
            entry["met"] = value <= limit
            queued = r.get("median_us_queued")
            notes = [] if queued is None else [f"with host overhead hidden (median_us_queued): {queued:.2f} us, "
                                               f"met: {queued <= limit}"]
            if "H100" not in doc["device"]["name"]:
                notes.append(f"the limit is for an H100; this is {doc['device']['name']}")
            entry["detail"] = "; ".join(notes) or None
        out.append(entry)
    for (n, k, m), configs in by_key.items():
        if m != 16 and m < 256:
            continue
        mine = configs.get("llmcompress-w4a16", {}).get("median_us")
        ref = configs.get("bf16-cublas", {}).get("median_us")
        entry = {"name": f"int4 g128 M={m} {n}x{k} no slower than bf16 cuBLAS", "config": "llmcompress-w4a16",
                 "n": n, "k": k, "m": m, "value": None if mine is None or ref is None else mine / ref,
                 "limit": 1 + args.tolerance, "met": None}
        paths = {name: r["median_us"] for name, r in configs.items()
                 if name.startswith("llmcompress-w4a16") and "median_us" in r}
        if not cuda:
            entry["detail"] = "not evaluated: CPU smoke run (the op runs its reference)"
        elif entry["value"] is None:
            entry["detail"] = "not measured"
        else:
            entry["met"] = entry["value"] <= entry["limit"]
            best = min(paths, key=paths.get)
            entry["detail"] = f"time ratio to bf16-cublas {entry['value']:.3f}; fastest w4a16 path {best} " \
                              f"({paths[best]:.2f} us, ratio {paths[best] / ref:.3f}, " \
                              f"met: {paths[best] / ref <= entry['limit']})"
        out.append(entry)
    return out


def markdown(doc: dict[str, Any]) -> str:
    bw = doc["copy_bandwidth"]
    lines = [f"**{doc['device']['name']}**, torch {doc['versions']['torch']}, triton {doc['versions']['triton']}; "
             f"bf16 activations, int4 group {GROUP_SIZE}; copy bandwidth {bw['gbps']:.0f} GB/s "
             f"({bw['bytes'] / 2**20:.0f} MiB).", "",
             "| N x K | M | config | us | us, queued | weight GB/s | of copy bw | vs bf16-cublas | vs tinygemm "
             "| max rel err |", "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in doc["results"]:
        for name, e in r["configs"].items():
            head = f"| {r['n']}x{r['k']} | {r['m']} | {name} |"
            if "median_us" not in e:
                why = e.get("skipped") or e.get("error", "")
                lines.append(f"{head} {'skipped' if 'skipped' in e else 'error'}: {' '.join(why.split())[:90]} "
                             "| | | | | | |")
                continue
            sp = [f"{e[k]:.2f}x" if k in e else "-" for k in ("speedup_vs_bf16_cublas", "speedup_vs_tinygemm")]
            flag = "" if e["numerics_ok"] else " (!)"
            queued = f"{e['median_us_queued']:.2f}" if "median_us_queued" in e else "-"
            lines.append(f"{head} {e['median_us']:.2f} | {queued} | {e['weight_gbps']:.0f} | "
                         f"{e['fraction_of_copy_bw']:.0%} | {sp[0]} | {sp[1]} | {e['max_rel_err']:.2e}{flag} |")
    lines += ["", f"Speedup = reference time / config time. (!) = max rel err > {REL_ERR_OK} (not the same result).",
              "", "Targets:"]
    for t in doc.get("targets", []):
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"- {t['name']}: value {value} (limit {t['limit']}), met: {t['met']}"
                     + (f"; {t['detail']}" if t.get("detail") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = Path(args.out) if args.out else rb.RESULTS_DIR / f"quantized_linear_{rb.device_slug(args.device)}.json"
    op_errors = load_ops()
    cuda = args.device.type == "cuda"
    doc: dict[str, Any] = {
        "benchmark": "quantized_linear",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": {"type": args.device.type, "name": device_name(args.device),
                   "capability": list(torch.cuda.get_device_capability(args.device)) if cuda else None,
                   "torch_threads": torch.get_num_threads()},
        "versions": rb.versions(),
        "settings": {"shapes": [f"{n}x{k}" for n, k in args.shapes], "ms": args.m, "group_size": GROUP_SIZE,
                     "bench_ms": args.bench_ms, "seed": args.seed, "tolerance": args.tolerance,
                     "inner_k_tiles": INNER_K_TILES, "rel_err_ok": REL_ERR_OK,
                     "timer": "triton.testing.do_bench median" if cuda else "perf_counter median",
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "kernel_import_errors": op_errors,
        "results": [],
    }
    with torch.inference_mode():
        doc["copy_bandwidth"] = copy_bandwidth(args)
        print(f"copy bandwidth: {doc['copy_bandwidth']['gbps']:.0f} GB/s", file=sys.stderr, flush=True)
        for n, k in args.shapes:
            s = Shape(n, k, args)
            for m in args.m:
                x = torch.randn(m, k, device=args.device, generator=torch.Generator(device=args.device).manual_seed(
                    args.seed + m), dtype=torch.float32).to(torch.bfloat16)
                configs: dict[str, dict[str, Any]] = {}
                for name in args.configs:
                    r = run_config(name, s, x, doc["copy_bandwidth"]["gbps"], args, op_errors)
                    configs[name] = r
                    status = r.get("skipped") or r.get("error") or \
                        f"{r['median_us']:.2f} us, max rel err {r['max_rel_err']:.1e}"
                    print(f"[{n}x{k} M={m}] {name}: {' '.join(status.split())[:160]}", file=sys.stderr, flush=True)
                add_speedups(configs)
                doc["results"].append({"n": n, "k": k, "m": m, "configs": configs})
                rb.write(doc, out_path)
            del s
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    torch._dynamo.reset()
    doc["targets"] = targets(doc, args)
    doc["complete"] = True
    rb.write(doc, out_path)
    print(markdown(doc))
    print(f"\nwritten: {out_path}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
