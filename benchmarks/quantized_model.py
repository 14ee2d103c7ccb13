"""The Llama-2-7B-shaped model with w4a16 / w8a16 beside bf16 Inductor: decode latency, generate, memory: `main`.

Configurations (`--configs`, all by default), each compiled on a fresh model (so that released weights are measured):

  inductor-cudagraphs           torch.compile(backend="inductor", mode="reduce-overhead")   (bf16)
  llmcompress-cudagraphs        torch.compile(backend="llmcompress", options={"mode": "reduce-overhead"})
                                (default recipe: no quantization)
  llmcompress-w8a16-cudagraphs  options={"recipe": "w8a16", "mode": "reduce-overhead"}
  llmcompress-w4a16-cudagraphs  options={"recipe": "w4a16", "mode": "reduce-overhead"}

On a CPU the same configurations run without CUDA graphs (no mode) and are named without `-cudagraphs`.

Model (`--model`): `llama2-7b` is run_backend.py's Llama-2-7B shape (`run_backend.build_model`: random bf16 weights,
seeded, built directly on the device, sdpa, eval, no grad); `tiny` (default on a CPU) is the same family at hidden 128,
intermediate 384, 2 layers, 4 heads, vocab 512: run_backend's own `tiny` has K = 64 and 172, which no int4 group of
128 divides, so quantize-linear would leave every layer dense. Everything runs under `torch.inference_mode()`.

Workloads (`--workloads`), each timed exactly as run_backend.py times it, with its functions:

  forward   One decode step after an eager 32-token prefill into a StaticCache (`run_backend.decode_step`: batch 1,
            one token, cache position reset after each call). The first call compiles (and quantizes); two more warm
            up; then CUDA: median of `triton.testing.do_bench` over `--bench-ms`; CPU: median of `--forward-repeats`
            perf_counter samples (`run_backend.time_ms`). Memory (CUDA): `torch.cuda.memory_allocated` before the
            model is built, after it is built, after the prefill (the static KV cache), after compiling and one call
            (these configs set release_weights: the dense weights are then freed), after timing, and
            `max_memory_allocated` from the build through the first call (dense and quantized copies coexist while
            compiling). The logits of the timed step are compared with the eager bf16 model's (same weights).
  generate  `run_backend.run_generate`: `model.generate(max_new_tokens=--new-tokens, do_sample=False,
            cache_implementation="static", compile_config=CompileConfig(...))`, batch 1, tokens/s over `--repeats`
            calls after an untimed compiling call; greedy tokens compared with eager's (quantized ones are expected to
            differ). The quantization recipes run here with `release_weights: False`: transformers runs generate's
            prefill eagerly on the model's own weights (only the decode steps are compiled), so with released weights
            every generate after the first would fail. The compiled decode steps are the same.

`--gptq-time`: on a fresh model, times the first call of `torch.compile(model, backend="llmcompress",
options={"recipe": "w4a16-gptq", "calibration": ids, "calibration_samples": S, "calibration_seq_len": L})` on a
plain forward of the first calibration window (1 x L): capture, GPTQ calibration (layers quantized in graph order on the activations
of the already-quantized layers), lowering and the call, in seconds. ids: S x L random token ids (`--gptq-samples`,
`--gptq-seq-len`; 128 x 512 on CUDA, 4 x 64 on a CPU). The report's per-layer counts show every linear got GPTQ.

Results: one JSON (`--out`, default `benchmarks/results/quantized_model_<model>_<device-slug>.json`, rewritten
after every configuration so that a killed run keeps what it measured):

  benchmark, created, complete, command, device, versions, model {name, dtype, parameters, config}, settings,
  configs {name: torch.compile kwargs},
  results {forward | generate: {config: entry}}; every entry: compile (the kwargs used, report path included),
      dynamo {unique_graphs, graph_breaks, cudagraph_skips}, quantization {graphs, layers (quantize-linear's stats
      summed: e.g. "w4a16 rtn": 224, "skipped: skip pattern": 1), released_weights {count, bytes}} for llmcompress,
      llmcompress_report (run_backend.report_summary), peak_memory_gib (CUDA), and "error"/"traceback" on failure;
    forward: first_call_s, median_ms, samples_ms, max_abs_logit_diff_vs_eager, max_rel_logit_diff_vs_eager
      (max |diff| / max |eager logit|), argmax_equal_eager, speedup_vs {inductor-cudagraphs: its ms / this ms},
      memory_gib {before_build, model, kv_cache, after_first_call, peak_through_first_call, after_timing} (CUDA);
    generate: first_call_s, new_tokens, median_s, tokens_per_s, samples_s, tokens, tokens_equal_eager,
      first_divergence, speedup_vs {...};
  gptq (with --gptq-time): samples, seq_len, compile_and_first_call_s, quantize_linear_time_s (the pass's own
      time in the report), lowering_time_s, quantization {...}, max_rel_logit_diff_vs_eager, peak_memory_gib;
  targets: [{name, value, limit, met, detail}]: w4a16 decode step <= 1.8 ms (an H100), GPTQ compile <= 600 s (a GPU);
      met is None where not evaluated (CPU, or not measured);
  checks: cudagraphs_not_skipped {workload/config: bool} (Inductor really ran the -cudagraphs configurations under
      CUDA graphs), quantized_layers {workload/config: quantize-linear's per-scheme layer counts};
  kernel_import_errors {module: error} for kernel modules that did not import.

A Markdown table goes to stdout.

GPU (Llama-2-7B shape; each configuration builds the model and compiles it once per workload):

    python benchmarks/quantized_model.py --workloads forward
    python benchmarks/quantized_model.py --workloads generate --configs inductor-cudagraphs,llmcompress-w4a16-cudagraphs
    python benchmarks/quantized_model.py --workloads none --gptq-time

CPU smoke run (tiny model, about 45 s on 2 cores, mostly compilation):

    python benchmarks/quantized_model.py --model tiny --gptq-time
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import run_backend as rb  # benchmarks/ is the script's directory, so on sys.path
import torch
from quantized_linear import load_ops

from llmcompress.cost.device_profile import device_name

# run_backend's tiny, widened so that int4 groups of 128 divide every K (128 and 384).
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512)
MODEL_NAMES = {"llama2-7b": "llama2-7b", "tiny": "tiny-g128"}  # --model -> run_backend.MODELS key

CONFIGS: dict[str, dict[str, Any]] = {
    "inductor-cudagraphs": {"backend": "inductor", "mode": "reduce-overhead"},
    "llmcompress-cudagraphs": {"backend": "llmcompress", "options": {"mode": "reduce-overhead"}},
    "llmcompress-w8a16-cudagraphs": {"backend": "llmcompress",
                                     "options": {"recipe": "w8a16", "mode": "reduce-overhead",
                                                 "release_weights": True}},
    "llmcompress-w4a16-cudagraphs": {"backend": "llmcompress",
                                     "options": {"recipe": "w4a16", "mode": "reduce-overhead",
                                                 "release_weights": True}},
}
REFERENCE = "inductor-cudagraphs"
W4A16 = "llmcompress-w4a16-cudagraphs"
WORKLOADS = ("forward", "generate")
FORWARD_TARGET_MS = 1.8  # w4a16 decode step, Llama-2-7B shape, H100
GPTQ_TARGET_S = 600.0  # w4a16-gptq compile with 128 x 512 calibration tokens, GPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL_NAMES), help="default: llama2-7b on CUDA, tiny on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}, or 'none' (e.g. with --gptq-time)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)} "
                   "(the names without -cudagraphs are accepted too)")
    p.add_argument("--prompt-len", type=int, default=32, help="prefill length before the timed decode / generate")
    p.add_argument("--new-tokens", type=int, help="max_new_tokens of generate (default 128 on CUDA, 8 on CPU)")
    p.add_argument("--repeats", type=int, help="timed generate calls after the warm-up (default 3)")
    p.add_argument("--forward-repeats", type=int, default=50, help="CPU only: timed decode steps")
    p.add_argument("--bench-ms", type=int, default=500, help="CUDA only: do_bench repetition time per configuration")
    p.add_argument("--gptq-time", action="store_true", help="also time compiling with recipe w4a16-gptq")
    p.add_argument("--gptq-samples", type=int, help="calibration windows (default 128 on CUDA, 4 on CPU)")
    p.add_argument("--gptq-seq-len", type=int, help="tokens per calibration window (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (default: 1 for the tiny model on CPU, else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-samples", action="store_true", help="leave the per-call samples out of the JSON")
    p.add_argument("--report-dir", help="where the llmcompress compile reports go (default: a temporary folder)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/quantized_model_<model>_<device-slug>.json)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if cuda and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.model_arg = args.model or ("llama2-7b" if cuda else "tiny")
    args.model = MODEL_NAMES[args.model_arg]
    args.new_tokens = args.new_tokens or (128 if cuda else 8)
    args.repeats = args.repeats or 3
    args.gptq_samples = args.gptq_samples or (128 if cuda else 4)
    args.gptq_seq_len = args.gptq_seq_len or (512 if cuda else 64)
    if args.threads is None and args.model == "tiny-g128" and not cuda:
        args.threads = 1  # see run_backend.parse_args: OpenMP barriers on a shared 2-core machine
    args.workloads = [] if args.workloads.strip() == "none" else rb._subset(args.workloads, WORKLOADS, "--workloads")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    names = [n if n in CONFIGS else f"{n}-cudagraphs" for n in names]
    args.configs = rb._subset(",".join(names), tuple(CONFIGS), "--configs")
    args.report_dir = args.report_dir or tempfile.mkdtemp(prefix="llmcompress-quantized-model-")
    return args


def active_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """name -> torch.compile kwargs on this device: without CUDA graphs (and the suffix) off CUDA."""
    out = {}
    for name in args.configs:
        kwargs = json.loads(json.dumps(CONFIGS[name]))  # a deep copy
        if args.device.type != "cuda":
            name = name.removesuffix("-cudagraphs")
            kwargs.pop("mode", None)
            kwargs.get("options", {}).pop("mode", None)
            if kwargs.get("options") == {}:
                del kwargs["options"]
        out[name] = kwargs
    return out


def recipe_of(kwargs: dict[str, Any]) -> str | None:
    return kwargs.get("options", {}).get("recipe") if kwargs["backend"] == "llmcompress" else None


def fresh_model(args: argparse.Namespace):
    """run_backend.build_model, outside inference mode even when called inside it: the backend caches quantized
    weights keyed on each weight's version counter, which inference tensors do not have (quantize-linear fails with
    "Inference tensors do not track version counter" on a model built under torch.inference_mode())."""
    with torch.inference_mode(False):
        return rb.build_model(args)


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 4)


def allocated(args: argparse.Namespace) -> int:
    return torch.cuda.memory_allocated(args.device) if args.device.type == "cuda" else 0


def release_memory(args: argparse.Namespace) -> None:
    """Drop compiled code (CUDA-graph trees included), reports and cached allocator blocks."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    from llmcompress.backend.compile_report import reset_reports

    reset_reports()
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


