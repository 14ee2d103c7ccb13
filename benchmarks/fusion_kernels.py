"""Fused RMSNorm, SwiGLU and rotary kernels beside Inductor's and eager's, side by side in one process: `main`.

Kernels (`--kernels`), each as Hugging Face's Llama code computes it, per token count T (`--tokens`):

  rms_norm   transformers' `LlamaRMSNorm(hidden, eps=1e-6)` (weight random around 1) on x (T, hidden)
  swiglu     `F.silu(gate) * up` on gate, up (T, intermediate)
  rotary     transformers' `apply_rotary_pos_emb(q, k, cos, sin)` on q, k (1, heads, T, head_dim) and cos, sin
             (1, T, head_dim) (HF's Llama rotary table, base 10000, in the input dtype, for positions
             ROPE_START..ROPE_START+T-1: at position 0 the rotation is the identity, which would test nothing)

Sizes: Llama-2-7B's (hidden 4096, intermediate 11008, 32 heads of 128) and T = 1, 512, 4096 on a GPU; with `--smoke`
or on a CPU, tiny ones that are not multiples of any block size (hidden 200, intermediate 344, 4 heads of 64,
T = 1, 5). Inputs are random normal (seeded), bf16 by default (`--dtype`).

Configurations (`--configs`), each compiled afresh (`torch._dynamo.reset()`, `dynamic=False`) per kernel and T:

  eager               the function as it is
  inductor            torch.compile(backend="inductor")
  llmcompress         torch.compile(backend="llmcompress")  (default recipe, fusion passes, lowered with Inductor)
  llmcompress-triton  torch.compile(backend="llmcompress", options={"lowering": "triton"})  (our generated kernels)

Numerics: every output is compared with eager's by `torch.testing.assert_close` at the dtype's tolerance (TOLERANCE;
bf16: atol 2e-2, rtol 1.6e-2: eager rounds its intermediates to bf16, a fused kernel does not) and with a float64
run of the same function on the same inputs (`max_abs_err_vs_fp64`, eager included, so one can see whether a fused
kernel is closer to exact than eager). A mismatch is recorded (`matches_eager` false, `mismatch`), never raised.

Timing: CUDA: median of `triton.testing.do_bench(return_mode="all")` (L2 flushed before each call, inputs read cold;
`--bench-ms`), plus `median_us_queued` (quantized_linear.queued_us: the GPU kept busy ahead of the host, so that
Dynamo's guards and the launch overhead are hidden as they are under CUDA graphs; at T=1 the plain median is mostly
host overhead). CPU: median of perf_counter samples (at least 5, about `--bench-ms`); on a CPU the Triton lowering
runs under the Triton interpreter (this script sets TRITON_INTERPRET=1 there unless it is set), so CPU times say
only that every path runs.

Bytes moved = every input read once + every output written once, from the tensors themselves (the RMSNorm weight
included, cos/sin at their stored (1, T, head_dim) size); GB/s = bytes / median time (1e9 bytes);
`fraction_of_copy_bw` = that over the device bandwidth measured in the same run by a device-to-device copy (1 GiB on
CUDA, 64 MiB on CPU; quantized_linear.copy_bandwidth: 2 x bytes / time, timed the same way).

Results: one JSON (`--out`, default `benchmarks/results/fusion_kernels_<device-slug>.json`, `..._tiny_<device-slug>`
with `--smoke` or on a CPU; rewritten after every kernel and T so that a killed run keeps what it measured):

  benchmark, created, complete, command, device {type, name, torch_threads}, versions, settings {dtype, dims, tokens,
  bench_ms, timer, seed, tolerance, triton_interpret}, copy_bandwidth {bytes, median_us, gbps},
  results: list of {kernel, tokens, shapes {input: [sizes]}, bytes, configs: {name: entry}}, an entry being
      {"error": message, "traceback"} | {
        median_us, median_us_queued (CUDA), first_call_s (compile + first run), gbps, fraction_of_copy_bw,
        gbps_queued, fraction_of_copy_bw_queued (CUDA), speedup_vs {eager, inductor} (reference time / this time),
        matches_eager, mismatch (assert_close's message, when false), max_abs_err_vs_eager, max_abs_err_vs_fp64,
        llmcompress {lowerings, fallbacks, passes: [{name, status, stats}]} (from the compile report: which lowering
        really ran, and what the passes did), llmcompress_fallbacks (FallbackWarning messages)
      }
  summary: per kernel and T, llmcompress-triton's and llmcompress's time ratio to inductor (`<= 1 + --tolerance`: ok;
      null on a CPU, where it judges nothing)

A Markdown table goes to stdout.

    python benchmarks/fusion_kernels.py            # GPU, ~3-4 min (36 small compiles), not yet measured
    python benchmarks/fusion_kernels.py --smoke    # CPU, tiny shapes, ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _cpu_run(argv: list[str]) -> bool:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device")
    known, _ = p.parse_known_args(argv)
    return not (known.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when llmcompress is imported: set it first, so that
# the Triton lowering's kernels can run on CPU tensors.
if __name__ == "__main__" and _cpu_run(sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import quantized_linear as ql  # noqa: E402  (benchmarks/ is the script's directory, so on sys.path)
import run_backend as rb  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb  # noqa: E402

from llmcompress.cost.device_profile import device_name  # noqa: E402

KERNELS = ("rms_norm", "swiglu", "rotary")
CONFIGS: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "inductor": {"backend": "inductor"},
    "llmcompress": {"backend": "llmcompress"},
    "llmcompress-triton": {"backend": "llmcompress", "options": {"lowering": "triton"}},
}
REFERENCES = ("eager", "inductor")
# Llama-2-7B's sizes, and tiny ones that no block size divides.
GPU_DIMS = {"hidden": 4096, "intermediate": 11008, "heads": 32, "head_dim": 128}
SMOKE_DIMS = {"hidden": 200, "intermediate": 344, "heads": 4, "head_dim": 64}
GPU_TOKENS = "1,512,4096"  # decode, a prefill, and enough rows (32-90 MB per tensor) to be bandwidth-bound
SMOKE_TOKENS = "1,5"
# (atol, rtol) of "equals eager". bf16: one bf16 ulp is 2**-8 relative (0.4 %); eager rounds each intermediate, a fused
# kernel only its output, and rotary's q * cos + rotate_half(q) * sin may cancel, leaving an O(1)-sized rounding error
# on a small result: hence an absolute term of a few ulps of O(1) values.
TOLERANCE = {"bfloat16": (2e-2, 1.6e-2), "float16": (2e-3, 1e-3), "float32": (1e-5, 1.3e-6)}
RMS_EPS = 1e-6  # LlamaConfig's default rms_norm_eps, as run_backend.py's models use
ROPE_START = 37  # first rotary position: a decode step's, after a prompt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats (implied on a CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--tokens", help=f"comma-separated token counts (default {GPU_TOKENS}; smoke: {SMOKE_TOKENS})")
    p.add_argument("--bench-ms", type=int, help="repetition time per measurement (default 100; smoke: 10)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="summary: 'no slower than inductor' passes at a time ratio <= 1 + tolerance")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default 1 on a CPU, see run_backend.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default benchmarks/results/fusion_kernels_[tiny_]<device-slug>.json)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.smoke = args.smoke or args.device.type != "cuda"
    args.dims = SMOKE_DIMS if args.smoke else GPU_DIMS
    args.tokens = [int(t) for t in (args.tokens or (SMOKE_TOKENS if args.smoke else GPU_TOKENS)).split(",")
                   if t.strip()]
    if not args.tokens or min(args.tokens) < 1:
        raise SystemExit(f"--tokens: expected positive integers, got {args.tokens}")
    args.kernels = rb._subset(args.kernels, KERNELS, "--kernels")
    args.configs = rb._subset(args.configs, tuple(CONFIGS), "--configs")
    args.bench_ms = args.bench_ms or (10 if args.smoke else 100)
    args.dtype_name, args.dtype = args.dtype, getattr(torch, args.dtype)
    if args.threads is None and args.device.type == "cpu":
        args.threads = 1
    return args


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return apply_rotary_pos_emb(q, k, cos, sin)


def rotary_table(tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, T, head_dim) as LlamaRotaryEmbedding makes them (default rope, base 1e4), from ROPE_START."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(ROPE_START, ROPE_START + tokens, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_case(kernel: str, tokens: int, args: argparse.Namespace
              ) -> tuple[Callable[..., Any], Callable[..., Any], tuple[torch.Tensor, ...]]:
    """-> (the function to compile, its float64 twin, inputs). Each input is read by the kernel; no zeros."""
    d = args.dims
    g = torch.Generator(device=args.device).manual_seed(args.seed + tokens * 31 + KERNELS.index(kernel))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=args.device, generator=g).to(args.dtype)

    if kernel == "rms_norm":
        norm = LlamaRMSNorm(d["hidden"], eps=RMS_EPS).to(args.device, args.dtype).requires_grad_(False)
        norm.weight.copy_(1 + 0.1 * torch.randn(d["hidden"], device=args.device, generator=g))
        norm64 = LlamaRMSNorm(d["hidden"], eps=RMS_EPS).to(args.device, torch.float64).requires_grad_(False)
        norm64.weight.copy_(norm.weight)
        return norm, norm64, (randn(tokens, d["hidden"]),)
    if kernel == "swiglu":
        return swiglu, swiglu, (randn(tokens, d["intermediate"]), randn(tokens, d["intermediate"]))
    if kernel == "rotary":
        cos, sin = rotary_table(tokens, d["head_dim"], args.dtype, args.device)
        q, k = (randn(1, d["heads"], tokens, d["head_dim"]) for _ in range(2))
        return rotary, rotary, (q, k, cos, sin)
    raise AssertionError(kernel)


def outputs(y: Any) -> tuple[torch.Tensor, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def bytes_moved(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], y: Any) -> int:
    params = tuple(fn.parameters()) if isinstance(fn, torch.nn.Module) else ()
    return ql.nbytes(*inputs, *params, *outputs(y))


def max_abs_err(y: Any, ref: Any) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(outputs(y), outputs(ref)))


def reset() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_report(kwargs: dict[str, Any] | None, name: str, kernel: str, tokens: int, report_dir: str
                ) -> dict[str, Any] | None:
    if kwargs is None or kwargs["backend"] != "llmcompress":
        return kwargs
    path = str(Path(report_dir) / f"{kernel}_{tokens}_{name}.json")
    return {**kwargs, "options": {**kwargs.get("options", {}), "report": path}}


def run_config(name: str, kernel: str, tokens: int, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...],
               eager_y: Any, ref64: Any, nbytes: int, copy_gbps: float, report_dir: str, args: argparse.Namespace
               ) -> dict[str, Any]:
    kwargs = with_report(CONFIGS[name], name, kernel, tokens, report_dir)
    reset()
    result: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call_fn = fn if kwargs is None else torch.compile(fn, dynamic=False, **kwargs)
            t0 = time.perf_counter()
            y = call_fn(*inputs)
            rb.sync(args.device)
            result["first_call_s"] = round(time.perf_counter() - t0, 3)
            atol, rtol = TOLERANCE[args.dtype_name]
            try:
                for a, b in zip(outputs(y), outputs(eager_y), strict=True):
                    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
                result["matches_eager"] = True
            except AssertionError as e:
                result["matches_eager"] = False
                result["mismatch"] = " ".join(str(e).split())[:600]
            result["max_abs_err_vs_eager"] = max_abs_err(y, eager_y)
            result["max_abs_err_vs_fp64"] = max_abs_err(y, ref64)
            del y
            us = ql.bench_us(lambda: call_fn(*inputs), args)
            result["median_us"] = us
            result["gbps"] = nbytes / (us * 1e-6) / 1e9
            result["fraction_of_copy_bw"] = result["gbps"] / copy_gbps
            if args.device.type == "cuda":
                queued = ql.queued_us(lambda: call_fn(*inputs), args, us)
                result["median_us_queued"] = queued
                result["gbps_queued"] = nbytes / (queued * 1e-6) / 1e9
                result["fraction_of_copy_bw_queued"] = result["gbps_queued"] / copy_gbps
        except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
            result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"
            result["traceback"] = traceback.format_exc()[-4000:]
    fallbacks = sorted({str(w.message) for w in caught if type(w.message).__name__ == "FallbackWarning"})
    if fallbacks:
        result["llmcompress_fallbacks"] = fallbacks
    report = rb.report_summary(kwargs)
    if report is not None:
        result["llmcompress"] = {"lowerings": report["lowerings"], "fallbacks": report["fallbacks"],
                                 "passes": [{k: p.get(k) for k in ("name", "status", "stats", "error") if p.get(k)}
                                            for p in report["passes"]]}
    return result


def add_speedups(configs: dict[str, dict[str, Any]]) -> None:
    for r in configs.values():
        if "median_us" in r:
            r["speedup_vs"] = {ref: configs[ref]["median_us"] / r["median_us"] for ref in REFERENCES
                               if "median_us" in configs.get(ref, {})}


def summary(doc: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for r in doc["results"]:
        ref = r["configs"].get("inductor", {}).get("median_us")
        for name in ("llmcompress-triton", "llmcompress"):
            mine = r["configs"].get(name, {})
            if ref is None or "median_us" not in mine:
                continue
            ratio = mine["median_us"] / ref
            # On a CPU the Triton lowering runs in the interpreter: a ratio, but nothing to judge.
            out.append({"kernel": r["kernel"], "tokens": r["tokens"], "config": name, "reference": "inductor",
                        "time_ratio": ratio, "ok": ratio <= 1 + args.tolerance if args.device.type == "cuda" else None,
                        "matches_eager": mine.get("matches_eager")})
    return out


def markdown(doc: dict[str, Any]) -> str:
    bw = doc["copy_bandwidth"]
    cuda = doc["device"]["type"] == "cuda"
    lines = [f"**{doc['device']['name']}**, torch {doc['versions']['torch']}, triton {doc['versions']['triton']}; "
             f"{doc['settings']['dtype']}, dims {doc['settings']['dims']}; copy bandwidth {bw['gbps']:.0f} GB/s "
             f"({bw['bytes'] / 2**20:.0f} MiB).", "",
             "| kernel | T | bytes | config | us | " + ("us, queued | " if cuda else "") + "GB/s | of copy bw | "
             "vs eager | vs inductor | = eager | max err vs fp64 |",
             "|---|--:|--:|---|--:|" + ("--:|" if cuda else "") + "--:|--:|--:|--:|---|--:|"]
    for r in doc["results"]:
        for name, e in r["configs"].items():
            head = f"| {r['kernel']} | {r['tokens']} | {r['bytes']} | {name} |"
            if "median_us" not in e:
                why = e.get("error", "not measured")
                lines.append(f"{head} error: {' '.join(why.split())[:100]} |" + " |" * (7 if cuda else 6))
                continue
            sp = [f"{e['speedup_vs'][k]:.2f}x" if k in e.get("speedup_vs", {}) else "-" for k in REFERENCES]
            queued = f" {e['median_us_queued']:.2f} |" if cuda else ""
            frac = e.get("fraction_of_copy_bw_queued", e["fraction_of_copy_bw"])
            lines.append(f"{head} {e['median_us']:.2f} |{queued} {e['gbps']:.1f} | {frac:.1%} | {sp[0]} | {sp[1]} | "
                         f"{'yes' if e['matches_eager'] else 'NO'} | {e['max_abs_err_vs_fp64']:.2e} |")
    lines += ["", "Speedup = reference time / config time. Fraction of copy bandwidth: "
              + ("from the queued time (host overhead hidden)." if cuda else "from the median time."), ""]
    for s in doc.get("summary", []):
        lines.append(f"- {s['kernel']} T={s['tokens']}: {s['config']} / inductor time ratio {s['time_ratio']:.3f} "
                     f"(ok: {s['ok']}; equals eager: {s['matches_eager']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    slug = rb.device_slug(args.device)
    out_path = Path(args.out) if args.out else \
        rb.RESULTS_DIR / f"fusion_kernels_{'tiny_' if args.smoke else ''}{slug}.json"
    cuda = args.device.type == "cuda"
    doc: dict[str, Any] = {
        "benchmark": "fusion_kernels",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": {"type": args.device.type, "name": device_name(args.device),
                   "torch_threads": torch.get_num_threads()},
        "versions": rb.versions(),
        "settings": {"dtype": args.dtype_name, "dims": args.dims, "tokens": args.tokens,
                     "bench_ms": args.bench_ms, "seed": args.seed, "tolerance": args.tolerance,
                     "equal_eager_tolerance": dict(zip(("atol", "rtol"), TOLERANCE[args.dtype_name])),
                     "timer": "triton.testing.do_bench median" if cuda else "perf_counter median",
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "configs": {n: CONFIGS[n] for n in args.configs},
        "results": [],
    }
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="fusion_kernels_") as report_dir:
        doc["copy_bandwidth"] = ql.copy_bandwidth(args)
        print(f"copy bandwidth: {doc['copy_bandwidth']['gbps']:.0f} GB/s", file=sys.stderr, flush=True)
        copy_gbps = doc["copy_bandwidth"]["gbps"]
        for kernel in args.kernels:
            for tokens in args.tokens:
                fn, fn64, inputs = make_case(kernel, tokens, args)
                eager_y = fn(*inputs)
                ref64 = fn64(*(t.double() for t in inputs))
                entry: dict[str, Any] = {"kernel": kernel, "tokens": tokens,
                                         "shapes": [list(t.shape) for t in inputs],
                                         "bytes": bytes_moved(fn, inputs, eager_y), "configs": {}}
                for name in args.configs:
                    r = run_config(name, kernel, tokens, fn, inputs, eager_y, ref64, entry["bytes"], copy_gbps,
                                   report_dir, args)
                    entry["configs"][name] = r
                    status = r.get("error") or f"{r['median_us']:.2f} us, {r['gbps']:.1f} GB/s, " \
                                               f"equals eager: {r['matches_eager']}"
                    print(f"[{kernel} T={tokens}] {name}: {' '.join(status.split())[:200]}", file=sys.stderr,
                          flush=True)
                add_speedups(entry["configs"])
                doc["results"].append(entry)
                rb.write(doc, out_path)
                del fn, fn64, inputs, eager_y, ref64
        reset()
    doc["summary"] = summary(doc, args)
    doc["complete"] = True
    rb.write(doc, out_path)
    print(markdown(doc))
    print(f"\nwritten: {out_path}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
