"""Measured vs predicted time of every node of a Llama-2-7B-shaped forward, and end to end: `main`.

Model (`--model`): a Llama-2-7B-shaped `LlamaForCausalLM` (hidden 4096, intermediate 11008, 32 layers, 32 heads,
vocab 32000; random bf16 weights built on the device, sdpa attention), or `tiny` (2 layers, hidden 64) for a CPU
smoke run.

Workloads (`--workloads`): `decode`, one token (batch `--batch`) over a static KV cache of `--kv-len` slots; `prefill`,
`--prefill-len` tokens, no cache. Each is captured with `llmcompress.report.trace.trace_model` on the device itself
(so attention is the SDPA kernel that device runs) and the graph before any pass (`TracedGraph.before`: the model as
it is, weights as get_attr constants) is what is measured and priced.

Measured, per graph:
* inputs: every placeholder made from its `meta["val"]` at the sizes asked for (`TracedGraph.sizes`): floating
  tensors random normal, integer and bool tensors zeros (a valid index for every gather and cache write: the static
  cache's write position is a placeholder), SymInts their value. Integer placeholders the graph writes back (the
  cache's position counter) are put back to zero before every whole-graph call, one tiny copy each, so repeated calls
  never walk off the cache.
* per node: the graph runs once under an `fx.Interpreter`; each node that the cost model does not call free (views,
  reshapes, getitem, the cache write-back `copy_`) is timed there on the very tensors it receives, calling
  `node.target(*args, **kwargs)`: on CUDA `triton.testing.do_bench` median (CUDA events, L2 flushed before every
  call: GPU time, not host dispatch), on a CPU the median of `perf_counter` samples. `--dedupe` times each distinct
  (op, shapes, strides, dtypes, other arguments) once and reuses the time for its repeats (the 32 identical layers).
* end to end: `gm(*inputs)`, the FX graph run eagerly, timed the same way (`graph_eager`); on CUDA also one replay of
  the graph captured in a CUDA graph (`graph_cudagraph`: the GPU's time with no host overhead between kernels, the
  regime a compiled model with CUDA graphs runs in). The end-to-end reference is `graph_cudagraph` on CUDA (an eager
  7B decode is bound by the host's dispatch of ~1,530 kernels, which the roofline does not model) and `graph_eager`
  on a CPU.

Predicted (`llmcompress.cost.roofline.CostModel`, hardware resolved from the device), per node, on the concrete
shapes the node ran with (each node's `meta["val"]` replaced by a meta tensor of what it produced, so a prefill's
symbolic M is a number and the profile's M correction applies), by variant:
* `roofline`: datasheet peaks and bandwidth, table launch overhead (no profile);
* `calibrated`: with the profile (`--profile`, below);
* `proposed`: the same profile with the changes proposed for `CostModel`: the matmul correction of the point
  nearest in (M, N, K) instead of M alone (`calibration.matmul_correction`), and pointwise, data, reduction and
  unknown nodes at the bandwidth the profile's copy curve reaches for their bytes (`calibration.bandwidth_at`);
* `calibrated+graph-launch`, `proposed+graph-launch` (CUDA, profiles with `launch_overhead_graph_s`): the same with
  the launch overhead measured back to back inside a CUDA graph, the per-kernel cost of a CUDA-graph replay (for the
  end-to-end time against `graph_cudagraph`; per node, `launch_overhead_s` is the one measured like the nodes).
Per variant: per-node relative error |predicted - measured| / measured (median, p90), the same per node kind and per
op, the end-to-end predicted time (the sum over nodes) and its error against the reference. `predicted_symbolic_s`
prices the symbolic graph as the backend does (at `TracedGraph.sizes`), which shows what a symbolic M loses.

Profile (`--profile`): `stored` (default) the device's stored profile (`llmcompress calibrate`), calibrating in this
process when none is stored; `fresh` always calibrates here (CUDA: `DEFAULT_GRID`; CPU: the model's own linear shapes,
short measurements), written to a temporary file, not into the package; or a path to a profile JSON.

Goals (from the issue): calibrated median per-node error <= 15 % and end-to-end error <= 10 %; `checks` records both.

Results: `benchmarks/results/cost_model_<model>_<device-slug>.json` (`--out`): device, versions, model, profile
summary, per workload the end-to-end times and errors, per-variant node error statistics, per-kind and per-op
breakdowns, the worst nodes (`--all-nodes`: every node), and `checks`. A run of some workloads keeps the others
already in that file (same device and model; each workload records its own `created`, `command` and profile), so
the two workloads can run as two commands. A Markdown table goes to stdout.

Run on a GPU (Llama-2-7B shape, bf16, ~13.5 GB of weights; each workload captures the 7B graph once and times each
of its kernel nodes for ~40 ms: 47 per layer + 26 = 1,530 for the decode, 41 per layer + 40 = 1,352 for the prefill,
counted on the CPU trace of 1-3 layer models; a few minutes each, not yet run on a GPU):

    python benchmarks/validate_cost_model.py --workloads decode
    python benchmarks/validate_cost_model.py --workloads prefill
    python benchmarks/validate_cost_model.py --dedupe          # both, each distinct node timed once: faster

CPU smoke run (tiny model, under a minute on 2 cores; the numbers show only that every path runs):

    python benchmarks/validate_cost_model.py --model tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx
import transformers

import llmcompress
from llmcompress.cost.device_profile import (
    DEFAULT_GRID,
    Grid,
    bandwidth_at,
    device_name,
    load_profile,
    matmul_correction,
    measure,
    profile_device,
    versions,
)
from llmcompress.cost.hardware import resolve
from llmcompress.cost.roofline import MATMUL_OPS, CostModel, _matmul_flops, sym
from llmcompress.report.trace import trace_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS: dict[str, dict[str, int]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}
WORKLOADS = ("decode", "prefill")
GOALS = {"median_node_error": 0.15, "end_to_end_error": 0.10}
WORST = 12
CURVE_KINDS = {"pointwise", "data", "reduction", "unknown"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), help="default: llama2-7b on CUDA, tiny on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-len", type=int, default=512, help="decode: static cache slots")
    p.add_argument("--prefill-len", type=int, default=512, help="prefill: tokens")
    p.add_argument("--profile", default="stored", help="stored (default), fresh, or a profile JSON path")
    p.add_argument("--dedupe", action="store_true", help="time each distinct node signature once")
    p.add_argument("--warmup-ms", type=float, default=5.0, help="per node (CUDA do_bench warmup)")
    p.add_argument("--rep-ms", type=float, help="per node (default 25 on CUDA, 10 on CPU)")
    p.add_argument("--graph-rep-ms", type=float, default=200.0, help="whole-graph measurements")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default 1 for the tiny model on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-nodes", action="store_true", help="write every node's numbers, not only the worst")
    p.add_argument("--out", help="JSON path (default benchmarks/results/cost_model_<model>_<device-slug>.json)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.model = args.model or ("llama2-7b" if args.device.type == "cuda" else "tiny")
    args.rep_ms = args.rep_ms or (25.0 if args.device.type == "cuda" else 10.0)
    # As in run_backend.py: on a shared 2-core machine, OpenMP barriers make tiny matmuls 10x noisier with 2 threads.
    if args.threads is None and args.model == "tiny" and args.device.type == "cpu":
        args.threads = 1
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or any(w not in WORKLOADS for w in args.workloads):
        raise SystemExit(f"--workloads: choose from {', '.join(WORKLOADS)}")
    return args


def device_slug(device: torch.device) -> str:
    return device.type if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def build_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(**MODELS[args.model])
    torch.manual_seed(args.seed)
    with args.device:  # a 7B random init on the CPU takes minutes
        model = transformers.LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype),
                                                           attn_implementation="sdpa")
    return model.to(args.device).eval().requires_grad_(False)


def get_profile(args: argparse.Namespace, hardware) -> tuple[dict[str, Any], str]:
    if args.profile not in ("stored", "fresh"):
        return json.loads(Path(args.profile).read_text()), args.profile
    if args.profile == "stored":
        stored = load_profile(hardware)
        if stored is not None:
            return stored, "stored"
    if args.device.type == "cuda":
        grid, quick = DEFAULT_GRID, False
    else:  # the model's own linears: q/k/v/o, gate/up, down, lm_head
        c = MODELS[args.model]
        h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
        grid, quick = Grid((1, 16, 64, 256, args.batch * args.prefill_len), ((h, h), (i, h), (h, i), (v, h))), True
    with tempfile.TemporaryDirectory() as tmp:
        profile = profile_device(hardware.name, dtypes=(args.dtype,), grid=grid, quick=quick, out=Path(tmp) / "p.json")
    profile.pop("path", None)
    return profile, "calibrated in this process"


class ProposedCostModel(CostModel):
    """`CostModel` with the changes proposed for roofline.py: the matmul correction of the profile's point nearest in
    (M, N, K), not in M alone; memory-bound nodes other than matmuls at the bandwidth the profile's copy curve reaches
    for their bytes (`calibration.bandwidth_at`), not the large copy's."""

    _node: torch.fx.Node | None = None

    def node_cost(self, node):
        self._node = node
        try:
            cost = super().node_cost(node)
        finally:
            self._node = None
        if cost is None or cost.kind not in CURVE_KINDS or not self.profile or not self.profile.get("copy"):
            return cost
        try:
            nbytes, compute = float(cost.bytes), float(cost.compute_time_s)
        except TypeError:
            return cost  # symbolic: left as the base model prices it
        memory = nbytes / bandwidth_at(self.profile, nbytes) if nbytes else 0.0
        return dataclasses.replace(cost, memory_time_s=memory, time_s=max(compute, memory) + self.launch_s)

    def _matmul_correction(self, dtype, m):
        name = str(dtype).removeprefix("torch.")
        node = self._node
        if node is None or node.target not in MATMUL_OPS:
            return super()._matmul_correction(dtype, m)
        flops, m_, n = _matmul_flops(node)
        try:
            m_, n, flops = float(m_), float(n), float(flops)
        except TypeError:
            return 1.0
        k = math.floor(flops / (2 * m_ * n)) if m_ and n else 1
        return matmul_correction(self.profile, name, m_, n, k)


