"""The low-rank linear op (`llmcompress::linear_lowrank`) beside dense bf16 cuBLAS and two separate F.linear calls.

One process; per shape (N x K) and rank r random bf16 factors V (r, K) ~ N(0, 1/K), U (N, r) ~ N(0, 1/r) (seeded;
values do not change a kernel's time) and the dense bf16 weight W = U V, bf16 activations x (M, K), no bias. Per
(shape, M) every configuration runs on the same x:

  bf16-cublas          F.linear(x, W): the dense layer (cuBLAS; a CPU's matmul in the smoke run)
  two-linears          F.linear(F.linear(x, V), U): the split as two separate cuBLAS GEMMs (t through memory)
  llmcompress-lowrank  torch.ops.llmcompress.linear_lowrank(x, V, U): the fused kernel for M <= 16 (t on chip,
                       `kernels/lowrank_linear.py`), two GEMMs above
  llmcompress-lowrank-ut  the same op with U stored (r, N) and passed as its transpose view: the fused kernel reads
                       U along N (coalesced) instead of BLOCK_R elements per row
  planned              what `kernels/lowrank_path.choose_lowrank_path` says for this layer and M on this device
                       (cost model with the device's profile): the op where the split pays, else bf16-cublas

Decode step: the seven linears of one Llama-2-7B decoder layer (q, k, v, o 4096x4096; gate, up 11008x4096; down
4096x11008) at M = 1 with 60 % of their parameters kept, r per layer = 0.6·NK/(N+K) (1228 and 1791), run back to
back: bf16-cublas, two-linears, llmcompress-lowrank, planned. Attention, norms and residual adds are left out: at
decode with a short context the linears' weights are nearly all of a layer's bytes.

Timing: CUDA: median of `triton.testing.do_bench` (L2 flushed before each call) and `median_us_queued` (the GPU
kept busy ahead of the host, as under CUDA graphs; the targets use it); helpers from `quantized_linear.py`. The smoke
run (`--smoke`, a CPU under TRITON_INTERPRET=1, tiny shapes) runs the Triton launcher in the interpreter: it checks
numerics and the JSON, its times say nothing.

Results: JSON (`--out`, default `benchmarks/results/lowrank_linear_<device-slug>.json`): benchmark, created,
complete, command, device, versions, settings, copy_bandwidth, results [{n, k, r, m, configs: {name: {median_us,
median_us_queued, weight_bytes, max_rel_err, speedup_vs_bf16_cublas, speedup_vs_two_linears, kernel}}}],
decode_step {configs: {...}}, targets [{name, value, limit, met, detail}] (met None where not evaluated: not CUDA,
or smoke):
  - llmcompress-lowrank on 4096x4096 at r = 1024: >= 1.7x faster than bf16-cublas at M = 1, >= 1.4x at M = 16;
  - decode step at 60 % kept, llmcompress-lowrank: >= 1.3x faster than bf16-cublas.

    python benchmarks/lowrank_linear.py                              # GPU, about a minute (Triton autotuning)
    TRITON_INTERPRET=1 python benchmarks/lowrank_linear.py --smoke   # CPU, about a minute
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
from llmcompress.kernels import lowrank_linear
from llmcompress.kernels.lowrank_path import choose_lowrank_path

GPU_SHAPES = "4096x4096:1024"
GPU_MS = "1,16,256"
SMOKE_SHAPES = "128x128:32,352x128:40"
SMOKE_MS = "1,5,20"
KEPT = 0.6
LAYER = {"q": "h x h", "k": "h x h", "v": "h x h", "o": "h x h", "gate": "i x h", "up": "i x h", "down": "h x i"}
CONFIGS = ("bf16-cublas", "two-linears", "llmcompress-lowrank", "llmcompress-lowrank-ut", "planned")
# bf16 rounds each output by up to 2**-9 of its magnitude (and t once more in two-linears); a wrong kernel gives O(1).
REL_ERR_OK = 2e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--shapes", help=f"comma-separated NxK:r (default {GPU_SHAPES}; --smoke {SMOKE_SHAPES})")
    p.add_argument("--m", help=f"comma-separated row counts (default {GPU_MS}; --smoke {SMOKE_MS})")
    p.add_argument("--bench-ms", type=int, help="repetition time per measurement (default 100 on CUDA, 20 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/lowrank_linear_<device-slug>.json)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if not cuda and not args.smoke:
        raise SystemExit("lowrank_linear: a CPU runs only the smoke run (--smoke with TRITON_INTERPRET=1); the CPU "
                         "speed of a split model is measured through the backend on a fixture model")
    if args.smoke and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("lowrank_linear --smoke on a CPU needs TRITON_INTERPRET=1 (the Triton kernel interpreted)")
    shapes = []
    for s in (args.shapes or (SMOKE_SHAPES if args.smoke else GPU_SHAPES)).split(","):
        nk, r = s.lower().split(":")
        n, k = (int(v) for v in nk.split("x"))
        shapes.append((n, k, int(r)))
    args.shapes = shapes
    args.m = [int(m) for m in (args.m or (SMOKE_MS if args.smoke else GPU_MS)).split(",")]
    args.hidden, args.intermediate = (128, 352) if args.smoke else (4096, 11008)
    args.bench_ms = args.bench_ms or (100 if cuda else 20)
    args.threads = 1  # quantized_linear.bench_us's CPU timer reads it only through args
    return args


def kept_rank(n: int, k: int, kept: float = KEPT) -> int:
    """The rank that keeps `kept` of an (N, K) layer's parameters: r (N + K) = kept · N K."""
    return int(kept * n * k / (n + k))


