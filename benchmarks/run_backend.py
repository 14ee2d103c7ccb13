"""Decode, prefill and generate speed of llmcompress beside eager and Inductor, in one process: `main`.

Configurations (`--configs`, all by default):

  eager                          the model as it is, no torch.compile
  inductor                       torch.compile(backend="inductor")
  inductor-cudagraphs            torch.compile(backend="inductor", mode="reduce-overhead")
  llmcompress                    torch.compile(backend="llmcompress")  (default recipe, lowered with Inductor)
  llmcompress-cudagraphs         torch.compile(backend="llmcompress", options={"mode": "reduce-overhead"})
  llmcompress-triton             torch.compile(backend="llmcompress", options={"lowering": "triton"})  (our generated
                                 Triton kernels and Triton linear; aten for attention, embedding, indexing)
  llmcompress-triton-cudagraphs  options={"lowering": "triton", "mode": "reduce-overhead"}

The CUDA-graph configurations are recorded as skipped on a CPU.

Model (`--model`): a Llama-2-7B-shaped `LlamaForCausalLM` (hidden 4096, 32 layers, 32 heads, vocab 32000) with random
weights (seeded; built directly on the device), or `tiny` (2 layers, hidden 64) for a CPU smoke run. bf16 by default,
eval mode, gradients off, everything under `torch.inference_mode()`, sdpa attention.

Workloads (`--workloads`):

  forward   One decode step. Per configuration, a fresh `StaticCache(max_cache_len=prompt_len + new_tokens)` is
            filled by an eager prefill of `prompt_len` random tokens (not timed, not compiled, as `generate` does);
            then the timed call is
                compiled(input_ids=(1, 1), position_ids=[[P]], cache_position=[P], past_key_values=cache,
                         use_cache=True)
            with P = prompt_len, followed by one `torch._foreach_copy_` that puts each layer's `cumulative_length` back
            to P. (transformers 5's StaticLayer writes at its own `cumulative_length`, which every call advances;
            without the reset, repeated calls would walk off the end of the cache. The reset is one tiny foreach op,
            the same in every configuration.) Every timed call thus does identical work: write slot P, attend over the
            static cache, produce (1, 1, vocab) logits (each call begins with
            `torch.compiler.cudagraph_mark_step_begin()`, a no-op without CUDA graphs). Three calls warm up (compile;
            CUDA-graph recording) first.
            CUDA: median of `triton.testing.do_bench` (CUDA events, `--bench-ms` of repetitions).
            CPU: median of `--forward-repeats` `time.perf_counter` samples (fewer, at least 5, once the samples of
            one configuration add up to `--cpu-budget-s`: the Triton interpreter is slow).
  prefill   One forward of a (1, `--prefill-len`) random prompt (512 by default) into a fresh
            `StaticCache(max_cache_len=prefill_len + new_tokens)`, as generate's first step:
                compiled(input_ids=(1, L), position_ids=[[0..L-1]], cache_position=[0..L-1], past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
            followed by the same `cumulative_length` reset (to 0), so that every call writes slots 0..L-1 again.
            `logits_to_keep=1` as generate passes it: the LM head runs on the last position only. An untimed eager
            call first allocates the cache (StaticLayer allocates lazily, outside any compiled region) and gives the
            reference logits. Warm-up and timing as for forward.
  generate  `model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
            compile_config=transformers.CompileConfig(backend, mode, options))`, batch 1; eager passes
            `disable_compile=True` instead (without it, a static cache on CUDA makes generate compile by itself). The
            first call compiles and is not timed; then `--repeats` calls, each timed with perf_counter between two
            device synchronizations. tokens/s = generated tokens / median seconds per call; a call includes generate's
            own eager prefill and its Python loop. transformers only compiles when `_valid_auto_compile_criteria`
            holds: a compileable (static) cache and a device in (cuda, xpu, neuron, tpu), or
            `CompileConfig._compile_all_devices`, which is set here so that the CPU compiles too. A compiled
            configuration that Dynamo never compiled is recorded as an error. The model's `eos_token_id` is cleared
            so that every call generates exactly `new_tokens` tokens.
            Greedy tokens are compared with an untimed eager generate. With random bf16 weights the logits are close
            together, so a one-ulp difference can flip an argmax: a mismatch records `first_divergence` and eager's
            top-2 logit gap at that step (a gap of one bf16 ulp means a near-tie, not a wrong kernel), and
            `greedy_tokens_llmcompress_equal_inductor` compares llmcompress with Inductor, its own lowering.

Results: one JSON (`--out`, default `benchmarks/results/backend_<model>_<device-slug>.json`, rewritten after every
configuration so that a killed run keeps what it measured) with the device, versions, model config, per workload and
configuration the median (ms) or tokens/s, the samples, speedups vs eager / Inductor / Inductor+CUDA graphs (>1 means
faster than that reference), and `checks`:

  <workload>_no_slower   per (config, reference) in TIME_CHECKS: time ratio in this run, ok if <= 1 + `--tolerance`
                         (llmcompress and llmcompress-triton vs inductor; their -cudagraphs vs inductor-cudagraphs)
  targets                issue 5's targets for the default recipe's llmcompress-cudagraphs decode step (forward):
                         <= 5.0 ms and >= 1.2x inductor-cudagraphs. Each {value, limit, met, detail}; the limits are
                         for an H100 (Inductor + CUDA graphs measured 6.15 ms there), so elsewhere `met` is "n/a"
                         and `met_here` says how this device did (null: not measured)
  triton_lowering_used   with --report-dir: every graph of a -triton configuration was lowered with "triton", and
                         none ran uncompressed (FallbackWarning)
  cudagraphs_not_skipped, greedy_tokens_equal_eager, greedy_tokens_llmcompress_equal_inductor (Inductor lowering only:
                         the Triton lowering computes with other kernels, so its tokens are compared with eager's)

A configuration that fails is recorded with its error and the run goes on. A Markdown table goes to stdout.

Run on a GPU (Llama-2-7B shape, bf16; ~13.5 GB of weights). Every compiled configuration compiles once per workload,
so on a 10-minute budget run a few configurations per call (benchmarks/gpu_check.sh does):

    python benchmarks/run_backend.py

CPU smoke run (tiny model, a few minutes on 2 cores, mostly compilation; one intra-op thread unless `--threads`; on a
CPU the script sets TRITON_INTERPRET=1 unless it is set, so that the Triton lowering's kernels run in the interpreter):

    python benchmarks/run_backend.py --model tiny --new-tokens 16 --prefill-len 64

Subsets: `--configs inductor,llmcompress --workloads forward`. `--report-dir DIR` adds `options["report"]` to the
llmcompress configurations and copies each report's summary and pass records into the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
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


# Triton reads TRITON_INTERPRET when a kernel is decorated (importing llmcompress or transformers' Llama decorates
# some): set it first, so that the Triton lowering's kernels can run on CPU tensors. Only as a script: importers
# (quantized_model.py) decide for themselves.
if __name__ == "__main__" and _cpu_run(sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

import llmcompress  # noqa: E402
from llmcompress.cost.device_profile import device_name  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# name -> torch.compile keyword arguments (None: no compile). torch.compile refuses mode= with options=, so the
# llmcompress CUDA-graph configuration passes its mode inside options.
CONFIGS: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "inductor": {"backend": "inductor"},
    "inductor-cudagraphs": {"backend": "inductor", "mode": "reduce-overhead"},
    "llmcompress": {"backend": "llmcompress"},
    "llmcompress-cudagraphs": {"backend": "llmcompress", "options": {"mode": "reduce-overhead"}},
    "llmcompress-triton": {"backend": "llmcompress", "options": {"lowering": "triton"}},
    "llmcompress-triton-cudagraphs": {"backend": "llmcompress",
                                      "options": {"lowering": "triton", "mode": "reduce-overhead"}},
}
CUDAGRAPH_CONFIGS = {"inductor-cudagraphs", "llmcompress-cudagraphs", "llmcompress-triton-cudagraphs"}
REFERENCES = ("eager", "inductor", "inductor-cudagraphs")
# (config, the reference it must be no slower than)
TIME_CHECKS = (("llmcompress", "inductor"), ("llmcompress-cudagraphs", "inductor-cudagraphs"),
               ("llmcompress-triton", "inductor"), ("llmcompress-triton-cudagraphs", "inductor-cudagraphs"))
# Pairs lowered by the same compiler (Inductor), whose greedy tokens should be identical.
SAME_LOWERING = (("llmcompress", "inductor"), ("llmcompress-cudagraphs", "inductor-cudagraphs"))
# Issue 5, default recipe with CUDA graphs, decode step of the Llama-2-7B shape on an H100 (where Inductor with CUDA
# graphs measured 6.15 ms): (name, config, reference or None, kind, limit).
TARGETS = (("llmcompress-cudagraphs forward <= 5.0 ms", "llmcompress-cudagraphs", None, "max_ms", 5.0),
           ("llmcompress-cudagraphs forward >= 1.2x inductor-cudagraphs", "llmcompress-cudagraphs",
            "inductor-cudagraphs", "min_speedup", 1.2))
TARGET_DEVICE = "H100"
TARGET_MODEL = "llama2-7b"

MODELS: dict[str, dict[str, int]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    # Same family and proportions (intermediate/hidden = 2.69), small enough that a compile takes seconds on a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}
WORKLOADS = ("forward", "prefill", "generate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), help="default: llama2-7b on CUDA, tiny on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--prompt-len", type=int, default=32, help="prefill length before the timed decode / generate")
    p.add_argument("--new-tokens", type=int, default=128, help="max_new_tokens of generate")
    p.add_argument("--prefill-len", type=int, default=512, help="prefill workload: prompt tokens")
    p.add_argument("--repeats", type=int, help="timed generate calls after the warm-up (default 5 on CUDA, 20 on CPU)")
    p.add_argument("--forward-repeats", type=int, default=200, help="CPU only: timed forward / prefill calls")
    p.add_argument("--cpu-budget-s", type=float, default=20.0,
                   help="CPU only: stop a forward / prefill timing (after at least 5 calls) once it took this long")
    p.add_argument("--bench-ms", type=int, default=1000, help="CUDA only: do_bench repetition time per configuration")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="checks: llmcompress passes if its time is <= (1 + tolerance) x Inductor's")
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (default: 1 for the tiny model on CPU, else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-samples", action="store_true", help="leave the per-call samples out of the JSON")
    p.add_argument("--report-dir", help="also pass options['report'] to the llmcompress configurations, under DIR")
    p.add_argument("--out", help="JSON path (default benchmarks/results/backend_<model>_<device-slug>.json)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.model = args.model or ("llama2-7b" if args.device.type == "cuda" else "tiny")
    args.repeats = args.repeats or (5 if args.device.type == "cuda" else 20)
    # tiny: 64-wide matmuls gain nothing from threads, and on a shared 2-core machine with another process busy,
    # OpenMP barriers made one 1x64 @ 64x64 bf16 mm take 2-7 ms instead of microseconds (and 10x run-to-run spread).
    if args.threads is None and args.model == "tiny" and args.device.type == "cpu":
        args.threads = 1
    args.workloads = _subset(args.workloads, WORKLOADS, "--workloads")
    args.configs = _subset(args.configs, tuple(CONFIGS), "--configs")
    return args


def _subset(text: str, known: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SystemExit(f"{flag}: unknown {bad or text!r}; choose from {', '.join(known)}")
    return [n for n in known if n in names]  # canonical order: references first


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__, "llmcompress": llmcompress.__version__,
                                  "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def build_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(**MODELS[args.model])
    torch.manual_seed(args.seed)
    # Built and initialised on the device itself: a 7B random init on the CPU takes minutes.
    with args.device:
        model = transformers.LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype),
                                                           attn_implementation="sdpa")
    model.to(args.device).eval().requires_grad_(False)  # .to: a no-op unless some buffer was made off-device
    # Random weights: an EOS would end some generate calls early and change the token count between configurations.
    model.generation_config.eos_token_id = None
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], args: argparse.Namespace) -> list[float]:
    """Per-call times in ms: CUDA events through do_bench on CUDA, perf_counter around each call on CPU."""
    if args.device.type == "cuda":
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=max(25, args.bench_ms // 10), rep=args.bench_ms, return_mode="all"))
    budget_ms = (getattr(args, "cpu_budget_s", None) or float("inf")) * 1e3
    samples: list[float] = []
    for _ in range(args.forward_repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 5 and sum(samples) > budget_ms:
            break
    return samples


def prefill(model, prompt: torch.Tensor, max_cache_len: int):
    """Eager prefill into a fresh static cache -> (cache, greedy next token (1, 1), per-layer write positions)."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
    n = prompt.shape[1]
    out = model(input_ids=prompt, cache_position=torch.arange(n, device=prompt.device), past_key_values=cache,
                use_cache=True)
    lengths = [layer.cumulative_length for layer in cache.layers]
    return cache, out.logits[:, -1:].argmax(-1), lengths