def concrete(x: Any, sizes: dict) -> int:
    expr = sympy.sympify(sym(x)).subs(sizes)
    if expr.free_symbols:
        raise ValueError(f"size {expr} has unknown symbols {expr.free_symbols}")
    return int(expr)


def make_inputs(gm: torch.fx.GraphModule, sizes: dict, device: torch.device, seed: int) -> list[Any]:
    gens: dict[torch.device, torch.Generator] = {}
    inputs: list[Any] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        v = node.meta.get("val")
        if isinstance(v, (torch.SymInt, int)):
            inputs.append(concrete(v, sizes))
        elif isinstance(v, torch.Tensor):
            shape = [concrete(s, sizes) for s in v.shape]
            where = v.device if v.device.type != "meta" else device  # e.g. a CPU scalar stays on the CPU
            if v.is_floating_point():
                gen = gens.setdefault(where, torch.Generator(device=where).manual_seed(seed))
                inputs.append(torch.randn(shape, dtype=v.dtype, device=where, generator=gen))
            else:
                inputs.append(torch.zeros(shape, dtype=v.dtype, device=where))
        else:
            inputs.append(v)
    return inputs


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return tuple(_to_meta(x) for x in v)
    return v


def _signature(target: Any, args: Any, kwargs: Any) -> str:
    def desc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), tuple(x.stride()), str(x.dtype), str(x.device))
        if isinstance(x, (list, tuple)):
            return tuple(desc(y) for y in x)
        return repr(x)

    return repr((str(target), desc(args), desc(sorted(kwargs.items()))))


