"""2:4 sparse linear kernels beside bf16 cuBLAS, torch's semi-structured path and our int4 GEMV: `main`.

One process; per shape (N x K) a random bf16 weight (std 0.02, seeded) pruned by a random 2:4 mask (which two of four
are kept does not change a kernel's time), bf16 activations x (M, K), no bias. Per (shape, M) every configuration runs
on the same x:

  bf16-cublas             F.linear(x, W) on the masked dense bf16 weight (cuBLAS; a CPU's matmul in the smoke run)
  semi-structured         F.linear(x, to_sparse_semi_structured(W)): torch's cuSPARSELt/CUTLASS path (CUDA only)
  llmcompress-2of4        torch.ops.llmcompress.linear_2of4 (values + metadata, `formats/sparse.py`), GEMV for M <= 16
  llmcompress-2of4-gemm   the same op forced onto its tile-expanding GEMM (gemv_max_m=0)
  llmcompress-w4a16       torch.ops.llmcompress.linear_w4a16, our int4 g128 GEMV/GEMM on the masked weight quantized
                          by round to nearest (dense int4: the codes of the zeros are stored too)
  llmcompress-2of4-w4a16  torch.ops.llmcompress.linear_2of4_w4a16 on the same codes, scales and zeros, 2:4-packed
  planned                 what `kernels/sparse_path.choose_sparse_path` picks for this layer and M on this device
                          (cost model with the device's profile): the 2:4 op, semi-structured or bf16 cuBLAS

Decode step: the seven linears of one Llama-2-7B decoder layer (q, k, v, o 4096x4096; gate, up 11008x4096; down
4096x11008) at M = 1, run back to back: bf16-cublas, semi-structured, llmcompress-2of4, planned, llmcompress-w4a16,
llmcompress-2of4-w4a16. Attention, norms and the residual adds are not sparsified and are left out: at decode with
a short context the linears' weights are nearly all of a layer's bytes.

Timing: CUDA: median of `triton.testing.do_bench` (L2 flushed before each call) and `median_us_queued` (the GPU
kept busy ahead of the host, as under CUDA graphs; the targets use it); helpers from `quantized_linear.py`. The
smoke run (`--smoke`, a CPU under TRITON_INTERPRET=1, tiny shapes, group size 32) runs the Triton launchers in the
interpreter: it checks numerics and the JSON, its times say nothing.

Results: JSON (`--out`, default `benchmarks/results/sparse_linear_<device-slug>.json`): benchmark, created,
complete, command, device, versions, settings, copy_bandwidth, results [{n, k, m, configs: {name: {median_us,
median_us_queued, weight_bytes, max_rel_err, speedup_vs_bf16_cublas, speedup_vs_w4a16, kernel}}}], decode_step
{configs: {...}}, targets [{name, value, limit, met, detail}] (met None where not evaluated: not CUDA, or smoke):
  - llmcompress-2of4 M = 1 on 4096x4096 and 11008x4096: >= 1.5x faster than bf16-cublas; M = 16: >= 1.2x;
  - llmcompress-2of4-w4a16 M = 1: >= 1.25x faster than llmcompress-w4a16 (our int4 GEMV);
  - decode step, planned (sparse-2of4): <= 0.7x of bf16-cublas.

    python benchmarks/sparse_linear.py                          # GPU, about 2-4 minutes (Triton autotuning)
    TRITON_INTERPRET=1 python benchmarks/sparse_linear.py --smoke   # CPU, about a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import quantized_linear as ql  # benchmarks/ is the script's directory, so on sys.path
import run_backend as rb
import torch
import torch.nn.functional as F

import llmcompress.kernels  # noqa: F401 - registers the ops
from llmcompress.cost.device_profile import device_name
from llmcompress.formats import quantized as q4
from llmcompress.formats.sparse import pack_2of4, pack_2of4_int4
from llmcompress.kernels import sparse_linear
from llmcompress.kernels.int4_linear import linear_w4a16_triton
from llmcompress.kernels.sparse_path import choose_sparse_path
from llmcompress.testing.numerics import random_2of4_mask

GPU_SHAPES = "4096x4096,11008x4096"
GPU_MS = "1,16"
SMOKE_SHAPES = "128x128,352x128"
SMOKE_MS = "1,5,20"
# Llama-2-7B: hidden 4096, intermediate 11008; the smoke run's tiny layer: 128, 352.
LAYER = {"q": "h x h", "k": "h x h", "v": "h x h", "o": "h x h", "gate": "i x h", "up": "i x h", "down": "h x i"}
CONFIGS = ("bf16-cublas", "semi-structured", "llmcompress-2of4", "llmcompress-2of4-gemm", "llmcompress-w4a16",
           "llmcompress-2of4-w4a16", "planned")
STEP_CONFIGS = ("bf16-cublas", "semi-structured", "llmcompress-2of4", "planned", "llmcompress-w4a16",
                "llmcompress-2of4-w4a16")
# bf16 rounds each output by up to 2**-9 of its magnitude; a wrong layout gives O(1).
REL_ERR_OK = 2e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, group size 32 (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--shapes", help=f"comma-separated NxK (default {GPU_SHAPES}; --smoke {SMOKE_SHAPES})")
    p.add_argument("--m", help=f"comma-separated row counts (default {GPU_MS}; --smoke {SMOKE_MS})")
    p.add_argument("--bench-ms", type=int, help="repetition time per measurement (default 100 on CUDA, 20 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/sparse_linear_<device-slug>.json)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if not cuda and not args.smoke:
        raise SystemExit("sparse_linear: a CPU runs only the smoke run (--smoke with TRITON_INTERPRET=1): the ops run "
                         "their references there, so their times say nothing")
    if args.smoke and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("sparse_linear --smoke on a CPU needs TRITON_INTERPRET=1 (the Triton kernels interpreted)")
    args.shapes = [tuple(int(v) for v in s.lower().split("x"))
                   for s in (args.shapes or (SMOKE_SHAPES if args.smoke else GPU_SHAPES)).split(",")]
    args.m = [int(m) for m in (args.m or (SMOKE_MS if args.smoke else GPU_MS)).split(",")]
    args.group_size = 32 if args.smoke else 128
    args.hidden, args.intermediate = (128, 352) if args.smoke else (4096, 11008)
    args.bench_ms = args.bench_ms or (100 if cuda else 20)
    args.threads = 1  # quantized_linear.bench_us's CPU timer reads it only through args
    return args


class Layer:
    """One (N, K) 2:4-pruned bf16 weight in every stored form, and the fp32 reference weight."""

    def __init__(self, n: int, k: int, args: argparse.Namespace, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        mask = random_2of4_mask(n, k, seed)
        w = (torch.randn(n, k, generator=g) * 0.02 * mask).to(torch.bfloat16)
        scales, zeros = q4.int4_scales_zeros(w.float(), args.group_size)
        scales = scales.half().clamp_min(torch.finfo(torch.float16).tiny)
        zeros = zeros.half()
        codes = q4.quantize_int4(w.float(), scales, zeros, args.group_size)
        dev = args.device
        self.n, self.k, self.gs = n, k, args.group_size
        self.w = w.to(dev)
        self.values, self.meta = (t.to(dev) for t in pack_2of4(w))
        self.q4 = (q4.pack_int4(codes).to(dev), scales.to(dev), zeros.to(dev))
        qv, meta4, _, _ = pack_2of4_int4(codes, mask, scales, zeros, args.group_size)
        self.q24 = (qv.to(dev), meta4.to(dev), scales.to(dev), zeros.to(dev))
        self.ref = w.float().to(dev)
        self.ref_w4 = q4.dequantize_int4(*self.q4, args.group_size).to(dev)
        self.semi = None
        self.semi_error = None
        if dev.type == "cuda":
            try:
                from torch.sparse import to_sparse_semi_structured

                self.semi = to_sparse_semi_structured(self.w)
            except Exception as e:  # noqa: BLE001 - the configuration is skipped with the reason
                self.semi_error = f"{type(e).__name__}: {e}"
        else:
            self.semi_error = "torch's semi-structured path needs CUDA"

    def runner(self, name: str, x: torch.Tensor, args: argparse.Namespace) -> tuple[Callable[[], torch.Tensor], int,
                                                                                 torch.Tensor, str | None]:
        """(call, weight bytes, reference weight, kernel note) of one configuration; raises LookupError to skip."""
        interp = x.device.type == "cpu"  # smoke: the launchers in the interpreter, not the ops' references
        m = x.shape[0]
        if name == "planned":
            path = choose_sparse_path(planned_cost_model(args.device), self.n, self.k, x.dtype, x.device, "2of4")
            kernel = path.kernel_at(m)
            name = {"gemv": "llmcompress-2of4", "gemm": "llmcompress-2of4", "reference": "bf16-cublas",
                    "semi-structured": "semi-structured", "dense (masked)": "bf16-cublas"}[kernel]
            fn, nb, ref, _ = self.runner(name, x, args)
            return fn, nb, ref, kernel
        if name == "bf16-cublas":
            return (lambda: F.linear(x, self.w)), ql.nbytes(self.w), self.ref, None
        if name == "semi-structured":
            if self.semi is None:
                raise LookupError(self.semi_error)
            return (lambda: F.linear(x, self.semi)), ql.nbytes(self.values, self.meta), self.ref, None
        if name in ("llmcompress-2of4", "llmcompress-2of4-gemm"):
            gemv = 0 if name.endswith("gemm") else 16
            op = sparse_linear.linear_2of4_triton if interp else torch.ops.llmcompress.linear_2of4
            return (lambda: op(x, self.values, self.meta, None, gemv)), ql.nbytes(self.values, self.meta), \
                self.ref, None
        if name == "llmcompress-w4a16":
            if interp:
                return (lambda: linear_w4a16_triton(x, *self.q4, self.gs)), ql.nbytes(*self.q4), self.ref_w4, None
            return (lambda: torch.ops.llmcompress.linear_w4a16(x, *self.q4, self.gs)), ql.nbytes(*self.q4), \
                self.ref_w4, None
        if name == "llmcompress-2of4-w4a16":
            op = sparse_linear.linear_2of4_w4a16_triton if interp else torch.ops.llmcompress.linear_2of4_w4a16
            return (lambda: op(x, *self.q24, self.gs)), ql.nbytes(*self.q24), self.ref_w4, None
        raise ValueError(f"unknown configuration {name!r}")


_COST_MODELS: dict[str, Any] = {}


def planned_cost_model(device: torch.device):
    """The cost model a compile would use on this device (with its calibration profile when there is one)."""
    if str(device) not in _COST_MODELS:
        from llmcompress.cost.device_profile import load_profile
        from llmcompress.cost.hardware import resolve
        from llmcompress.cost.roofline import CostModel

        hw = resolve("auto", device)
        _COST_MODELS[str(device)] = CostModel(hw, load_profile(hw))
    return _COST_MODELS[str(device)]


def measure(fns: list[Callable[[], torch.Tensor]], args: argparse.Namespace) -> dict[str, float]:
    def call():
        for fn in fns:
            fn()

    if args.smoke and args.device.type == "cpu":
        t0 = time.perf_counter()  # one call: interpreted kernels take seconds and their times say nothing
        call()
        return {"median_us": (time.perf_counter() - t0) * 1e6}
    us = ql.bench_us(call, args)
    out = {"median_us": us}
    if args.device.type == "cuda":
        out["median_us_queued"] = ql.queued_us(call, args, us)
    return out


def run_config(name: str, layer: Layer, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    try:
        fn, weight_bytes, ref_w, kernel = layer.runner(name, x, args)
    except LookupError as e:
        return {"skipped": str(e)}
    try:
        y = fn()
        ref = x.float() @ ref_w.T
        entry = {**measure([fn], args), "weight_bytes": weight_bytes, "max_rel_err": ql.rel_err(y, ref)}
        entry["numerics_ok"] = entry["max_rel_err"] <= REL_ERR_OK
        if kernel:
            entry["kernel"] = kernel
        return entry
    except Exception as e:  # noqa: BLE001 - one configuration's failure is recorded, the run goes on
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def timed(entry: dict[str, Any]) -> float | None:
    return entry.get("median_us_queued", entry.get("median_us"))


def add_speedups(configs: dict[str, dict[str, Any]]) -> None:
    for base, key in (("bf16-cublas", "speedup_vs_bf16_cublas"), ("llmcompress-w4a16", "speedup_vs_w4a16")):
        t0 = timed(configs.get(base, {}))
        for entry in configs.values():
            if t0 and timed(entry):
                entry[key] = t0 / timed(entry)


def decode_step(args: argparse.Namespace) -> dict[str, Any]:
    sizes = {"h": args.hidden, "i": args.intermediate}
    layers = {}
    for i, (name, shape) in enumerate(LAYER.items()):
        n, k = (sizes[s] for s in shape.split(" x "))
        layers[name] = Layer(n, k, args, args.seed + 1000 + i)
    g = torch.Generator().manual_seed(args.seed + 99)
    xs = {k: torch.randn(1, k, generator=g).to(args.device, torch.bfloat16) for k in {args.hidden, args.intermediate}}
    configs = {}
    for name in STEP_CONFIGS:
        try:
            runs = [layer.runner(name, xs[layer.k], args) for layer in layers.values()]
        except LookupError as e:
            configs[name] = {"skipped": str(e)}
            continue
        try:
            configs[name] = {**measure([r[0] for r in runs], args), "weight_bytes": sum(r[1] for r in runs)}
            kernels = [r[3] for r in runs if r[3]]
            if kernels:
                configs[name]["kernels"] = dict(zip(layers, kernels))
        except Exception as e:  # noqa: BLE001
            configs[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    add_speedups(configs)
    return {"layer": {k: v.replace("h", str(args.hidden)).replace("i", str(args.intermediate))
                      for k, v in LAYER.items()}, "m": 1, "configs": configs}


def targets(doc: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    evaluate = args.device.type == "cuda" and not args.smoke
    out = []

    def add(name, entry, key, limit, at_least=True):
        value = entry.get(key) if entry else None
        met = None if not evaluate or value is None else (value >= limit if at_least else value <= limit)
        detail = None if evaluate else "not evaluated: smoke run (the targets are for an H100)"
        out.append({"name": name, "value": value, "limit": limit, "met": met, "detail": detail})

    for r in doc["results"]:
        if (r["n"], r["k"]) not in ((4096, 4096), (11008, 4096)):
            continue
        c = r["configs"]
        if r["m"] in (1, 16):
            add(f"linear_2of4 {r['n']}x{r['k']} M={r['m']} vs bf16 cuBLAS", c.get("llmcompress-2of4"),
                "speedup_vs_bf16_cublas", 1.5 if r["m"] == 1 else 1.2)
        if r["m"] == 1:
            add(f"linear_2of4_w4a16 {r['n']}x{r['k']} M=1 vs our int4 GEMV", c.get("llmcompress-2of4-w4a16"),
                "speedup_vs_w4a16", 1.25)
    step = doc.get("decode_step", {}).get("configs", {})
    planned, dense = step.get("planned", {}), step.get("bf16-cublas", {})
    ratio = timed(planned) / timed(dense) if timed(planned) and timed(dense) else None
    add("Llama-2-7B decode step linears, sparse-2of4 (planned) / bf16", {"ratio": ratio}, "ratio", 0.7,
        at_least=False)
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| N x K | M | config | us | weight MB | x bf16 | x w4a16 | rel err |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(f"{r['n']}x{r['k']}", r["m"], r["configs"]) for r in doc["results"]]
    rows.append(("decode step", 1, doc.get("decode_step", {}).get("configs", {})))
    for shape, m, configs in rows:
        for name, e in configs.items():
            if "skipped" in e or "error" in e:
                lines.append(f"| {shape} | {m} | {name} | {(e.get('skipped') or e['error'])[:60]} | | | | |")
                continue

            def f(v, fmt=".2f"):
                return "" if v is None else format(v, fmt)
            lines.append(f"| {shape} | {m} | {name} | {f(timed(e))} | {f(e['weight_bytes'] / 1e6)} | "
                         f"{f(e.get('speedup_vs_bf16_cublas'))} | {f(e.get('speedup_vs_w4a16'))} | "
                         f"{f(e.get('max_rel_err'), '.1e')} |")
    lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['limit']} | {t['met']} |" for t in doc["targets"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads if args.device.type == "cpu" else torch.get_num_threads())
    slug = rb.device_slug(args.device) + ("_smoke" if args.smoke else "")
    out_path = Path(args.out) if args.out else rb.RESULTS_DIR / f"sparse_linear_{slug}.json"
    cuda = args.device.type == "cuda"
    doc: dict[str, Any] = {
        "benchmark": "sparse_linear",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": {"type": args.device.type, "name": device_name(args.device),
                   "capability": list(torch.cuda.get_device_capability(args.device)) if cuda else None},
        "versions": rb.versions(),
        "settings": {"shapes": [f"{n}x{k}" for n, k in args.shapes], "ms": args.m, "group_size": args.group_size,
                     "bench_ms": args.bench_ms, "seed": args.seed, "rel_err_ok": REL_ERR_OK, "smoke": args.smoke,
                     "timer": "triton.testing.do_bench median (+ queued)" if cuda else "perf_counter median",
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "results": [],
    }
    with torch.inference_mode():
        doc["copy_bandwidth"] = ql.copy_bandwidth(args)
        for n, k in args.shapes:
            layer = Layer(n, k, args, args.seed + n * 7 + k)
            for m in args.m:
                g = torch.Generator().manual_seed(args.seed + m)
                x = torch.randn(m, k, generator=g).to(args.device, torch.bfloat16)
                configs = {name: run_config(name, layer, x, args) for name in CONFIGS}
                add_speedups(configs)
                for name, e in configs.items():
                    status = e.get("skipped") or e.get("error") or f"{timed(e):.2f} us, rel err {e['max_rel_err']:.1e}"
                    print(f"[{n}x{k} M={m}] {name}: {' '.join(status.split())[:160]}", file=sys.stderr, flush=True)
                doc["results"].append({"n": n, "k": k, "m": m, "configs": configs})
                rb.write(doc, out_path)
        doc["decode_step"] = decode_step(args)
    doc["targets"] = targets(doc, args)
    doc["complete"] = True
    rb.write(doc, out_path)
    print(markdown(doc))
    print(f"\nwritten: {out_path}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