def quantization_summary(report_path: str | None) -> dict[str, Any] | None:
    """quantize-linear's stats summed over the report's graphs, and the weights released."""
    if not report_path or not Path(report_path).exists():
        return None
    report = json.loads(Path(report_path).read_text())
    layers: dict[str, int] = {}
    statuses, errors, released = [], [], {"count": 0, "bytes": 0}
    for g in report["graphs"]:
        for p in g.get("passes", []):
            if p.get("name") != "quantize-linear":
                continue
            statuses.append(p.get("status"))
            if p.get("error"):
                errors.append(p["error"])
            for k, v in (p.get("stats") or {}).items():
                if isinstance(v, (int, float)):
                    layers[k] = layers.get(k, 0) + v
        for k in ("count", "bytes"):
            released[k] += (g.get("released_weights") or {}).get(k, 0)
    pass_times = [p.get("time_s") or 0.0 for g in report["graphs"] for p in g.get("passes", [])
                  if p.get("name") == "quantize-linear"]
    return {"graphs": len(report["graphs"]), "statuses": statuses, "errors": errors, "layers": layers,
            "released_weights": {"count": released["count"], "bytes": released["bytes"],
                                 "gib": gib(released["bytes"])},
            "quantize_linear_time_s": round(sum(pass_times), 3),
            "lowering_time_s": round(sum(g.get("lowering_time_s") or 0.0 for g in report["graphs"]), 3)}