def decode_step(model, step_model, prompt: torch.Tensor, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """The timed callable of the forward workload (see the module docstring), on a freshly prefilled cache."""
    p = prompt.shape[1]
    cache, token, lengths = prefill(model, prompt, p + args.new_tokens)
    position = torch.tensor([p], device=prompt.device)
    position_ids = position[None]
    restart = [torch.full_like(t, p) for t in lengths]

    def step() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        out = step_model(input_ids=token, position_ids=position_ids, cache_position=position, past_key_values=cache,
                         use_cache=True)
        torch._foreach_copy_(lengths, restart)
        return out.logits

    return step


def prefill_step(model, step_model, prompt: torch.Tensor, args: argparse.Namespace
                 ) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """The timed callable of the prefill workload (see the module docstring) and eager's logits (1, 1, vocab)."""
    n = prompt.shape[1]
    cache = transformers.StaticCache(config=model.config, max_cache_len=n + args.new_tokens)
    cache_position = torch.arange(n, device=prompt.device)
    kwargs = dict(input_ids=prompt, position_ids=cache_position[None], cache_position=cache_position,
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
    reference = model(**kwargs).logits  # eager: allocates the cache's static tensors outside any compiled region
    lengths = [layer.cumulative_length for layer in cache.layers]
    restart = [torch.zeros_like(t) for t in lengths]
    torch._foreach_copy_(lengths, restart)

    def step() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        out = step_model(**kwargs)
        torch._foreach_copy_(lengths, restart)
        return out.logits

    return step, reference


def prefill_prompt(model, args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, args.prefill_len),
                         generator=torch.Generator().manual_seed(args.seed + 2)).to(args.device)


def run_forward(model, compile_kwargs: dict | None, prompt: torch.Tensor, reference: torch.Tensor,
                args: argparse.Namespace, workload: str = "forward") -> dict[str, Any]:
    """The forward workload (a decode step), or with workload="prefill" the prefill workload."""
    step_model = model if compile_kwargs is None else torch.compile(model, **compile_kwargs)
    if workload == "prefill":
        step, _ = prefill_step(model, step_model, prefill_prompt(model, args), args)
    else:
        step = decode_step(model, step_model, prompt, args)
    t0 = time.perf_counter()
    step()
    sync(args.device)
    first_call_s = time.perf_counter() - t0
    for _ in range(2):
        step()
    logits = step().float()
    sync(args.device)
    result: dict[str, Any] = {
        "first_call_s": round(first_call_s, 3),
        "max_abs_logit_diff_vs_eager": (logits - reference).abs().max().item(),
        "argmax_equal_eager": bool(torch.equal(logits.argmax(-1), reference.argmax(-1))),
    }
    del logits
    samples = time_ms(step, args)
    result["median_ms"] = statistics.median(samples)
    result["samples_ms"] = [round(s, 4) for s in samples]
    return result


def compile_config(compile_kwargs: dict) -> transformers.CompileConfig:
    # CompileConfig's own default mode is "reduce-overhead": state it, None included.
    cc = transformers.CompileConfig(backend=compile_kwargs["backend"], mode=compile_kwargs.get("mode"),
                                    options=compile_kwargs.get("options"))
    # generate compiles only on cuda/xpu/neuron/tpu unless this is set (`_valid_auto_compile_criteria`).
    cc._compile_all_devices = True
    return cc


def generate_kwargs(compile_kwargs: dict | None, args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")
    if compile_kwargs is None:
        kwargs["disable_compile"] = True  # otherwise, on CUDA, a static cache makes generate compile by itself
    else:
        kwargs["compile_config"] = compile_config(compile_kwargs)
    return kwargs


def reference_generate(model, prompt: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Eager greedy tokens and, per step, the gap between the two best logits (to judge a divergence)."""
    out = model.generate(prompt, return_dict_in_generate=True, output_scores=True, **generate_kwargs(None, args))
    top2 = [s[0].float().topk(2).values for s in out.scores]
    return {"tokens": out.sequences[0, prompt.shape[1]:].tolist(), "margins": [(t[0] - t[1]).item() for t in top2]}


def run_generate(model, compile_kwargs: dict | None, prompt: torch.Tensor, reference: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Any]:
    kwargs = generate_kwargs(compile_kwargs, args)
    t0 = time.perf_counter()
    model.generate(prompt, **kwargs)
    sync(args.device)
    first_call_s = time.perf_counter() - t0
    if compile_kwargs is not None and not torch._dynamo.utils.counters["stats"]["unique_graphs"]:
        raise RuntimeError("generate ran uncompiled: Dynamo compiled no graph (transformers' compile criteria unmet?)")
    seconds, out = [], None
    for _ in range(args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        sync(args.device)
        seconds.append(time.perf_counter() - t0)
    tokens = out[0, prompt.shape[1]:].tolist()
    median_s = statistics.median(seconds)
    result: dict[str, Any] = {"first_call_s": round(first_call_s, 3), "new_tokens": len(tokens),
                              "median_s": median_s, "tokens_per_s": len(tokens) / median_s,
                              "samples_s": [round(s, 5) for s in seconds]}
    result.update(compare_tokens(tokens, reference))
    result["tokens"] = tokens
    return result


def compare_tokens(tokens: list[int], reference: dict[str, Any]) -> dict[str, Any]:
    ref = reference["tokens"]
    diverge = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
    if diverge is None and len(tokens) != len(ref):
        diverge = min(len(tokens), len(ref))
    out: dict[str, Any] = {"tokens_equal_eager": diverge is None, "first_divergence": diverge}
    if diverge is not None and diverge < len(reference["margins"]):
        out["eager_top2_logit_gap_at_divergence"] = reference["margins"][diverge]
    return out


def dynamo_stats() -> dict[str, int]:
    counters = torch._dynamo.utils.counters
    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            # > 0: Inductor ran (part of) the graph without CUDA graphs; TORCH_LOGS=cudagraphs says why.
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def with_report(name: str, workload: str, compile_kwargs: dict | None, args: argparse.Namespace) -> dict | None:
    if compile_kwargs is None or compile_kwargs["backend"] != "llmcompress" or not args.report_dir:
        return compile_kwargs
    path = str(Path(args.report_dir) / f"{args.model}_{device_slug(args.device)}_{name}_{workload}.json")
    Path(path).unlink(missing_ok=True)
    return {**compile_kwargs, "options": {**compile_kwargs.get("options", {}), "report": path}}


def report_summary(compile_kwargs: dict | None) -> dict[str, Any] | None:
    path = (compile_kwargs or {}).get("options", {}).get("report")
    if not path or not Path(path).exists():
        return None
    report = json.loads(Path(path).read_text())
    passes = [{"graph_id": g.get("graph_id"), **{k: p.get(k) for k in ("name", "status", "stats", "error")}}
              for g in report["graphs"] for p in g.get("passes", [])]
    return {"path": path, "summary": report["summary"], "passes": passes,
            "lowerings": sorted({str(g.get("lowering")) for g in report["graphs"]}),
            "fallbacks": [g["fallback"] for g in report["graphs"] if g.get("fallback")]}


def cleanup(model) -> None:
    for attr in ("_compiled_call", "_last_compile_config"):  # generate keeps its compiled __call__ on the model
        if hasattr(model, attr):
            delattr(model, attr)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    from llmcompress.backend.compile_report import reset_reports

    reset_reports()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_one(workload: str, name: str, model, prompt, references: dict, args: argparse.Namespace) -> dict[str, Any]:
    compile_kwargs = with_report(name, workload, CONFIGS[name], args)
    if name in CUDAGRAPH_CONFIGS and args.device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    cleanup(model)
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    result: dict[str, Any] = {"compile": compile_kwargs}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if workload == "generate":
                result.update(run_generate(model, compile_kwargs, prompt, references[workload], args))
            else:
                result.update(run_forward(model, compile_kwargs, prompt, references[workload], args, workload))
        except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()[-6000:]
    result["dynamo"] = dynamo_stats()
    fallbacks = sorted({str(w.message) for w in caught if type(w.message).__name__ == "FallbackWarning"})
    if fallbacks:
        result["llmcompress_fallbacks"] = fallbacks
    report = report_summary(compile_kwargs)
    if report is not None:
        result["llmcompress_report"] = report
    if args.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 3)
    cleanup(model)
    return result


def cost(workload: str, r: dict[str, Any]) -> float | None:
    """Seconds-like cost (lower is better) of one result, None when it has no measurement."""
    if workload in ("forward", "prefill"):
        return r.get("median_ms")
    return r.get("median_s")


def add_ratios(results: dict[str, dict[str, dict]]) -> None:
    for workload, per_config in results.items():
        for r in per_config.values():
            mine = cost(workload, r)
            if mine is None:
                continue
            r["speedup_vs"] = {ref: cost(workload, per_config[ref]) / mine for ref in REFERENCES
                               if ref in per_config and cost(workload, per_config[ref]) is not None}


def checks(results: dict[str, dict[str, dict]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workload, per_config in results.items():
        for name, ref in TIME_CHECKS:
            if name not in per_config or ref not in per_config:
                continue
            mine, theirs = cost(workload, per_config[name]), cost(workload, per_config[ref])
            entry: dict[str, Any] = {"time_ratio": None, "tolerance": args.tolerance, "ok": None}
            if mine is not None and theirs is not None:
                entry["time_ratio"] = mine / theirs
                entry["ok"] = mine / theirs <= 1 + args.tolerance
                if "triton" in name and args.device.type != "cuda":
                    entry["ok"] = None  # the Triton interpreter: a time, but nothing to judge
                    entry["note"] = "CPU: the Triton lowering ran in the Triton interpreter"
            out.setdefault(f"{workload}_no_slower", {})[f"{name}_vs_{ref}"] = entry
    # A CUDA-graph configuration whose graphs Inductor ran without CUDA graphs measures nothing new.
    out["cudagraphs_not_skipped"] = {f"{w}/{n}": r["dynamo"]["cudagraph_skips"] == 0
                                     for w, per_config in results.items() for n, r in per_config.items()
                                     if n in CUDAGRAPH_CONFIGS and "dynamo" in r and "error" not in r}
    # With --report-dir: did the Triton configurations really lower every graph with lowering="triton"?
    out["triton_lowering_used"] = {f"{w}/{n}": r["llmcompress_report"]["lowerings"] == ["triton"]
                                   and not r["llmcompress_report"]["fallbacks"]
                                   for w, per_config in results.items() for n, r in per_config.items()
                                   if "-triton" in n and "lowerings" in r.get("llmcompress_report", {})}
    out["targets"] = targets(results, args)
    generate = results.get("generate", {})
    out["greedy_tokens_equal_eager"] = {n: r["tokens_equal_eager"] for n, r in generate.items()
                                        if "tokens_equal_eager" in r}
    # Same lowering: llmcompress's tokens should match Inductor's exactly unless a pass changed the numerics.
    same = {}
    for name, ref in SAME_LOWERING:
        a, b = generate.get(name, {}).get("tokens"), generate.get(ref, {}).get("tokens")
        if a is not None and b is not None:
            same[f"{name}_vs_{ref}"] = a == b
    out["greedy_tokens_llmcompress_equal_inductor"] = same
    return out


def targets(results: dict[str, dict[str, dict]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Issue 5's decode-step targets (TARGETS): judged only for the Llama-2-7B shape on an H100, else met="n/a"."""
    forward = results.get("forward", {})
    name = device_name(args.device)
    where = None
    if args.device.type != "cuda" or TARGET_DEVICE not in name:
        where = f"n/a: the limit is for an {TARGET_DEVICE}; this is {name}"
    elif args.model != TARGET_MODEL or args.dtype != "bfloat16":
        where = f"n/a: the limit is for {TARGET_MODEL} in bfloat16; this is {args.model} in {args.dtype}"
    out = []
    for label, config, ref, kind, limit in TARGETS:
        mine = cost("forward", forward.get(config, {}))
        theirs = cost("forward", forward.get(ref, {})) if ref else None
        value = mine if kind == "max_ms" else (None if mine is None or theirs is None else theirs / mine)
        met_here = None if value is None else (value <= limit if kind == "max_ms" else value >= limit)
        entry: dict[str, Any] = {"name": label, "config": config, "reference": ref, "value": value, "limit": limit,
                                 "unit": "ms" if kind == "max_ms" else "speedup", "met": None, "met_here": met_here}
        notes = [where] if where else []
        if value is None:
            missing = [c for c in (config, ref) if c and cost("forward", forward.get(c, {})) is None]
            why = "; ".join(f"{c}: " + (forward.get(c, {}).get("skipped") or forward.get(c, {}).get("error")
                                        or "not in this run") for c in missing)
            notes.append("not measured: " + " ".join(why.split())[:300])
        entry["met"] = "n/a" if where else met_here
        entry["detail"] = "; ".join(notes) or None
        out.append(entry)
    return out


def markdown(doc: dict[str, Any]) -> str:
    results = doc["results"]
    head = (f"**{doc['model']['name']}** ({doc['model']['dtype']}) on **{doc['device']['name']}**, "
            f"torch {doc['versions']['torch']}, transformers {doc['versions']['transformers']}; "
            f"decode step after a {doc['settings']['prompt_len']}-token prefill; "
            f"prefill: {doc['settings'].get('prefill_len')} tokens into a static cache; "
            f"generate: {doc['settings']['new_tokens']} new tokens, batch 1.")
    refs = [r for r in REFERENCES if any(r in v and cost(w, v[r]) is not None for w, v in results.items())]
    cols = ["config"]
    if "forward" in results:
        cols += ["decode step (ms)"] + [f"vs {r}" for r in refs]
    if "prefill" in results:
        cols += ["prefill (ms)"] + [f"vs {r}" for r in refs]
    if "generate" in results:
        cols += ["generate (tok/s)"] + [f"vs {r}" for r in refs] + ["tokens = eager"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["--:"] * (len(cols) - 1)) + "|"]
    names = [n for n in CONFIGS if any(n in v for v in results.values())]
    for name in names:
        row = [name]
        for workload in WORKLOADS:
            if workload not in results:
                continue
            r = results[workload].get(name, {})
            if "skipped" in r or "error" in r or not r:
                row += ["skipped" if "skipped" in r else ("error" if "error" in r else "-")] + ["-"] * len(refs)
            else:
                row.append(f"{r['tokens_per_s']:.1f}" if workload == "generate" else f"{r['median_ms']:.3f}")
                row += [f"{r['speedup_vs'][ref]:.2f}x" if ref in r.get("speedup_vs", {}) else "-" for ref in refs]
            if workload == "generate":
                row.append(tokens_cell(r))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Speedup = reference time / config time (>1: faster than the reference).")
    for key, entries in doc["checks"].items():
        if key.endswith("_no_slower"):
            for pair, e in entries.items():
                if e["time_ratio"] is None:
                    continue
                ratio = "n/a" if e["time_ratio"] is None else f"{e['time_ratio']:.3f}"
                lines.append(f"- {key}: {pair} time ratio {ratio} (ok: {e['ok']})")
    for t in doc["checks"].get("targets", []):
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        here = f"; on this device: {t['met_here']}" if t["met"] == "n/a" and t["met_here"] is not None else ""
        lines.append(f"- target {t['name']}: value {value}, met: {t['met']}"
                     + (f" ({t['detail']}{here})" if t.get("detail") else ""))
    for key in ("cudagraphs_not_skipped", "triton_lowering_used", "greedy_tokens_equal_eager",
                "greedy_tokens_llmcompress_equal_inductor"):
        if doc["checks"].get(key):
            lines.append(f"- {key}: " + ", ".join(f"{k}={v}" for k, v in doc["checks"][key].items()))
    for workload, per_config in results.items():
        for name, r in per_config.items():
            if "error" in r:
                lines.append(f"- {workload}/{name} failed: {' '.join(r['error'].split())[:300]}")
    return "\n".join(lines)


def tokens_cell(r: dict[str, Any]) -> str:
    if r.get("tokens_equal_eager") is None:
        return "-"
    if r["tokens_equal_eager"]:
        return "yes"
    gap = r.get("eager_top2_logit_gap_at_divergence")
    return f"no (from token {r['first_divergence']}" + (f"; eager top-2 gap {gap:.3g})" if gap is not None else ")")


def write(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before any compile: Inductor's C++ kernels read it at compile time
    out_path = Path(args.out) if args.out else RESULTS_DIR / f"backend_{args.model}_{device_slug(args.device)}.json"
    model = build_model(args)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device)
    doc: dict[str, Any] = {
        "benchmark": "run_backend",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": {"type": args.device.type, "name": device_name(args.device),
                   "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "model": {"name": args.model, "dtype": args.dtype, "attn_implementation": "sdpa",
                  "parameters": sum(p.numel() for p in model.parameters()), "config": MODELS[args.model]},
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
                     "repeats": args.repeats,
                     "forward_repeats": args.forward_repeats if args.device.type != "cuda" else None,
                     "cpu_budget_s": args.cpu_budget_s if args.device.type != "cuda" else None,
                     "bench_ms": args.bench_ms if args.device.type == "cuda" else None,
                     "timer": "triton.testing.do_bench median" if args.device.type == "cuda" else "perf_counter median",
                     "seed": args.seed, "tolerance": args.tolerance,
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "configs": {n: CONFIGS[n] for n in args.configs},
        "results": {w: {} for w in args.workloads},
    }
    with torch.inference_mode():
        references: dict[str, Any] = {}
        if "forward" in args.workloads:
            step = decode_step(model, model, prompt, args)
            references["forward"] = step().float()
        if "prefill" in args.workloads:
            references["prefill"] = prefill_step(model, model, prefill_prompt(model, args), args)[1].float()
        if "generate" in args.workloads:
            references["generate"] = reference_generate(model, prompt, args)
            doc["eager_reference_tokens"] = references["generate"]["tokens"]
        for name in args.configs:
            for workload in args.workloads:
                print(f"[{workload}] {name} ...", file=sys.stderr, flush=True)
                r = run_one(workload, name, model, prompt, references, args)
                if args.no_samples:
                    r.pop("samples_ms", None)
                    r.pop("samples_s", None)
                doc["results"][workload][name] = r
                print(f"[{workload}] {name}: " + (r.get("error") or r.get("skipped") or
                      (f"{r['tokens_per_s']:.1f} tok/s" if workload == "generate" else f"{r['median_ms']:.3f} ms")),
                      file=sys.stderr, flush=True)
                write(doc, out_path)
    add_ratios(doc["results"])
    doc["checks"] = checks(doc["results"], args)
    doc["complete"] = True
    write(doc, out_path)
    print(markdown(doc))
    print(f"\nwritten: {out_path}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