class NodeTimer(torch.fx.Interpreter):
    """Runs the graph once; times each node of `timed` on the arguments it receives."""

    def __init__(self, gm: torch.fx.GraphModule, timed: set[torch.fx.Node], time_fn: Callable[[Callable], float],
                 dedupe: bool) -> None:
        super().__init__(gm)
        self.timed, self.time_fn, self.dedupe = timed, time_fn, dedupe
        self.times: dict[torch.fx.Node, float] = {}
        self.errors: dict[torch.fx.Node, str] = {}
        self.values: dict[torch.fx.Node, Any] = {}
        self._cache: dict[str, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = _to_meta(result)
        if n in self.timed:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            key = _signature(n.target, args, kwargs) if self.dedupe else None
            try:
                if key is not None and key in self._cache:
                    self.times[n] = self._cache[key]
                else:
                    target = n.target
                    self.times[n] = self.time_fn(lambda: target(*args, **kwargs))
                    if key is not None:
                        self._cache[key] = self.times[n]
            except Exception as e:  # noqa: BLE001 - one node that cannot run alone must not end the run
                self.errors[n] = f"{type(e).__name__}: {e}"
        return result


def restorer(gm: torch.fx.GraphModule, inputs: list[Any]) -> Callable[[], None]:
    """Puts integer placeholders the graph writes back (`copy_(placeholder, ...)`) to their first value."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    written = {n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.copy_.default
               and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "placeholder"}
    dst = [inputs[i] for i, p in enumerate(placeholders) if p in written and isinstance(inputs[i], torch.Tensor)
           and not inputs[i].is_floating_point()]
    src = [t.clone() for t in dst]

    def restore() -> None:
        if dst:
            torch._foreach_copy_(dst, src)

    return restore


def time_graph(gm: torch.fx.GraphModule, inputs: list[Any], restore: Callable[[], None], device: torch.device,
               args) -> dict[str, Any]:
    def call() -> Any:
        restore()
        return gm(*inputs)

    out: dict[str, Any] = {"graph_eager": measure(call, device, warmup_ms=args.warmup_ms, rep_ms=args.graph_rep_ms)}
    if device.type == "cuda":
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            out["graph_cudagraph"] = measure(graph.replay, device, warmup_ms=args.warmup_ms,
                                             rep_ms=args.graph_rep_ms)
            del graph
        except Exception as e:  # noqa: BLE001 - recorded; the eager time is then the reference
            out["graph_cudagraph_error"] = f"{type(e).__name__}: {e}"
    restore()
    return out


def _stats(errors: list[float]) -> dict[str, float | None]:
    if not errors:
        return {"median": None, "p90": None, "mean": None}
    s = sorted(errors)
    return {"median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "mean": statistics.fmean(s)}


def measure_graph(traced, models: dict[str, CostModel], args) -> dict[str, Any]:
    gm, sizes = traced.before, traced.sizes
    uncal = models["roofline"]
    symbolic: dict[str, Any] = {}
    for name, model in models.items():
        try:
            symbolic[name] = model.estimate(gm).total("time_s", sizes)
        except Exception as e:  # noqa: BLE001
            symbolic[name] = f"{type(e).__name__}: {e}"
    timed = {n for n in gm.graph.nodes if (c := uncal.node_cost(n)) is not None and c.kind != "free"}
    inputs = make_inputs(gm, sizes, args.device, args.seed)
    restore = restorer(gm, inputs)

    def time_fn(fn: Callable) -> float:
        return measure(fn, args.device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)

    t0 = time.perf_counter()
    timer = NodeTimer(gm, timed, time_fn, args.dedupe)
    with torch.no_grad():
        timer.run(*inputs)
    restore()
    node_wall = time.perf_counter() - t0
    for node, value in timer.values.items():  # price the shapes that ran (a symbolic M becomes a number)
        node.meta["val"] = value
    with torch.no_grad():
        graph_times = time_graph(gm, inputs, restore, args.device, args)

    rows = []
    for node in gm.graph.nodes:
        if node not in timed:
            continue
        costs = {name: model.node_cost(node).evaluate() for name, model in models.items()}
        c = costs["roofline"]
        rows.append({"node": node.name, "op": c.op, "kind": c.kind, "shape": c.shape, "dtype": c.dtype,
                     "flops": c.flops, "bytes": c.bytes, "measured_s": timer.times.get(node),
                     "predicted_s": {name: k.time_s for name, k in costs.items()},
                     "error": timer.errors.get(node)})
    return {"rows": rows, "graph_times": graph_times, "predicted_symbolic_s": symbolic, "node_timing_wall_s": node_wall,
            "weight_bytes": traced.weight_bytes, "sizes": {str(k): v for k, v in sizes.items()},
            "names": traced.names}


def summarize(graphs: list[dict[str, Any]], variants: list[str], args) -> dict[str, Any]:
    rows = [r for g in graphs for r in g["rows"]]
    ok = [r for r in rows if r["measured_s"] is not None and r["measured_s"] > 0]
    for r in ok:
        r["rel_error"] = {v: abs(r["predicted_s"][v] - r["measured_s"]) / r["measured_s"] for v in variants}
        r["signed_error"] = {v: (r["predicted_s"][v] - r["measured_s"]) / r["measured_s"] for v in variants}

    def breakdown(key: str) -> dict[str, Any]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in ok:
            groups[r[key]].append(r)
        return {g: {"nodes": len(rs), "measured_s": sum(r["measured_s"] for r in rs),
                    "predicted_s": {v: sum(r["predicted_s"][v] for r in rs) for v in variants},
                    "median_error": {v: statistics.median(r["rel_error"][v] for r in rs) for v in variants}}
                for g, rs in sorted(groups.items(), key=lambda kv: -sum(r["measured_s"] for r in kv[1]))}

    measured = {"node_sum": sum(r["measured_s"] for r in ok)}
    for key in ("graph_eager", "graph_cudagraph"):
        values = [g["graph_times"].get(key) for g in graphs]
        if all(isinstance(v, float) for v in values):
            measured[key] = sum(values)
    reference = "graph_cudagraph" if "graph_cudagraph" in measured else "graph_eager"
    predicted = {v: sum(r["predicted_s"][v] for r in rows) for v in variants}
    e2e = {"reference": reference, "measured_s": measured, "predicted_s": predicted,
           "error": {v: (predicted[v] - measured[reference]) / measured[reference] for v in variants},
           "error_vs": {k: {v: (predicted[v] - m) / m for v in variants} for k, m in measured.items()},
           "predicted_symbolic_s": [g["predicted_symbolic_s"] for g in graphs]}

    def compact(r: dict) -> dict:
        return {k: r.get(k) for k in ("node", "op", "kind", "shape", "dtype", "measured_s", "predicted_s",
                                      "signed_error", "error")}

    worst_rel = sorted(ok, key=lambda r: -r["rel_error"]["calibrated"])[:WORST]
    worst_abs = sorted(ok, key=lambda r: -abs(r["predicted_s"]["calibrated"] - r["measured_s"]))[:WORST]
    out = {
        "graphs": len(graphs), "nodes_timed": len(ok),
        "nodes_failed": [{"node": r["node"], "op": r["op"], "error": r["error"]} for r in rows if r["error"]],
        "end_to_end": e2e,
        "per_node_error": {v: _stats([r["rel_error"][v] for r in ok]) for v in variants},
        "by_kind": breakdown("kind"), "by_op": breakdown("op"),
        "worst_nodes_relative": [compact(r) for r in worst_rel],
        "worst_nodes_absolute": [compact(r) for r in worst_abs],
        "graph_meta": [{k: g[k] for k in ("sizes", "names", "weight_bytes", "node_timing_wall_s", "graph_times")}
                       for g in graphs],
    }
    if args.all_nodes:
        out["nodes"] = [compact(r) for r in rows]
    med, e2e_err = out["per_node_error"]["calibrated"]["median"], e2e["error"]["calibrated"]
    out["checks"] = {
        "median_node_error": med, "median_node_error_ok": med is not None and med <= GOALS["median_node_error"],
        "end_to_end_error": e2e_err, "end_to_end_reference": reference,
        "end_to_end_error_ok": abs(e2e_err) <= GOALS["end_to_end_error"],
        "variants_meeting_both": [v for v in variants if out["per_node_error"][v]["median"] is not None
                                  and out["per_node_error"][v]["median"] <= GOALS["median_node_error"]
                                  and abs(e2e["error"][v]) <= GOALS["end_to_end_error"]]}
    return out


def print_tables(result: dict[str, Any]) -> None:
    print(f"\n## Cost model vs measurement: {result['model']['name']} on {result['device']} "
          f"({result['hardware']}; profile: {result['profile']['source']})\n")
    print("| workload | variant | median node error | p90 node error | predicted ms | measured ms (reference) "
          "| end-to-end error |")
    print("|---|---|---|---|---|---|---|")
    for wname, w in result["workloads"].items():
        if "error" in w and "end_to_end" not in w:
            print(f"| {wname} | FAILED: {w['error'].splitlines()[-1]} | | | | | |")
            continue
        e2e = w["end_to_end"]
        ref = e2e["measured_s"][e2e["reference"]]
        for v, s in w["per_node_error"].items():
            print(f"| {wname} | {v} | {s['median']:.1%} | {s['p90']:.1%} | {e2e['predicted_s'][v] * 1e3:.3f} | "
                  f"{ref * 1e3:.3f} ({e2e['reference']}) | {e2e['error'][v]:+.1%} |")
    for wname, w in result["workloads"].items():
        if "by_kind" not in w:
            continue
        m = w["end_to_end"]["measured_s"]
        print(f"\n{wname}: measured " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in m.items())
              + f"; nodes timed {w['nodes_timed']}")
        variants = list(w["per_node_error"])
        print("\n| kind | nodes | measured ms | " + " | ".join(f"{v} ms (median err)" for v in variants) + " |")
        print("|---|---|---|" + "---|" * len(variants))
        for kind, k in w["by_kind"].items():
            cells = " | ".join(f"{k['predicted_s'][v] * 1e3:.3f} ({k['median_error'][v]:.0%})" for v in variants)
            print(f"| {kind} | {k['nodes']} | {k['measured_s'] * 1e3:.3f} | {cells} |")
    print(f"\nchecks: {json.dumps(result['checks'])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hardware = resolve("auto", args.device)
    profile, source = get_profile(args, hardware)
    models: dict[str, CostModel] = {"roofline": CostModel(hardware), "calibrated": CostModel(hardware, profile),
                                    "proposed": ProposedCostModel(hardware, profile)}
    if profile.get("launch_overhead_graph_s") is not None:
        graph_launch = {**profile, "launch_overhead_s": profile["launch_overhead_graph_s"]}
        models["calibrated+graph-launch"] = CostModel(hardware, graph_launch)
        models["proposed+graph-launch"] = ProposedCostModel(hardware, graph_launch)
    variants = list(models)
    out = Path(args.out) if args.out else RESULTS_DIR / f"cost_model_{args.model}_{device_slug(args.device)}.json"
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python"] + sys.argv),
        "device": device_name(args.device), "hardware": hardware.name, "versions": {
            **versions(), "transformers": transformers.__version__, "llmcompress": llmcompress.__version__},
        "threads": torch.get_num_threads() if args.device.type == "cpu" else None,
        "model": {"name": args.model, **MODELS[args.model], "dtype": args.dtype},
        "settings": {"batch": args.batch, "kv_len": args.kv_len, "prefill_len": args.prefill_len,
                     "dedupe": args.dedupe, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                     "graph_rep_ms": args.graph_rep_ms},
        "profile": {"source": source, **{k: profile.get(k) for k in (
            "hardware", "device", "created", "versions", "grid", "bandwidth_bytes_per_s", "launch_overhead_s",
            "launch_overhead_graph_s")}},
        "goals": GOALS, "workloads": {}, "checks": {},
    }
    if out.is_file():  # keep the workloads not rerun now, measured on the same device and model
        old = json.loads(out.read_text())
        if old.get("device") == result["device"] and old.get("model") == result["model"]:
            for wname, w in old.get("workloads", {}).items():
                if wname not in args.workloads:
                    result["workloads"][wname] = w
                    if wname in old.get("checks", {}):
                        result["checks"][wname] = old["checks"][wname]
    model = build_model(args)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    for wname in args.workloads:
        start = time.perf_counter()
        try:
            if wname == "decode":
                ids = torch.randint(0, model.config.vocab_size, (args.batch, 1), generator=gen).to(args.device)
                traced = trace_model(model, ids, kv_len=args.kv_len)
            else:
                ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prefill_len),
                                    generator=gen).to(args.device)
                traced = trace_model(model, ids)
            graphs = [measure_graph(t, models, args) for t in traced]
            w = summarize(graphs, variants, args)
            result["checks"][wname] = w.pop("checks")
        except Exception as e:  # noqa: BLE001 - recorded; the other workload still runs
            w = {"error": traceback.format_exc()}
            print(f"{wname} failed: {type(e).__name__}: {e}", file=sys.stderr)
        w["wall_s"] = round(time.perf_counter() - start, 1)
        w["created"], w["command"] = time.strftime("%Y-%m-%dT%H:%M:%S%z"), result["command"]
        w["profile"] = {"source": source, "created": profile.get("created")}
        result["workloads"][wname] = w
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    print_tables(result)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0 if all("error" not in w for w in result["workloads"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