def check_quantized(kwargs: dict[str, Any], result: dict[str, Any]) -> None:
    """Raise unless a quantization recipe really quantized (a failing pass leaves the graph dense, with a warning:
    timing that would measure bf16 under a w4a16 name)."""
    recipe = recipe_of(kwargs)
    summary = quantization_summary(kwargs.get("options", {}).get("report"))
    result["quantization"] = summary
    if recipe in (None, "default"):
        return
    scheme = recipe.split("-")[0]
    done = sum(v for k, v in (summary or {}).get("layers", {}).items() if k.startswith(scheme))
    if not done:
        raise RuntimeError(f"recipe {recipe}: quantize-linear quantized no layer (report: {summary})")


def logit_diff(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    diff = (logits - reference).abs().max().item()
    return {"max_abs_logit_diff_vs_eager": diff,
            "max_rel_logit_diff_vs_eager": diff / max(reference.abs().max().item(), 1e-30),
            "argmax_equal_eager": bool(torch.equal(logits.argmax(-1), reference.argmax(-1)))}


def run_forward(kwargs: dict[str, Any], prompt: torch.Tensor, reference: torch.Tensor, args: argparse.Namespace
                ) -> dict[str, Any]:
    """run_backend.run_forward on a fresh model, with memory readings and the quantization check."""
    cuda = args.device.type == "cuda"
    mem: dict[str, float] = {}
    result: dict[str, Any] = {}
    before = allocated(args)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    model = fresh_model(args)
    rb.sync(args.device)
    built = allocated(args)
    step_model = torch.compile(model, **kwargs)
    step = rb.decode_step(model, step_model, prompt, args)  # eager prefill into a fresh static cache
    rb.sync(args.device)
    prefilled = allocated(args)
    t0 = time.perf_counter()
    step()
    rb.sync(args.device)
    result["first_call_s"] = round(time.perf_counter() - t0, 3)
    if cuda:
        mem = {"before_build": gib(before), "model": gib(built - before), "kv_cache": gib(prefilled - built),
               "after_first_call": gib(allocated(args)),
               "peak_through_first_call": gib(torch.cuda.max_memory_allocated(args.device))}
    check_quantized(kwargs, result)
    for _ in range(2):
        step()
    logits = step().float()
    rb.sync(args.device)
    result.update(logit_diff(logits, reference))
    del logits
    samples = rb.time_ms(step, args)
    result["median_ms"] = statistics.median(samples)
    result["samples_ms"] = [round(s, 4) for s in samples]
    if cuda:
        mem["after_timing"] = gib(allocated(args))
        result["memory_gib"] = mem
    result["dynamo"] = rb.dynamo_stats()  # before cleanup clears the counters
    rb.cleanup(model)
    return result


def run_generate(kwargs: dict[str, Any], prompt: torch.Tensor, reference: dict[str, Any], args: argparse.Namespace
                 ) -> dict[str, Any]:
    """run_backend.run_generate on a fresh model (release_weights off: see the module docstring)."""
    model = fresh_model(args)
    result = rb.run_generate(model, kwargs, prompt, reference, args)
    check_quantized(kwargs, result)
    result["dynamo"] = rb.dynamo_stats()  # before cleanup clears the counters
    rb.cleanup(model)
    return result


def run_one(workload: str, name: str, kwargs: dict[str, Any], prompt: torch.Tensor, references: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
    kwargs = json.loads(json.dumps(kwargs))
    if workload == "generate" and recipe_of(kwargs) not in (None, "default"):
        kwargs["options"]["release_weights"] = False
    kwargs = rb.with_report(name, workload, kwargs, args)
    release_memory(args)
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    result: dict[str, Any] = {"compile": kwargs}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = run_forward if workload == "forward" else run_generate
            result.update(run(kwargs, prompt, references[workload], args))
        except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
            result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:2000]}"
            result["traceback"] = traceback.format_exc()[-6000:]
    result.setdefault("dynamo", rb.dynamo_stats())
    fallbacks = sorted({str(w.message) for w in caught if type(w.message).__name__.endswith("FallbackWarning")})
    if fallbacks:
        result["llmcompress_fallbacks"] = fallbacks
    report = rb.report_summary(kwargs)
    if report is not None:
        result["llmcompress_report"] = report
        result.setdefault("quantization", quantization_summary(report["path"]))
    if args.device.type == "cuda":
        result["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated(args.device))
    if args.no_samples:
        result.pop("samples_ms", None)
        result.pop("samples_s", None)
    release_memory(args)
    return result


def run_gptq(prompt: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of the first call of a w4a16-gptq compiled model (see the module docstring)."""
    release_memory(args)
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    report = str(Path(args.report_dir) / f"{args.model}_{rb.device_slug(args.device)}_w4a16-gptq.json")
    Path(report).unlink(missing_ok=True)
    result: dict[str, Any] = {"samples": args.gptq_samples, "seq_len": args.gptq_seq_len}
    try:
        model = fresh_model(args)
        ids = torch.randint(0, model.config.vocab_size, (args.gptq_samples, args.gptq_seq_len),
                            generator=torch.Generator().manual_seed(args.seed + 2))
        options = {"recipe": "w4a16-gptq", "calibration": ids, "calibration_samples": args.gptq_samples,
                   "calibration_seq_len": args.gptq_seq_len, "report": report}
        result["compile"] = {"backend": "llmcompress",
                             "options": {**options, "calibration": f"randint ids {tuple(ids.shape)}"}}
        # Compile on a calibration-length prompt: the graph is static, and calibration feeds it windows of its own
        # length (a 32-token graph would take the 128 x 512 tokens as 2048 windows of 32).
        prompt = ids[:1]
        reference = model(prompt).logits[:, -1].float()
        compiled = torch.compile(model, backend="llmcompress", options=options)
        rb.sync(args.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            logits = compiled(prompt).logits[:, -1].float()
            rb.sync(args.device)
            result["compile_and_first_call_s"] = round(time.perf_counter() - t0, 2)
        result.update(logit_diff(logits, reference))
        warned = sorted({f"{type(w.message).__name__}: {w.message}" for w in caught
                         if type(w.message).__name__ == "CalibrationWarning"
                         or type(w.message).__name__.endswith("FallbackWarning")})
        if warned:
            result["warnings"] = warned
        summary = quantization_summary(report)
        result["quantization"] = summary
        if summary:
            result["quantize_linear_time_s"] = summary["quantize_linear_time_s"]
            result["lowering_time_s"] = summary["lowering_time_s"]
            result["gptq_layers"] = summary["layers"].get("w4a16 gptq", 0)
        if not result.get("gptq_layers"):
            result["error"] = f"quantize-linear quantized no layer by GPTQ (report: {summary})"
        rb.cleanup(model)
        del model, compiled
    except Exception as e:  # noqa: BLE001
        result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:2000]}"
        result["traceback"] = traceback.format_exc()[-6000:]
    if args.device.type == "cuda":
        result["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated(args.device))
    release_memory(args)
    return result


def add_ratios(results: dict[str, dict[str, dict]], reference: str) -> None:
    for workload, per_config in results.items():
        ref = rb.cost(workload, per_config.get(reference, {}))
        for r in per_config.values():
            mine = rb.cost(workload, r)
            if mine is not None and ref is not None:
                r["speedup_vs"] = {reference: ref / mine}


def checks(doc: dict[str, Any]) -> dict[str, Any]:
    """Whether each run measured what its name says: CUDA graphs really used, quantization really applied."""
    out: dict[str, Any] = {"cudagraphs_not_skipped": {}, "quantized_layers": {}}
    for workload, per_config in doc["results"].items():
        for name, r in per_config.items():
            if "error" in r:
                continue
            if name.endswith("-cudagraphs"):
                out["cudagraphs_not_skipped"][f"{workload}/{name}"] = r["dynamo"]["cudagraph_skips"] == 0
            recipe = recipe_of(r["compile"])
            if recipe not in (None, "default"):
                layers = (r.get("quantization") or {}).get("layers", {})
                out["quantized_layers"][f"{workload}/{name}"] = {k: v for k, v in layers.items()
                                                                 if k.startswith(recipe.split("-")[0])}
    return out


def targets(doc: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    cuda = args.device.type == "cuda"
    out = []
    w4_name = W4A16 if cuda else W4A16.removesuffix("-cudagraphs")
    w4 = doc["results"].get("forward", {}).get(w4_name, {})
    entry = {"name": f"w4a16 decode step <= {FORWARD_TARGET_MS} ms (Llama-2-7B shape, H100)",
             "config": w4_name, "value": w4.get("median_ms"), "limit": FORWARD_TARGET_MS, "met": None}
    if not cuda or args.model != "llama2-7b":
        entry["detail"] = "not evaluated: needs the llama2-7b model on a CUDA GPU"
    elif entry["value"] is None:
        entry["detail"] = "not measured" + (f": {w4['error'][:300]}" if "error" in w4 else "")
    else:
        entry["met"] = entry["value"] <= FORWARD_TARGET_MS
        if "H100" not in doc["device"]["name"]:
            entry["detail"] = f"the limit is for an H100; this is {doc['device']['name']}"
    out.append(entry)
    if "gptq" in doc:
        g = doc["gptq"]
        entry = {"name": f"w4a16-gptq compile <= {GPTQ_TARGET_S:.0f} s (128 x 512 calibration tokens, GPU)",
                 "value": g.get("compile_and_first_call_s"), "limit": GPTQ_TARGET_S, "met": None}
        if not cuda or args.model != "llama2-7b" or (g["samples"], g["seq_len"]) != (128, 512):
            entry["detail"] = "not evaluated: needs llama2-7b on a CUDA GPU with 128 x 512 calibration tokens"
            if "error" in g:
                entry["detail"] += f"; and this run failed: {g['error'][:300]}"
        elif "error" in g:
            entry["met"] = False if entry["value"] is not None and entry["value"] > GPTQ_TARGET_S else None
            entry["detail"] = f"failed: {g['error'][:300]}"
        elif entry["value"] is None:
            entry["detail"] = "not measured" + (f": {g['error'][:300]}" if "error" in g else "")
        else:
            entry["met"] = entry["value"] <= GPTQ_TARGET_S
        out.append(entry)
    return out


def markdown(doc: dict[str, Any]) -> str:
    results = doc["results"]
    lines = [f"**{doc['model']['name']}** ({doc['model']['dtype']}) on **{doc['device']['name']}**, "
             f"torch {doc['versions']['torch']}, transformers {doc['versions']['transformers']}; decode step after a "
             f"{doc['settings']['prompt_len']}-token prefill; generate: {doc['settings']['new_tokens']} new tokens.",
             "", "| config | decode step (ms) | vs bf16 Inductor | memory after compile (GiB) | peak (GiB) | "
             "max rel logit diff | generate (tok/s) | vs bf16 Inductor |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    names = list(dict.fromkeys(n for per in results.values() for n in per))
    for name in names:
        f, g = results.get("forward", {}).get(name, {}), results.get("generate", {}).get(name, {})
        mem = f.get("memory_gib", {})
        row = [name,
               f"{f['median_ms']:.3f}" if "median_ms" in f else ("error" if "error" in f else "-"),
               f"{next(iter(f['speedup_vs'].values())):.2f}x" if f.get("speedup_vs") else "-",
               f"{mem['after_first_call']:.2f}" if "after_first_call" in mem else "-",
               f"{mem['peak_through_first_call']:.2f}" if "peak_through_first_call" in mem else "-",
               f"{f['max_rel_logit_diff_vs_eager']:.3g}" if "max_rel_logit_diff_vs_eager" in f else "-",
               f"{g['tokens_per_s']:.1f}" if "tokens_per_s" in g else ("error" if "error" in g else "-"),
               f"{next(iter(g['speedup_vs'].values())):.2f}x" if g.get("speedup_vs") else "-"]
        lines.append("| " + " | ".join(row) + " |")
    if "gptq" in doc:
        g = doc["gptq"]
        lines += ["", f"w4a16-gptq compile ({g['samples']} x {g['seq_len']} calibration tokens): "
                      + (f"{g['compile_and_first_call_s']:.1f} s (quantize-linear {g.get('quantize_linear_time_s')} s, "
                         f"{g.get('gptq_layers')} layers by GPTQ)" if "compile_and_first_call_s" in g else "")
                      + (f"; error: {g['error'][:300]}" if "error" in g else "")]
    lines += ["", "Targets:"]
    for t in doc["targets"]:
        lines.append(f"- {t['name']}: value {t['value']}, met: {t['met']}" + (f"; {t['detail']}" if t.get("detail")
                                                                              else ""))
    for key, entries in doc["checks"].items():
        if entries:
            lines.append(f"- {key}: " + ", ".join(f"{k}={v}" for k, v in entries.items()))
    for workload, per in results.items():
        for name, r in per.items():
            if "error" in r:
                lines.append(f"- {workload}/{name} failed: {r['error'][:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rb.MODELS.setdefault("tiny-g128", TINY)  # run_backend.build_model reads its MODELS table
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = Path(args.out) if args.out else \
        rb.RESULTS_DIR / f"quantized_model_{args.model_arg}_{rb.device_slug(args.device)}.json"
    configs = active_configs(args)
    cuda = args.device.type == "cuda"
    # quantize-linear imports llmcompress.kernels, whose __init__ must register the quantized ops; importing the
    # kernel modules here as well keeps the measurement independent of that (a missing one shows up below).
    kernel_import_errors = load_ops()
    doc: dict[str, Any] = {
        "benchmark": "quantized_model",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": {"type": args.device.type, "name": device_name(args.device),
                   "torch_threads": torch.get_num_threads()},
        "versions": rb.versions(),
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "forward_repeats": None if cuda else args.forward_repeats,
                     "bench_ms": args.bench_ms if cuda else None,
                     "timer": "triton.testing.do_bench median" if cuda else "perf_counter median",
                     "seed": args.seed, "report_dir": args.report_dir,
                     "generate_release_weights": False},
        "configs": configs,
        "kernel_import_errors": kernel_import_errors,
        "results": {w: {} for w in args.workloads},
    }
    with torch.inference_mode():
        model = fresh_model(args)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                               generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device)
        doc["model"] = {"name": args.model, "dtype": args.dtype, "attn_implementation": "sdpa",
                        "parameters": sum(p.numel() for p in model.parameters()), "config": rb.MODELS[args.model]}
        references: dict[str, Any] = {}
        if "forward" in args.workloads:
            references["forward"] = rb.decode_step(model, model, prompt, args)().float()
        if "generate" in args.workloads:
            references["generate"] = rb.reference_generate(model, prompt, args)
            doc["eager_reference_tokens"] = references["generate"]["tokens"]
        del model
        for name, kwargs in configs.items():
            for workload in args.workloads:
                print(f"[{workload}] {name} ...", file=sys.stderr, flush=True)
                r = run_one(workload, name, kwargs, prompt, references, args)
                doc["results"][workload][name] = r
                print(f"[{workload}] {name}: " + (r.get("error") or (f"{r['median_ms']:.3f} ms" if workload == "forward"
                      else f"{r['tokens_per_s']:.1f} tok/s"))[:300], file=sys.stderr, flush=True)
                rb.write(doc, out_path)
        if args.gptq_time:
            print("[gptq] w4a16-gptq compile ...", file=sys.stderr, flush=True)
            doc["gptq"] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "samples": args.gptq_samples,
                           "seq_len": args.gptq_seq_len}
            rb.write(doc, out_path)  # a run killed while calibrating still says it got this far
            doc["gptq"].update(run_gptq(prompt, args))
            print("[gptq] " + (doc["gptq"].get("error") or f"{doc['gptq']['compile_and_first_call_s']} s")[:300],
                  file=sys.stderr, flush=True)
    reference = REFERENCE if cuda else REFERENCE.removesuffix("-cudagraphs")
    add_ratios(doc["results"], reference)
    doc["targets"] = targets(doc, args)
    doc["checks"] = checks(doc)
    doc["complete"] = True
    rb.write(doc, out_path)
    print(markdown(doc))
    print(f"\nwritten: {out_path}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
