"""Cost reports of a model: per-node and per-layer roofline tables and totals, as text, JSON or HTML.

Entry points: `report_model(path, ...)` loads a model on the meta device, traces it (`trace.trace_model`), prices
every node with the roofline `CostModel` and returns the report as a dict; `build_report(traced, hardware, ...)`
does the pricing for graphs already traced. `render_text`, `render_json`, `render_html` (or `render(report, fmt)`)
format a report dict, and read nothing else, so `render_html(json.loads(render_json(r)))` works.
`llmcompress report MODEL` is the command.

JSON schema, `report_version` 1. Keys are always present (null where they do not apply); sizes are in bytes,
FLOPs and seconds, at the concrete sizes of `workload`:

* `report_version`: 1. `versions`: {llmcompress, torch, transformers}.
* `model`: {name, path, architecture, model_type, dtype, parameters, parameter_bytes, num_hidden_layers}.
* `workload`: {mode: "prefill" | "decode", batch, seq (new tokens per sequence; 1 for decode), kv_len (decode:
  the static cache length; else null), tokens_per_step (batch · seq)}.
* `hardware`: {name, kind, memory_bandwidth_bytes_per_s (the calibrated one when `calibrated`), peak_flops
  {dtype: FLOP/s}, launch_overhead_s, calibrated, roof_dtype (the model's dtype: the matmul roof), ridge_intensity
  (FLOP/byte where the roof bends, at roof_dtype)}.
* `recipe`: null, or {name, source, passes: [pass names]}: then `nodes`, `layers` and `totals` describe the graph
  after the recipe's passes and `totals_before` the graph as captured.
* `trace`: {layers_traced, repeated_from}: a model whose decoder layers are alike is traced with three of them and
  the last one's rows repeated up to its depth (`layer_repeat`); then `repeated_from` names that traced layer
  ("model.layers.2"), else it is null and every layer was traced.
* `graphs`: one per Dynamo graph: {index, kernels, free_nodes, weight_bytes, latency_s, symbols {Dynamo symbol:
  readable name}}.
* `totals` (and `totals_before`, null without a recipe): {flops, bytes, weight_bytes, kernels, free_nodes
  (views and reshapes: counted, not priced, not listed), latency_s (sum of node times), launch_overhead_s (its
  launch part), compute_bound_time_s, memory_bound_time_s, time_by_kind {kind: s}, tokens_per_step, tokens_per_s
  (tokens_per_step / latency_s: the ceiling this prediction allows), decode_ceiling_tokens_per_s (memory-bound
  decode ceiling at batch 1: bandwidth / weight_bytes, every weight read once per token), symbolic {flops, bytes,
  latency_s: strings in the readable size names, e.g. "2*batch*seq*4096 + ..."}, latency_by_size (the symbolic
  latency evaluated at batch 1, 8 x seq 1, 128, 2048: [{batch, seq, latency_s, tokens_per_s}], batch or seq null
  when the graph does not depend on it; null when it depends on neither, as a decode step traced at its sizes)}.
  The text and HTML reports show latency_by_size as a table instead of the latency expression.
* `layers`: in graph order, each {layer (e.g. "model.layers.0", "model.embed_tokens", "lm_head"), kernels, flops,
  bytes, time_s, share (of totals.latency_s), time_s_before (with a recipe; else null), same_as (the first earlier
  layer whose rows are identical, else null)}.
* `lowrank`: null, or (`llmcompress report --compile-report / --lowrank-quality`, `lowrank_plot.lowrank_section`)
  {compile_report, layers: [{graph, layer, method, shape, rank, curve {kept_fraction, relative_error, chosen}}] or
  null, quality: {source, device, windows, calibration, git, rows [{model, method, ratio, kept_fraction, perplexity,
  dense_perplexity, delta_pct}], missing_runs} or null}: the HTML's "Low-rank quality / size" section.
* `moe_load`: null, or (`llmcompress report --compile-report`, `moe_heatmap.moe_load`) {source ("calibration" or
  "runtime counters"), layers, tokens, share, mean_weight (null when the compile report lacks it)}: per MoE layer
  and expert, the HTML's "MoE expert load" heat-map.
* `nodes`: every priced (non-free) node of the graph(s), in graph order, each {graph, node, layer, module (the
  nn.Module path that produced it), op, kind ('matmul', 'attention', 'pointwise', 'reduction', 'data', 'custom',
  'unknown'), shape ("1x128x4096" at workload sizes), shape_symbolic ("batchxseqx4096"), dtype, flops, bytes,
  intensity (FLOP/byte; null when bytes is 0), bound ('compute', 'memory' or 'none'), time_s, share,
  replicated_from (null, or the traced layer whose row this repeats: node names then repeat too)}.

Layers come from each node's `nn_module_stack` (kept by Dynamo and AOT autograd), from the weight a canonical linear
names (`meta["llmcompress.linear"]`), or else from the node before it; `module_paths.module_path` reads Dynamo's
names as the model's module paths, whatever frame Dynamo reached the model through.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import sympy
import torch

from llmcompress._logging import logger as log
from llmcompress.cost.hardware import Hardware
from llmcompress.cost.roofline import CostModel, sym
from llmcompress.errors import did_you_mean
from llmcompress.fx_utils import tensors_in as _tensors
from llmcompress.report.module_paths import module_path, stack_path

REPORT_VERSION = 1
FORMATS = ("text", "json", "html")
DEFAULT_SEQ = 128
# The sizes of the latency table (`totals.latency_by_size`): batch 1 and 8 (one user, a small serving batch) x 1
# token (the weight reads of a decode step), 128 (a prompt) and 2048 (a long prompt).
TABLE_BATCHES = (1, 8)
TABLE_SEQS = (1, 128, 2048)

# The repeated block of a transformer: "model.layers.3", "transformer.h.3", "model.decoder.layers.3" ...
_LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks|block)\.\d+)(?=\.|$)")
_KIND_COLOURS = {"matmul": "#1f77b4", "attention": "#d62728", "pointwise": "#2ca02c", "reduction": "#ff7f0e",
                 "data": "#8c564b", "custom": "#9467bd", "unknown": "#7f7f7f"}


def check_sizes(batch: int, seq: int | None, kv_len: int | None) -> tuple[int, int, int | None]:
    """(batch, seq, kv_len) with seq's default filled in; ValueError naming the size that is wrong."""
    for name, value in (("batch", batch), ("seq", seq), ("kv_len", kv_len)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if kv_len is not None:
        if seq not in (None, 1):
            raise ValueError(f"seq must be 1 with kv_len (a report of one decode step), got {seq}")
        seq = 1
    return batch, seq if seq is not None else DEFAULT_SEQ, kv_len


def report_model(path: str | Path, *, batch: int = 1, seq: int | None = None, kv_len: int | None = None,
                 hardware: str | Hardware = "auto", recipe: str | None = None,
                 dtype: torch.dtype | str | None = None, full_trace: bool = False) -> dict[str, Any]:
    """The cost report of the model at `path` (a local folder with config.json, or a config .json file).

    A prefill of `batch` sequences of `seq` tokens (default 128), or with `kv_len` one decode step of `batch`
    tokens over a static cache of `kv_len` slots. The model is built on the meta device: no weights are read.
    Unless `full_trace`, a model whose decoder layers are alike is traced with three of them and the last one's
    costs are repeated up to its depth (`layer_repeat`; a 70B config then reports in seconds, not minutes).
    Raises `ValueError` for bad sizes, `OptionError` for unknown hardware or recipe, `ModelLoadError` for a path.
    """
    from llmcompress.cost.device_profile import load_profile
    from llmcompress.cost.hardware import resolve
    from llmcompress.recipes import load_recipe
    from llmcompress.report.layer_repeat import TRACED_LAYERS, repeatable_depth, shallow_config
    from llmcompress.report.model_loading import load_config, load_model, model_name
    from llmcompress.report.trace import trace_model

    batch, seq, kv_len = check_sizes(batch, seq, kv_len)
    hw = resolve(hardware) if isinstance(hardware, str) else hardware
    recipe_info = None
    if recipe is not None:
        r = load_recipe(recipe)
        recipe_info = {"name": r.name, "source": r.source, "passes": [p.name for p in r.passes]}
    profile = load_profile(hw)
    depth = None if full_trace else repeatable_depth(load_config(path))
    if depth is not None:
        model = load_model(path, device="meta", dtype=dtype, config=shallow_config(load_config(path)))
        traced = trace_model(model, torch.zeros(batch, seq, dtype=torch.long, device="meta"), recipe=recipe,
                             kv_len=kv_len)
        info = model_info(model, path, name=model_name(path))
        try:
            template = _template_layer_of_model(model)
            per_layer = list(model.get_submodule(template).parameters())
            extra = depth - TRACED_LAYERS
            info["parameters"] += extra * sum(p.numel() for p in per_layer)
            info["parameter_bytes"] += extra * sum(p.numel() * p.element_size() for p in per_layer)
            info["num_hidden_layers"] = depth
            return build_report(traced, hw, profile=profile, model=info, batch=batch, seq=seq, kv_len=kv_len,
                                recipe=recipe_info, depth=depth)
        except NotRepeatable as e:
            log.info("report: tracing all %d layers of %s: %s", depth, path, e)
    model = load_model(path, device="meta", dtype=dtype)
    traced = trace_model(model, torch.zeros(batch, seq, dtype=torch.long, device="meta"), recipe=recipe,
                         kv_len=kv_len)
    info = model_info(model, path, name=model_name(path))
    return build_report(traced, hw, profile=profile, model=info, batch=batch, seq=seq, kv_len=kv_len,
                        recipe=recipe_info)


def _template_layer_of_model(model: torch.nn.Module) -> str:
    """The module path of decoder layer `TRACED_LAYERS - 1` ("model.layers.2")."""
    from llmcompress.report.layer_repeat import TRACED_LAYERS

    names = [n for n, _ in model.named_modules() if _LAYER_RE.fullmatch(n) and n.endswith(f".{TRACED_LAYERS - 1}")]
    if len(names) != 1:
        raise NotRepeatable(f"cannot tell the decoder layers of {type(model).__name__} apart: {names}")
    return names[0]


def model_info(model: torch.nn.Module, path: str | Path | None = None, name: str | None = None) -> dict[str, Any]:
    config = getattr(model, "config", None)
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    return {"name": name or type(model).__name__, "path": str(path) if path is not None else None,
            "architecture": type(model).__name__,
            "model_type": getattr(config, "model_type", None), "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in params),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None)}


class _Evaluator:
    """Numbers of sympy cost expressions at fixed sizes, cached per expression (identical layers share them)."""

    def __init__(self, sizes: Mapping[Any, int]) -> None:
        self.subs = {(sympy.Symbol(k) if isinstance(k, str) else k): sympy.sympify(v) for k, v in sizes.items()}
        self.cache: dict[Any, float] = {}

    def __call__(self, x: Any) -> float:
        if isinstance(x, (int, float)):
            return float(x)
        value = self.cache.get(x)
        if value is None:
            expr = sympy.sympify(x).xreplace(self.subs)
            if expr.free_symbols:
                raise ValueError(f"cost {x} depends on {sorted(map(str, expr.free_symbols))}: no size given")
            value = self.cache[x] = float(expr)
        return value


def _module_of(node: torch.fx.Node, modules: Collection[str] | None) -> str | None:
    """The deepest module of the model in the node's `nn_module_stack` (a function transformers wraps as a module
    under it is named after it: `module_paths.stack_path`), else the module of the weight a canonical linear names."""
    stack = node.meta.get("nn_module_stack")
    sources = [entry[0] if isinstance(entry, tuple) else str(entry) for entry in (stack or {}).values()]
    path = stack_path(sources, modules) if modules is not None else module_path(sources[-1]) if sources else None
    if path is not None:
        return path
    weight = node.meta.get("llmcompress.linear")
    if isinstance(weight, str):
        weight = weight.rsplit(".", 1)[0] if weight.endswith((".weight", ".bias")) else weight
        return module_path(weight, modules) or weight
    return None


def layer_of(module: str) -> str:
    """The transformer block a module path belongs to ("model.layers.3"), else its first two components."""
    m = _LAYER_RE.match(module)
    if m:
        return m.group(1)
    return ".".join(module.split(".")[:2]) if module else "(graph)"


def _rename(expr: Any, names: Mapping[str, str]) -> Any:
    expr = sympy.sympify(expr)
    return expr.xreplace({s: sympy.Symbol(names[str(s)]) for s in expr.free_symbols if str(s) in names})


def _shape(node: torch.fx.Node, ev: _Evaluator, names: Mapping[str, str]) -> tuple[str, str]:
    outs = _tensors(node.meta.get("val"))
    if not outs:
        return "", ""
    dims = [sym(d) for d in outs[0].shape]
    concrete = "x".join(str(int(ev(d))) for d in dims)
    symbolic = "x".join(str(_rename(d, names)).replace(" ", "") for d in dims)
    return concrete, symbolic


def _price(cm: CostModel, gm: torch.fx.GraphModule, sizes: Mapping[Any, int], names: Mapping[str, str],
           index: int, modules: Collection[str] | None = None
           ) -> tuple[list[dict[str, Any]], dict[str, int], list[tuple[Any, Any, Any]]]:
    """(priced rows, free node count per layer, each row's symbolic (flops, bytes, time)) of one graph."""
    ev = _Evaluator(sizes)
    rows: list[dict[str, Any]] = []
    free: dict[str, int] = {}
    exprs: list[tuple[Any, Any, Any]] = []
    module = None
    node_modules: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        cost = cm.node_cost(node)
        if cost is None:
            continue
        # A node with no module of its own (a pass made it, or AOT's input mutations): its latest input's, else
        # the module of the node before it.
        own = _module_of(node, modules) or next(
            (node_modules[a] for a in reversed(node.all_input_nodes) if a in node_modules), None)
        module = node_modules[node] = own or module
        if cost.kind == "free":
            layer = layer_of(module or "")
            free[layer] = free.get(layer, 0) + 1
            continue
        exprs.append((_rename(cost.flops, names), _rename(cost.bytes, names), _rename(cost.time_s, names)))
        f, b, t = ev(cost.flops), ev(cost.bytes), ev(cost.time_s)
        c, m = ev(cost.compute_time_s), ev(cost.memory_time_s)
        shape, shape_sym = _shape(node, ev, names)
        rows.append({
            "graph": index, "node": node.name, "layer": layer_of(module or ""), "module": module or "",
            "op": cost.op, "kind": cost.kind, "shape": shape, "shape_symbolic": shape_sym, "dtype": cost.dtype,
            "flops": f, "bytes": b, "intensity": f / b if b else None,
            "bound": "compute" if c > m else "memory" if m > 0 else "none", "time_s": t, "share": 0.0,
            "replicated_from": None,
        })
    return rows, free, exprs


def _symbolic(exprs: Sequence[tuple[Any, Any, Any]]) -> dict[str, Any]:
    return {"flops": sympy.Add(*(e[0] for e in exprs)), "bytes": sympy.Add(*(e[1] for e in exprs)),
            "latency_s": sympy.Add(*(e[2] for e in exprs))}


def _free_total(by_layer: Mapping[str, int], template: str | None, depth: int | None) -> int:
    """Free nodes of a graph, with the template layer's counted again for each repeated layer."""
    total = sum(by_layer.values())
    if template is not None and depth is not None:
        from llmcompress.report.layer_repeat import TRACED_LAYERS

        total += (depth - TRACED_LAYERS) * by_layer.get(template, 0)
    return total


class NotRepeatable(Exception):
    """The traced layers differ, or span several graphs: the model must be traced at its full depth."""


def _template_layer(rows: Sequence[dict[str, Any]]) -> str:
    """The last traced decoder layer ("model.layers.2") of a shallow trace."""
    from llmcompress.report.layer_repeat import TRACED_LAYERS, layer_index

    layers = {r["layer"] for r in rows if _LAYER_RE.match(r["layer"])}
    wanted = [x for x in layers if (layer_index(x) or ("", -1))[1] == TRACED_LAYERS - 1]
    if len(wanted) != 1:
        raise NotRepeatable(f"expected one decoder layer {TRACED_LAYERS - 1}, found {sorted(layers)}")
    return wanted[0]


def _totals(rows: list[dict[str, Any]], free: int, weight_bytes: int, symbolic: Mapping[str, Any],
            tokens_per_step: int, bandwidth: float, launch_s: float) -> dict[str, Any]:
    latency = sum((r["time_s"] for r in rows), 0.0)
    by_kind: dict[str, float] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + r["time_s"]
    return {
        "flops": sum((r["flops"] for r in rows), 0.0), "bytes": sum((r["bytes"] for r in rows), 0.0),
        "weight_bytes": weight_bytes,
        "kernels": len(rows), "free_nodes": free, "latency_s": latency, "launch_overhead_s": len(rows) * launch_s,
        "compute_bound_time_s": sum((r["time_s"] for r in rows if r["bound"] == "compute"), 0.0),
        "memory_bound_time_s": sum((r["time_s"] for r in rows if r["bound"] != "compute"), 0.0),
        "time_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / latency if latency else None,
        "decode_ceiling_tokens_per_s": bandwidth / weight_bytes if weight_bytes else None,
        "symbolic": {k: _expr_str(v) for k, v in symbolic.items()},
        "latency_by_size": _latency_by_size(symbolic["latency_s"]),
    }


def _latency_by_size(latency: Any) -> list[dict[str, Any]] | None:
    """The symbolic latency at `TABLE_BATCHES` x `TABLE_SEQS`: [{batch, seq, latency_s, tokens_per_s}], or None when
    it depends on no size or on one that is not batch or seq (a decode step is traced at fixed sizes)."""
    expr = sympy.sympify(latency)
    names = {str(s): s for s in expr.free_symbols}
    if not names or not set(names) <= {"batch", "seq"}:
        return None
    out = []
    for batch in TABLE_BATCHES if "batch" in names else (None,):
        for seq in TABLE_SEQS if "seq" in names else (None,):
            subs = {names[k]: v for k, v in (("batch", batch), ("seq", seq)) if v is not None}
            t = float(expr.xreplace({k: sympy.Integer(v) for k, v in subs.items()}))
            out.append({"batch": batch, "seq": seq, "latency_s": t,
                        "tokens_per_s": (batch or 1) * (seq or 1) / t if t > 0 else None})
    return out


def _expr_str(expr: Any) -> str:
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return str(int(expr))
    if not expr.free_symbols:
        return f"{float(expr):.4g}"
    # Floats to 4 significant digits: the symbolic form is for reading how costs scale, the numbers are elsewhere.
    return str(expr.xreplace({f: sympy.Integer(int(f)) if float(f).is_integer() else sympy.Float(f, 4)
                              for f in expr.atoms(sympy.Float)}))


def _relative(module: str, layer: str) -> str:
    """A module's path inside its layer ("self_attn.q_proj"); "" for the layer itself."""
    return module[len(layer) + 1:] if module.startswith(layer + ".") else "" if module == layer else module


def _layers(rows: list[dict[str, Any]], latency: float, before: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    order: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        order.setdefault(r["layer"], []).append(r)
    before_time: dict[str, float] = {}
    for r in before or []:
        before_time[r["layer"]] = before_time.get(r["layer"], 0.0) + r["time_s"]
    out, seen = [], {}
    for layer, members in order.items():
        sig = tuple((_relative(r["module"], layer), r["op"], r["shape"], r["flops"], r["bytes"], r["time_s"])
                    for r in members)
        time_s = sum(r["time_s"] for r in members)
        out.append({"layer": layer, "kernels": len(members), "flops": sum(r["flops"] for r in members),
                    "bytes": sum(r["bytes"] for r in members), "time_s": time_s,
                    "share": time_s / latency if latency else 0.0,
                    "time_s_before": before_time.get(layer, 0.0) if before is not None else None,
                    "same_as": seen.get(sig) if _LAYER_RE.match(layer) else None})
        seen.setdefault(sig, layer)
    for layer, t in before_time.items():  # layers a pass removed entirely
        if layer not in order:
            out.append({"layer": layer, "kernels": 0, "flops": 0.0, "bytes": 0.0, "time_s": 0.0, "share": 0.0,
                        "time_s_before": t, "same_as": None})
    return out


def graph_weight_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the constant tensors (frozen weights) a graph's get_attr nodes read, each counted once."""
    total, seen = 0, set()
    for node in gm.graph.find_nodes(op="get_attr"):
        value = getattr(gm, node.target, None) if "." not in node.target else None
        if value is None:
            owner, _, attr = node.target.rpartition(".")
            value = getattr(gm.get_submodule(owner), attr, None)
        if isinstance(value, torch.Tensor) and node.target not in seen:
            seen.add(node.target)
            total += value.numel() * value.element_size()
    return total


def build_report(traced: Sequence[Any], hardware: Hardware, *, profile: Mapping[str, Any] | None = None,
                 model: Mapping[str, Any] | None = None, batch: int = 1, seq: int = DEFAULT_SEQ,
                 kv_len: int | None = None, recipe: Mapping[str, Any] | None = None,
                 depth: int | None = None) -> dict[str, Any]:
    """The report dict (schema in the module docstring) of `trace_model`'s graphs, priced on `hardware`.

    traced: `TracedGraph`s whose `sizes` are the workload's (batch, seq); with `recipe` their `before` is priced too.
    depth: the model was traced with `layer_repeat.TRACED_LAYERS` decoder layers and has `depth`: repeat the last
        traced layer's rows up to it (raises `NotRepeatable` when the traced layers differ or span several graphs).
    """
    import transformers

    from llmcompress.report.layer_repeat import TRACED_LAYERS, repeat_layers, repeat_weight_bytes
    from llmcompress.version import __version__ as llmcompress_version

    cm = CostModel(hardware, profile)
    tokens = batch * seq
    rows: list[dict[str, Any]] = []
    rows_before: list[dict[str, Any]] = []
    free = free_before = 0
    exprs_after: list[tuple[Any, Any, Any]] = []
    exprs_before: list[tuple[Any, Any, Any]] = []
    graphs = []
    template = None
    if depth is not None and len(traced) != 1:
        raise NotRepeatable(f"the shallow trace gave {len(traced)} graphs; layers are repeated within one graph")
    weight_bytes = weight_bytes_before = 0
    for i, g in enumerate(traced):
        r, free_by_layer, e = _price(cm, g.after, g.sizes, g.names, i, g.modules)
        wb, wb_before = int(g.weight_bytes), graph_weight_bytes(g.before)
        if depth is not None:
            template = _template_layer(r)
            repeated = repeat_layers(r, e, template, depth)
            if repeated is None:
                raise NotRepeatable(f"the traced decoder layers differ (template {template})")
            r, e = repeated
            wb = repeat_weight_bytes(g.weight_bytes_by_name, template, depth)
            wb_before = repeat_weight_bytes(g.weight_bytes_by_name_before, template, depth)
        f = _free_total(free_by_layer, template, depth)
        rows += r
        exprs_after += e
        free += f
        if recipe is not None:
            rb, free_by_layer, eb = _price(cm, g.before, g.sizes, g.names, i, g.modules)
            fb = _free_total(free_by_layer, template, depth)
            if template is not None:
                repeated = repeat_layers(rb, eb, template, depth)
                if repeated is None:
                    raise NotRepeatable(f"the traced decoder layers differ before the passes (template {template})")
                rb, eb = repeated
            rows_before += rb
            exprs_before += eb
            free_before += fb
        weight_bytes += wb
        weight_bytes_before += wb_before
        graphs.append({"index": i, "kernels": len(r), "free_nodes": f, "weight_bytes": wb,
                       "latency_s": sum(x["time_s"] for x in r), "symbols": dict(sorted(g.names.items()))})
    totals = _totals(rows, free, weight_bytes, _symbolic(exprs_after), tokens, cm.bandwidth, cm.launch_s)
    for r in rows:
        r["share"] = r["time_s"] / totals["latency_s"] if totals["latency_s"] else 0.0
    totals_before = None
    if recipe is not None:
        totals_before = _totals(rows_before, free_before, weight_bytes_before, _symbolic(exprs_before), tokens,
                                cm.bandwidth, cm.launch_s)
    roof_dtype = (model or {}).get("dtype") or "float32"
    peak = hardware.peak_flops.get(roof_dtype, hardware.peak_flops["float32"])
    return {
        "report_version": REPORT_VERSION,
        "versions": {"llmcompress": llmcompress_version, "torch": torch.__version__.split("+")[0],
                     "transformers": transformers.__version__},
        "model": dict(model) if model is not None else None,
        "workload": {"mode": "decode" if kv_len is not None else "prefill", "batch": batch, "seq": seq,
                     "kv_len": kv_len, "tokens_per_step": tokens},
        "hardware": {"name": hardware.name, "kind": hardware.kind, "memory_bandwidth_bytes_per_s": cm.bandwidth,
                     "peak_flops": dict(hardware.peak_flops), "launch_overhead_s": cm.launch_s,
                     "calibrated": profile is not None, "roof_dtype": roof_dtype,
                     "ridge_intensity": peak / cm.bandwidth},
        "recipe": dict(recipe) if recipe is not None else None,
        "trace": {"layers_traced": (depth and TRACED_LAYERS) or (model or {}).get("num_hidden_layers"),
                  "repeated_from": template},
        "graphs": graphs,
        "totals": totals,
        "totals_before": totals_before,
        "layers": _layers(rows, totals["latency_s"], rows_before if recipe is not None else None),
        "lowrank": None,
        "moe_load": None,
        "nodes": rows,
    }


def render(report: Mapping[str, Any], fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}{did_you_mean(fmt, FORMATS)}")
    return {"text": render_text, "json": render_json, "html": render_html}[fmt](report)


def render_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=1) + "\n"


def _si(x: float | None, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 2.98 G, 82.3 MB."""
    if x is None:
        return "-"
    if x == 0:
        return f"0 {unit}".rstrip()
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)):
        if abs(x) >= scale * 0.9995 or scale == 1.0:
            return f"{_digits(x / scale)} {prefix}{unit}".rstrip()
    raise AssertionError


def _digits(v: float) -> str:
    a = abs(v)
    if a < 1000 and float(v).is_integer():
        return str(int(v))
    return f"{v:.0f}" if a >= 99.95 else f"{v:.1f}" if a >= 9.995 else f"{v:.2f}" if a >= 0.01 else f"{v:.2g}"


def _time(s: float | None) -> str:
    if s is None:
        return "-"
    if s == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale * 0.9995:
            return f"{_digits(s / scale)} {unit}"
    return f"{_digits(s / 1e-9)} ns"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _intensity(x: float | None) -> str:
    return "-" if x is None else _digits(x)


def _short_op(op: str) -> str:
    return op.removeprefix("aten.").removesuffix(".default")


def _speedup(before: float | None, after: float | None) -> str:
    return "-" if not before or not after else f"{before / after:.2f}x"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Fixed-width text table; `align` has one 'l' or 'r' per column."""
    widths = [max([len(h)] + [len(r[i]) for r in rows if len(r) > 1]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        if len(cells) == 1:  # a section row spanning the table
            return cells[0]
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _headline(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    m, w, hw, recipe = report["model"] or {}, report["workload"], report["hardware"], report["recipe"]
    model = f"{m.get('name', '?')} ({m.get('architecture', '?')}, {_si(m.get('parameters'))} parameters, " \
            f"{m.get('dtype', '?')})"
    if w["mode"] == "decode":
        work = f"decode step: batch {w['batch']}, 1 new token over a static cache of {w['kv_len']} = " \
               f"{_tokens(w['tokens_per_step'])} per step"
    else:
        work = f"prefill: batch {w['batch']} x seq {w['seq']} = {_tokens(w['tokens_per_step'])} per step"
    peak = hw["peak_flops"].get(hw["roof_dtype"], hw["peak_flops"]["float32"])
    hardware = f"{hw['name']} ({'calibrated' if hw['calibrated'] else 'datasheet'}): " \
               f"{_si(hw['memory_bandwidth_bytes_per_s'], 'B/s')}, {_si(peak, 'FLOP/s')} {hw['roof_dtype']}, " \
               f"ridge {_digits(hw['ridge_intensity'])} FLOP/B"
    rec = "none (the graph as captured)" if recipe is None else \
        f"{recipe['name']} ({', '.join(recipe['passes']) or 'no passes'})"
    return [("model", model), ("workload", work), ("hardware", hardware), ("recipe", rec)]


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _latency_table(report: Mapping[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    """(heading, headers, rows) of `totals.latency_by_size`: a row per batch, a column per seq; with a recipe each
    cell is "after (before)". None when the report has no such table."""
    after = report["totals"].get("latency_by_size")
    if not after:
        return None
    before = (report["totals_before"] or {}).get("latency_by_size")
    old = {(r["batch"], r["seq"]): r["latency_s"] for r in before or []}
    batches = list(dict.fromkeys(r["batch"] for r in after))
    seqs = list(dict.fromkeys(r["seq"] for r in after))
    cell = {(r["batch"], r["seq"]): _time(r["latency_s"]) + (f" ({_time(old[r['batch'], r['seq']])})"
                                                              if (r["batch"], r["seq"]) in old else "")
            for r in after}
    heading = ("Predicted latency at other sizes" + (", after the passes (before)" if old else "")
               + ": the same graph at batch x seq tokens (seq 1: one token with no KV cache; --kv-len reports a "
               "decode step)")
    headers = [""] + [f"seq {s}" if s is not None else f"seq {report['workload']['seq']}" for s in seqs]
    rows = [[f"batch {b}" if b is not None else f"batch {report['workload']['batch']}"]
            + [cell[b, s] for s in seqs] for b in batches]
    return heading, headers, rows


def _total_lines(report: Mapping[str, Any]) -> list[tuple[str, str, str | None, str]]:
    """(label, after, before or None, note) per total."""
    t, b = report["totals"], report["totals_before"]

    def pick(key: str, fmt: Any) -> tuple[str, str | None]:
        return fmt(t[key]), (fmt(b[key]) if b is not None else None)

    return [
        ("predicted latency", *pick("latency_s", _time), "at other sizes: the table below" if
         t.get("latency_by_size") else f"= {t['symbolic']['latency_s']}"),
        ("tokens/s ceiling", *pick("tokens_per_s", _si),
         f"{_tokens(t['tokens_per_step'])} per step / latency"),
        ("decode ceiling (batch 1)", *pick("decode_ceiling_tokens_per_s", _si),
         "tokens/s, memory-bound: bandwidth / weight bytes"),
        ("weight bytes", *pick("weight_bytes", lambda x: _si(x, "B")), "frozen weights the graph reads"),
        ("FLOPs", *pick("flops", _si), f"= {t['symbolic']['flops']}"),
        ("bytes moved", *pick("bytes", lambda x: _si(x, "B")), f"= {t['symbolic']['bytes']}"),
        ("kernels", *pick("kernels", str), f"+ {t['free_nodes']} free views/reshapes, not listed"),
        ("launch overhead", *pick("launch_overhead_s", _time), "one launch per kernel"),
        ("compute-bound time", *pick("compute_bound_time_s", _time), ""),
        ("memory-bound time", *pick("memory_bound_time_s", _time), ""),
    ]


def render_text(report: Mapping[str, Any]) -> str:
    with_before = report["recipe"] is not None
    out = [f"llmcompress cost report (roofline prediction, report_version {report['report_version']})", ""]
    out += [f"{k:9s} {v}" for k, v in _headline(report)]

    out += ["", "Totals"]
    symbolic = any(g["symbols"] for g in report["graphs"])
    lines = [(label, after, before, "symbolic below" if note.startswith("=") and symbolic else note)
             for label, after, before, note in _total_lines(report)]
    if with_before:
        rows = [[label, before or "-", after, _speedup(*_raw_pair(report, label)), note]
                for label, after, before, note in lines]
        out += _table(["", "before", "after", "speedup", ""], rows, "lrrrl")
    else:
        out += _table(["", "value", ""], [[label, after, note] for label, after, _, note in lines], "lrl")
    table = _latency_table(report)
    if table is not None:
        heading, headers, rows = table
        out += ["", heading]
        out += _table(headers, rows, "l" + "r" * (len(headers) - 1))
    if symbolic:
        names = sorted({n for g in report["graphs"] for n in g["symbols"].values()})
        out += ["", (f"Symbolic totals{' after the passes' if with_before else ''}, in {', '.join(names)} (the "
                     "latency's expression is in --format json):")]
        out += [f"  {key:9s} = {report['totals']['symbolic'][key]}" for key in ("flops", "bytes")]

    out += ["", "Per layer"]
    headers = ["layer", "kernels", "FLOPs", "bytes", "time", "share"] + (["before", "speedup"] if with_before else []) \
        + [""]
    rows = []
    for layer in report["layers"]:
        row = [layer["layer"], str(layer["kernels"]), _si(layer["flops"]), _si(layer["bytes"], "B"),
               _time(layer["time_s"]), _pct(layer["share"])]
        if with_before:
            row += [_time(layer["time_s_before"]), _speedup(layer["time_s_before"], layer["time_s"])]
        rows.append(row + [f"= {layer['same_as']}" if layer["same_as"] else ""])
    if not any(layer["same_as"] for layer in report["layers"]):
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    out += _table(headers, rows, "lrrrrr" + ("rr" if with_before else "") + "l")

    out += ["", "Per node (views and reshapes are free and not listed; layers identical to an earlier one are not "
                "repeated: --format json has every node)"]
    headers = ["module", "node", "op", "shape", "FLOPs", "bytes", "FLOP/B", "bound", "time", "share"]
    rows = []
    same = {layer["layer"]: layer["same_as"] for layer in report["layers"]}
    skipped: list[str] = []
    for layer, nodes in _by_layer(report["nodes"]).items():
        if same.get(layer):
            skipped.append(layer)
            continue
        if skipped:
            rows.append([_skipped_note(skipped, same)])
            skipped = []
        rows.append([layer])
        last_module = None
        for n in nodes:
            module = _relative(n["module"], layer)
            shown, last_module = (module if module != last_module else ""), module
            rows.append(["  " + shown, n["node"], _short_op(n["op"]), n["shape"], _si(n["flops"]),
                         _si(n["bytes"], "B"), _intensity(n["intensity"]), n["bound"], _time(n["time_s"]),
                         _pct(n["share"])])
    if skipped:
        rows.append([_skipped_note(skipped, same)])
    out += _table(headers, rows, "lllrrrrlrr")
    return "\n".join(out) + "\n"


def _by_layer(nodes: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Nodes grouped by layer, layers in order of first appearance, nodes in graph order."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for n in nodes:
        out.setdefault(n["layer"], []).append(n)
    return out


def _skipped_note(skipped: list[str], same: Mapping[str, str | None]) -> str:
    first, last = skipped[0], skipped[-1]
    span = first if first == last else f"{first} .. {last} ({len(skipped)} layers)"
    targets = sorted({same[s] for s in skipped})
    return f"  [{span}: identical to {', '.join(targets)}]"


def _raw_pair(report: Mapping[str, Any], label: str) -> tuple[float | None, float | None]:
    """(before, after) of a totals line where a speedup means something: times, and tokens/s inverted."""
    t, b = report["totals"], report["totals_before"]
    key = {"predicted latency": "latency_s", "launch overhead": "launch_overhead_s"}.get(label)
    if key:
        return b[key], t[key]
    if label == "tokens/s ceiling" and t["tokens_per_s"] and b["tokens_per_s"]:
        return 1 / b["tokens_per_s"], 1 / t["tokens_per_s"]
    if label == "decode ceiling (batch 1)" and t["decode_ceiling_tokens_per_s"] and b["decode_ceiling_tokens_per_s"]:
        return 1 / b["decode_ceiling_tokens_per_s"], 1 / t["decode_ceiling_tokens_per_s"]
    return None, None


def roofs(report: Mapping[str, Any]) -> list[tuple[str, float, str]]:
    """The roofs the roofline plot draws, each (what it is, peak FLOP/s, line style "solid" | "dashed"): the matmul
    peak at the model's dtype, and the float32 peak of ops off the tensor cores when it is lower (on a CPU row, or
    for a float32 model, the two are one roof and only the solid one is drawn)."""
    hw = report["hardware"]
    peak = hw["peak_flops"].get(hw["roof_dtype"], hw["peak_flops"]["float32"])
    out = [(f"{hw['roof_dtype']} matmul peak", peak, "solid")]
    if hw["peak_flops"]["float32"] < peak:
        out.append(("float32 peak of ops that do not run on tensor cores", hw["peak_flops"]["float32"], "dashed"))
    return out


def roofline_caption(report: Mapping[str, Any]) -> str:
    """The plot's caption: it names exactly the roofs `roofs` draws."""
    drawn = roofs(report)
    bw = _si(report["hardware"]["memory_bandwidth_bytes_per_s"], "B/s")
    text = ("Each node with FLOPs is a point at its arithmetic intensity and attained FLOP/s (FLOPs / predicted time, "
            "launch overhead included), its area proportional to its share of the predicted time; colour by kind. ")
    (label, peak, _), *rest = drawn
    text += f"The solid roof is min({_si(peak, 'FLOP/s')} ({label}), {bw} x intensity)"
    if rest:
        label, peak, _ = rest[0]
        text += f"; the dashed one min({_si(peak, 'FLOP/s')} ({label}), {bw} x intensity)."
    else:
        text += "; it is the only roof: this hardware row's float32 peak is not below it."
    if report["recipe"] is not None:
        text += " Nodes are those after the recipe's passes."
    return text


def roofline_png(report: Mapping[str, Any], dpi: int = 110) -> bytes:
    """The roofline plot of a report as PNG bytes: the hardware's roof(s), one point per priced node with FLOPs
    (x: FLOP/byte, y: attained FLOP/s = FLOPs / predicted time), area proportional to its share of the time."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    hw = report["hardware"]
    bw = hw["memory_bandwidth_bytes_per_s"]
    peak = roofs(report)[0][1]
    nodes = [n for n in report["nodes"] if n["flops"] > 0 and n["bytes"] > 0 and n["time_s"] > 0]
    fig = Figure(figsize=(9, 5.6), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    xs = [n["intensity"] for n in nodes] or [1.0]
    lo = min(min(xs) / 3, 0.1)
    hi = max(max(xs) * 3, 10 * peak / bw)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for label, roof, style in roofs(report):
        ax.plot(grid, [min(roof, bw * x) for x in grid], color="black", lw=2 if style == "solid" else 1,
                ls="-" if style == "solid" else "--", label=f"roof: {label} {_si(roof, 'FLOP/s')}, {_si(bw, 'B/s')}")
    for kind, colour in _KIND_COLOURS.items():
        pts = [n for n in nodes if n["kind"] == kind]
        if not pts:
            continue
        share = sum(n["share"] for n in pts)
        ax.scatter([n["intensity"] for n in pts], [n["flops"] / n["time_s"] for n in pts],
                   s=[12 + 1500 * n["share"] for n in pts], c=colour, alpha=0.6, edgecolors="white", linewidths=0.5,
                   label=f"{kind} ({len(pts)} nodes, {_pct(share)} of time)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ys = [n["flops"] / n["time_s"] for n in nodes] or [peak]
    ax.set_ylim(min(min(ys) / 3, peak / 1e4), peak * 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attained FLOP/s (FLOPs / predicted time)")
    zero = [n for n in report["nodes"] if n not in nodes]
    ax.set_title(f"{(report['model'] or {}).get('name', '')} on {hw['name']}: "
                 f"{len(nodes)} nodes plotted, {len(zero)} without FLOPs "
                 f"({_pct(sum(n['share'] for n in zero))} of time) not plotted", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px 32px; color: #1d1d1f;
       background: #fff; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
dl.head { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 8px 0 16px; }
dl.head dt { color: #666; } dl.head dd { margin: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 10px 14px; min-width: 150px; background: #fafafa; }
.card .v { font-size: 20px; font-weight: 600; } .card .l { color: #666; font-size: 12px; }
.card .b { color: #888; font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; white-space: nowrap; }
th { background: #f3f3f3; text-align: left; position: sticky; top: 0; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.share { position: relative; min-width: 70px; text-align: right; }
td.share span.bar { position: absolute; left: 0; top: 3px; bottom: 3px; background: #cfe3f7; z-index: -1; }
td.expr { white-space: normal; font-family: ui-monospace, monospace; font-size: 12px; color: #444; }
tr.same td { color: #888; }
details { margin: 4px 0; } summary { cursor: pointer; font-weight: 600; }
summary .note { font-weight: normal; color: #777; }
figure { margin: 8px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 12px; }
.kind { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 5px; }
footer { color: #999; font-size: 12px; margin-top: 30px; }
"""


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained HTML page: inline CSS, the roofline plot as an embedded PNG, no script, no external link."""
    e = html.escape
    with_before = report["recipe"] is not None
    t, b = report["totals"], report["totals_before"]
    m = report["model"] or {}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>llmcompress report: {e(str(m.get('name', '')))}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>Cost report: {e(str(m.get('name', '')))}</h1>", '<dl class="head">']
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _headline(report)]
    parts.append("</dl>")

    def card(label: str, key: str, fmt: Any) -> str:
        before = f'<div class="b">before: {e(fmt(b[key]))}</div>' if b is not None else ""
        return f'<div class="card"><div class="l">{e(label)}</div><div class="v">{e(fmt(t[key]))}</div>{before}</div>'

    parts.append('<div class="cards">')
    parts += [card("predicted latency", "latency_s", _time), card("tokens/s ceiling", "tokens_per_s", _si),
              card("decode ceiling, batch 1 (tokens/s)", "decode_ceiling_tokens_per_s", _si),
              card("weight bytes", "weight_bytes", lambda x: _si(x, "B")), card("FLOPs", "flops", _si),
              card("bytes moved", "bytes", lambda x: _si(x, "B")), card("kernels", "kernels", str)]
    parts.append("</div>")

    png = base64.b64encode(roofline_png(report)).decode("ascii")
    parts += ["<h2>Roofline</h2>", f'<figure><img alt="roofline plot" src="data:image/png;base64,{png}">',
              f"<figcaption>{e(roofline_caption(report))}</figcaption></figure>"]
    if report.get("lowrank"):
        from llmcompress.report.lowrank_plot import section_html

        parts.append(section_html(report["lowrank"]))

    parts += ["<h2>Totals</h2>", "<table><tr><th></th>"
              + ('<th class="n">before</th><th class="n">after</th><th class="n">speedup</th>' if with_before
                 else '<th class="n">value</th>') + "<th>symbolic / note</th></tr>"]
    for label, after, before, note in _total_lines(report):
        cls = "expr" if note.startswith("=") else ""
        cells = f'<td class="n">{e(before or "-")}</td><td class="n">{e(after)}</td>' \
                f'<td class="n">{e(_speedup(*_raw_pair(report, label)))}</td>' if with_before else \
                f'<td class="n">{e(after)}</td>'
        parts.append(f"<tr><td>{e(label)}</td>{cells}<td class=\"{cls}\">{e(note)}</td></tr>")
    parts.append("</table>")
    table = _latency_table(report)
    if table is not None:
        heading, headers, rows = table
        parts += [f"<h2>Latency by size</h2><p>{e(heading)}.</p>", '<table class="latency"><tr>'
                  + "".join(f'<th class="n">{e(h)}</th>' if h else "<th></th>" for h in headers) + "</tr>"]
        parts += ["<tr><td>" + e(r[0]) + "</td>" + "".join(f'<td class="n">{e(c)}</td>' for c in r[1:]) + "</tr>"
                  for r in rows]
        parts.append("</table>")
    if t["time_by_kind"]:
        parts.append("<p>Time by kind: " + ", ".join(
            f'<span class="kind" style="background:{_KIND_COLOURS.get(k, "#999")}"></span>{e(k)} {e(_time(v))} '
            f"({e(_pct(v / t['latency_s'] if t['latency_s'] else 0))})" for k, v in t["time_by_kind"].items())
            + "</p>")

    parts += ["<h2>Per layer</h2>", "<table><tr><th>layer</th><th class=\"n\">kernels</th><th class=\"n\">FLOPs</th>"
              "<th class=\"n\">bytes</th><th class=\"n\">time</th><th class=\"n\">share</th>"
              + ('<th class="n">time before</th><th class="n">speedup</th>' if with_before else "")
              + "<th></th></tr>"]
    for layer in report["layers"]:
        before_cells = f'<td class="n">{e(_time(layer["time_s_before"]))}</td>' \
                       f'<td class="n">{e(_speedup(layer["time_s_before"], layer["time_s"]))}</td>' if with_before \
            else ""
        same = f"= {layer['same_as']}" if layer["same_as"] else ""
        parts.append(f'<tr class="{"same" if same else ""}"><td>{e(layer["layer"])}</td>'
                     f'<td class="n">{layer["kernels"]}</td><td class="n">{e(_si(layer["flops"]))}</td>'
                     f'<td class="n">{e(_si(layer["bytes"], "B"))}</td><td class="n">{e(_time(layer["time_s"]))}</td>'
                     f"{_share_cell(layer['share'])}{before_cells}<td>{e(same)}</td></tr>")
    parts.append("</table>")

    parts += ["<h2>Per node</h2>", f"<p>{len(report['nodes'])} priced nodes"
              f"{' after the passes' if with_before else ''}; {t['free_nodes']} free views and reshapes not listed. "
              "Layers identical to an earlier one are folded.</p>"]
    same_as = {layer["layer"]: layer["same_as"] for layer in report["layers"]}
    by_layer = _by_layer(report["nodes"])
    head = ("<table><tr><th>module</th><th>node</th><th>op</th><th>kind</th><th>shape</th><th class=\"n\">FLOPs</th>"
            "<th class=\"n\">bytes</th><th class=\"n\">FLOP/B</th><th>bound</th><th class=\"n\">time</th>"
            "<th class=\"n\">share</th></tr>")
    for layer, nodes in by_layer.items():
        note = f' <span class="note">identical to {e(same_as[layer])}</span>' if same_as.get(layer) else ""
        total = sum(n["time_s"] for n in nodes)
        parts.append(f"<details{'' if same_as.get(layer) else ' open'}><summary>{e(layer)} "
                     f'<span class="note">{len(nodes)} kernels, {e(_time(total))}</span>{note}</summary>{head}')
        for n in nodes:
            module = _relative(n["module"], layer)
            colour = _KIND_COLOURS.get(n["kind"], "#999")
            parts.append(
                f"<tr><td>{e(module)}</td><td>{e(n['node'])}</td><td>{e(_short_op(n['op']))}</td>"
                f'<td><span class="kind" style="background:{colour}"></span>{e(n["kind"])}</td>'
                f'<td title="{e(n["shape_symbolic"])}">{e(n["shape"])}</td><td class="n">{e(_si(n["flops"]))}</td>'
                f'<td class="n">{e(_si(n["bytes"], "B"))}</td><td class="n">{e(_intensity(n["intensity"]))}</td>'
                f'<td>{e(n["bound"])}</td><td class="n">{e(_time(n["time_s"]))}</td>{_share_cell(n["share"])}</tr>')
        parts.append("</table></details>")
    if report.get("moe_load"):  # from calibration, when the caller added it (report/moe_heatmap.py)
        from llmcompress.report.moe_heatmap import html_section

        parts += html_section(report["moe_load"])
    v = report["versions"]
    parts.append(f"<footer>llmcompress {e(v['llmcompress'])}, torch {e(v['torch'])}, transformers "
                 f"{e(v['transformers'])}; report_version {report['report_version']}. Roofline predictions, not "
                 "measurements.</footer></body></html>")
    return "\n".join(parts) + "\n"


def _share_cell(share: float) -> str:
    width = max(0.0, min(100.0, 100 * share))
    return f'<td class="share"><span class="bar" style="width:{width:.1f}%"></span>{html.escape(_pct(share))}</td>'