class Layer:
    """One (N, K) layer at rank r: bf16 factors, the dense bf16 weight U V, and the fp32 reference weight."""

    def __init__(self, n: int, k: int, r: int, args: argparse.Namespace, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(r, k, generator=g) / k ** 0.5
        u = torch.randn(n, r, generator=g) / r ** 0.5
        dev = args.device
        self.n, self.k, self.r = n, k, r
        self.v, self.u = v.to(dev, torch.bfloat16), u.to(dev, torch.bfloat16)
        self.u_t = self.u.T.contiguous().T  # (N, r) view of U stored (r, N)
        self.ref = (self.u.float() @ self.v.float())
        self.w = self.ref.to(torch.bfloat16)

    def runner(self, name: str, x: torch.Tensor, args: argparse.Namespace
               ) -> tuple[Callable[[], torch.Tensor], int, str | None]:
        """(call, weight bytes, kernel note) of one configuration."""
        m = x.shape[0]
        if name == "planned":
            path = choose_lowrank_path(planned_cost_model(args.device), self.n, self.k, self.r, x.dtype, x.device)
            if not path.pays_at(m):
                fn, nb, _ = self.runner("bf16-cublas", x, args)
                return fn, nb, "dense"
            interp = x.device.type == "cpu"
            op = lowrank_linear.linear_lowrank_triton if interp else torch.ops.llmcompress.linear_lowrank
            return (lambda: op(x, self.v, self.u, None, path.fused_max_m)), ql.nbytes(self.v, self.u), \
                path.kernel_at(m)
        if name == "bf16-cublas":
            return (lambda: F.linear(x, self.w)), ql.nbytes(self.w), None
        if name == "two-linears":
            return (lambda: F.linear(F.linear(x, self.v), self.u)), ql.nbytes(self.v, self.u), None
        if name in ("llmcompress-lowrank", "llmcompress-lowrank-ut"):
            # smoke: the launcher in the interpreter (the op's CPU kernel is the two linears)
            interp = x.device.type == "cpu"
            op = lowrank_linear.linear_lowrank_triton if interp else torch.ops.llmcompress.linear_lowrank
            u = self.u_t if name.endswith("-ut") else self.u
            return (lambda: op(x, self.v, u)), ql.nbytes(self.v, u), \
                "fused" if m <= lowrank_linear.FUSED_MAX_M else "two-linears"
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
        fn, weight_bytes, kernel = layer.runner(name, x, args)
        y = fn()
        entry = {**measure([fn], args), "weight_bytes": weight_bytes,
                 "max_rel_err": ql.rel_err(y, x.float() @ layer.ref.T)}
        entry["numerics_ok"] = entry["max_rel_err"] <= REL_ERR_OK
        if kernel:
            entry["kernel"] = kernel
        return entry
    except Exception as e:  # noqa: BLE001 - one configuration's failure is recorded, the run goes on
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def timed(entry: dict[str, Any]) -> float | None:
    return entry.get("median_us_queued", entry.get("median_us"))


def add_speedups(configs: dict[str, dict[str, Any]]) -> None:
    for base, key in (("bf16-cublas", "speedup_vs_bf16_cublas"), ("two-linears", "speedup_vs_two_linears")):
        t0 = timed(configs.get(base, {}))
        for entry in configs.values():
            if t0 and timed(entry):
                entry[key] = t0 / timed(entry)


def decode_step(args: argparse.Namespace) -> dict[str, Any]:
    sizes = {"h": args.hidden, "i": args.intermediate}
    layers = {}
    for i, (name, shape) in enumerate(LAYER.items()):
        n, k = (sizes[s] for s in shape.split(" x "))
        layers[name] = Layer(n, k, kept_rank(n, k), args, args.seed + 1000 + i)
    g = torch.Generator().manual_seed(args.seed + 99)
    xs = {k: torch.randn(1, k, generator=g).to(args.device, torch.bfloat16) for k in {args.hidden, args.intermediate}}
    configs = {}
    for name in CONFIGS:
        try:
            runs = [layer.runner(name, xs[layer.k], args) for layer in layers.values()]
            configs[name] = {**measure([r[0] for r in runs], args), "weight_bytes": sum(r[1] for r in runs)}
            kernels = [r[2] for r in runs if r[2]]
            if kernels:
                configs[name]["kernels"] = dict(zip(layers, kernels))
        except Exception as e:  # noqa: BLE001
            configs[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    add_speedups(configs)
    return {"layer": {k: v.replace("h", str(args.hidden)).replace("i", str(args.intermediate))
                      for k, v in LAYER.items()},
            "ranks": {name: layer.r for name, layer in layers.items()}, "kept": KEPT, "m": 1, "configs": configs}


def targets(doc: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    evaluate = args.device.type == "cuda" and not args.smoke
    out = []

    def add(name, entry, key, limit):
        value = entry.get(key) if entry else None
        met = None if not evaluate or value is None else value >= limit
        detail = None if evaluate else "not evaluated: smoke run (the targets are for an H100)"
        out.append({"name": name, "value": value, "limit": limit, "met": met, "detail": detail})

    for res in doc["results"]:
        if (res["n"], res["k"], res["r"]) == (4096, 4096, 1024) and res["m"] in (1, 16):
            add(f"linear_lowrank 4096x4096 r=1024 M={res['m']} vs bf16 cuBLAS", res["configs"].get(
                "llmcompress-lowrank"), "speedup_vs_bf16_cublas", 1.7 if res["m"] == 1 else 1.4)
    step = doc.get("decode_step", {}).get("configs", {})
    add("Llama-2-7B decode step linears at 60 % kept, linear_lowrank vs bf16", step.get("llmcompress-lowrank"),
        "speedup_vs_bf16_cublas", 1.3)
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| N x K | r | M | config | us | weight MB | x bf16 | x two-linears | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [(f"{r['n']}x{r['k']}", r["r"], r["m"], r["configs"]) for r in doc["results"]]
    rows.append(("decode step", f"{doc['decode_step']['kept']:.0%} kept", 1, doc["decode_step"]["configs"]))
    for shape, r, m, configs in rows:
        for name, e in configs.items():
            if "error" in e:
                lines.append(f"| {shape} | {r} | {m} | {name} | {e['error'][:60]} | | | | |")
                continue

            def f(v, fmt=".2f"):
                return "" if v is None else format(v, fmt)
            lines.append(f"| {shape} | {r} | {m} | {name} | {f(timed(e))} | {f(e['weight_bytes'] / 1e6)} | "
                         f"{f(e.get('speedup_vs_bf16_cublas'))} | {f(e.get('speedup_vs_two_linears'))} | "
                         f"{f(e.get('max_rel_err'), '.1e')} |")
    lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['limit']} | {t['met']} |" for t in doc["targets"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads if args.device.type == "cpu" else torch.get_num_threads())
    slug = rb.device_slug(args.device) + ("_smoke" if args.smoke else "")
    out_path = Path(args.out) if args.out else rb.RESULTS_DIR / f"lowrank_linear_{slug}.json"
    cuda = args.device.type == "cuda"
    doc: dict[str, Any] = {
        "benchmark": "lowrank_linear",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": {"type": args.device.type, "name": device_name(args.device),
                   "capability": list(torch.cuda.get_device_capability(args.device)) if cuda else None},
        "versions": rb.versions(),
        "settings": {"shapes": [f"{n}x{k}:{r}" for n, k, r in args.shapes], "ms": args.m, "bench_ms": args.bench_ms,
                     "seed": args.seed, "rel_err_ok": REL_ERR_OK, "smoke": args.smoke, "kept": KEPT,
                     "timer": "triton.testing.do_bench median (+ queued)" if cuda else "perf_counter, one call",
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "results": [],
    }
    with torch.inference_mode():
        doc["copy_bandwidth"] = ql.copy_bandwidth(args)
        for n, k, r in args.shapes:
            layer = Layer(n, k, r, args, args.seed + n * 7 + k)
            for m in args.m:
                g = torch.Generator().manual_seed(args.seed + m)
                x = torch.randn(m, k, generator=g).to(args.device, torch.bfloat16)
                configs = {name: run_config(name, layer, x, args) for name in CONFIGS}
                add_speedups(configs)
                for name, e in configs.items():
                    status = e.get("error") or f"{timed(e):.2f} us, rel err {e['max_rel_err']:.1e}"
                    print(f"[{n}x{k} r={r} M={m}] {name}: {' '.join(status.split())[:160]}", file=sys.stderr,
                          flush=True)
                doc["results"].append({"n": n, "k": k, "r": r, "m": m, "configs": configs})
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
