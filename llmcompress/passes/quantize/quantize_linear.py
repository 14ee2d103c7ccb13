"""`quantize-linear`: replace linears on frozen weights by quantized linears backed by our Triton kernels.

Schemes (option `scheme`) and the op each linear becomes:
* `w8a16`: int8 per-channel weights -> `llmcompress::linear_w8a16` (kernels/int8_linear.py).
* `w4a16`: int4 asymmetric groups (`group_size` 32/64/128) -> `llmcompress::linear_w4a16` (kernels/int4_linear.py),
  by round to nearest (`method: rtn`), AWQ (`awq`) or GPTQ (`gptq`).
* `w8a8`: int8 weights, dynamic per-token int8 activations -> `llmcompress::linear_w8a8`; `method: smoothquant`
  migrates activation outliers into the weights first (`alpha`).
* `fp8`: e4m3 weights and activations, per-row scales -> `llmcompress::linear_fp8` (compute capability >= 8.9).
MoE experts stored as 3-D weights (transformers' grouped matmuls) become `llmcompress::grouped_linear_w4a16` /
`grouped_linear_w8a16`, one quantized matrix per expert; experts `fuse-moe` fused (`llmcompress::moe_experts`)
become `moe_experts_w4a16` / `moe_experts_w8a16` on the same formats (`experts.py`; AWQ's 1/s applied in-kernel).

Calibrated methods run the graph on the calibration data (`options["calibration"]`: token ids, text, or batches of
the model's own inputs) through `ctx.calibration` (`calibration/service.py`), node by node, quantizing each layer from
statistics of the activations that reach it (XᵀX for GPTQ and AWQ, shared by the layers reading the same
activation; AWQ also against the float model run beside it). Results are cached per weight, so a later graph that
cannot be fed (a decode step, a graph after a graph break) reuses them; when there are none it quantizes by round to
nearest and warns. For the weight-only kernels the cost model picks, per layer, the row counts M at which the
GEMV, the GEMM and dequantize + cuBLAS run (`gemv_max_m`, `dense_min_m` op arguments).

On the CPU (weights on the CPU, lowering `inductor` or `eager`) a w8a16 / w4a16 layer becomes
`llmcompress::linear_w8a16_cpu` / `linear_w4a16_cpu` (kernels/cpu_weight_only.py, torch's CPU kernels) on weights
packed once for them (formats/cpu_packed.py) when the cost model prices it below the reference path
(kernels/cpu_path.py); round-to-nearest layers derive only the packed form, so it is the only copy kept. Shapes
torch's kernels refuse keep `linear_w8a16` / `linear_w4a16` (their reference), counted as `cpu: reference (shape)`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.calibration.data import CalibrationWarning
from llmcompress.calibration.service import Calibration, TargetInputs
from llmcompress.errors import OptionError, WeightReleasedError, did_you_mean
from llmcompress.formats import cpu_packed
from llmcompress.formats import quantized as formats
from llmcompress.fx_utils import call, finish_rewrite, grouped_matmul_ops, layer_matches
from llmcompress.kernels.cpu_path import choose_cpu_kernel, packed_dtype_unsupported
from llmcompress.kernels.kernel_path import choose_kernel_path
from llmcompress.kernels.linear_common import DENSE_OFF
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.quantize import experts as fused_experts
from llmcompress.passes.quantize.embedding import EMBEDDING_FORMATS, quantize_embeddings
from llmcompress.passes.weights import DerivedKey

aten = torch.ops.aten

SCHEMES = ("w8a16", "w4a16", "w8a8", "fp8")
_OVERRIDE_KEYS = ("scheme", "method", "group_size", "alpha", "skip")
METHODS = {"w8a16": ("rtn",), "w4a16": ("rtn", "awq", "gptq"), "w8a8": ("rtn", "smoothquant"), "fp8": ("rtn",)}


@dataclasses.dataclass(frozen=True)
class QuantizeLinearOptions:
    scheme: Literal["w8a16", "w4a16", "w8a8", "fp8"] = "w4a16"
    method: Literal["rtn", "awq", "gptq", "smoothquant"] = "rtn"
    group_size: int = 128
    """int4 group along K: 32, 64 or 128."""
    alpha: float = 0.5
    """SmoothQuant migration strength in [0, 1]."""
    act_order: bool = False
    """GPTQ: quantize columns in decreasing Hessian diagonal order (static groups)."""
    damp: float = 0.01
    """GPTQ: damping, as a fraction of the Hessian's mean diagonal."""
    block_size: int = 128
    """GPTQ: columns per lazy batch."""
    mse: bool = False
    """GPTQ: search each group's range for the lowest error instead of taking its min and max."""
    awq_float_target: bool = True
    """AWQ: fit each layer's output to the float model's output, on inputs that carry the errors of the layers
    quantized before it (the float graph runs beside the calibration run); False fits it to the layer's own float
    weights on those inputs."""
    skip: list[str] = dataclasses.field(default_factory=lambda: list(_DEFAULT_SKIP))
    """Layer name patterns left dense: fnmatch on the module path or its tail. Default: `lm_head` and MoE routers
    (`*.gate`)."""
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-layer options: {pattern: {scheme / method / group_size / alpha / skip: ...}}; the first match applies."""
    embedding: Literal["dense", "int8", "int4"] = "dense"
    """The token-embedding table: `dense` (as it is), `int8` (one scale per row) or `int4` (groups of `group_size`
    along the row, round to nearest); see `embedding.py`. The w8a16 / w4a16 recipes set int8 / int4."""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        _check_combo(self.scheme, self.method, self.group_size, self.alpha, "pass 'quantize-linear'")
        if not 0 < self.damp < 1:
            raise OptionError(f"pass 'quantize-linear': key 'damp' got {self.damp!r}; expected 0 < damp < 1")
        if self.embedding not in EMBEDDING_FORMATS:
            raise OptionError(f"pass 'quantize-linear': key 'embedding' got {self.embedding!r}; expected one of "
                              f"{', '.join(EMBEDDING_FORMATS)}")
        if self.embedding == "int4" and self.group_size not in formats.INT4_GROUP_SIZES:
            raise OptionError(f"pass 'quantize-linear': embedding int4 needs group_size in {formats.INT4_GROUP_SIZES}")
        if self.block_size < 1:
            raise OptionError(f"pass 'quantize-linear': key 'block_size' got {self.block_size!r}; expected >= 1")
        for pattern, opts in self.overrides.items():
            bad = sorted(set(opts) - set(_OVERRIDE_KEYS))
            if bad:
                raise OptionError(f"pass 'quantize-linear': override {pattern!r} has unknown key {bad[0]!r}"
                                  f"{did_you_mean(bad[0], _OVERRIDE_KEYS)}; allowed: {', '.join(_OVERRIDE_KEYS)}")
            merged = {**dataclasses.asdict(self), **opts}
            _check_combo(merged["scheme"], merged["method"], merged["group_size"], merged["alpha"],
                         f"pass 'quantize-linear': override {pattern!r}")


def _check_combo(scheme: Any, method: Any, group_size: Any, alpha: Any, where: str) -> None:
    if scheme not in SCHEMES:
        raise OptionError(f"{where}: scheme {scheme!r} unknown{did_you_mean(scheme, SCHEMES)}; expected one of "
                          f"{', '.join(SCHEMES)}")
    if method not in METHODS[scheme]:
        raise OptionError(f"{where}: method {method!r} does not apply to scheme {scheme!r}"
                          f"{did_you_mean(method, METHODS[scheme])}; "
                          f"allowed: {', '.join(METHODS[scheme])}")
    if scheme == "w4a16" and group_size not in formats.INT4_GROUP_SIZES:
        raise OptionError(f"{where}: group_size {group_size!r}; expected one of {formats.INT4_GROUP_SIZES}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise OptionError(f"{where}: alpha {alpha!r}; expected a number in [0, 1]")


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One layer's effective options."""

    scheme: str
    method: str
    group_size: int
    alpha: float


@dataclasses.dataclass
class _Target:
    node: torch.fx.Node
    name: str
    """Module path of the layer (`model.layers.0.mlp.up_proj`)."""
    weight: torch.Tensor
    """(N, K), or (E, N, K) for experts: the dense weight in the orientation y = x @ W.T."""
    layer: _Layer
    grouped: bool
    cpu: dict[str, Any] | None = None
    """The CPU kernel plan of a weight-only layer on the CPU: `packed` (bool), `dtype`, `reason`, `priced`."""
    down: torch.Tensor | None = None
    """Fused experts (`llmcompress::moe_experts`, grouped): the down weight (E, H, I); `weight` is gate-up's."""


def _sources(t: _Target) -> Any:
    """The weight node(s) a target's quantized tensors are derived from."""
    return fused_experts.weight_nodes(t.node) if t.down is not None else t.node.args[1]


_grouped_ops = grouped_matmul_ops


# lm_head: the logits are the most sensitive output. `*.gate`: MoE routers (`mlp.gate`, `block_sparse_moe.gate`),
# tiny matrices whose rounding would change which experts run.
_DEFAULT_SKIP = ["lm_head", "*.gate"]


_matches = layer_matches  # the skip / overrides matching shared with the other compressing passes (fx_utils)


def _module_name(weight_name: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj`; expert tensors keep their own name."""
    return weight_name.removesuffix(".weight")


class QuantizeLinearPass(Pass):
    name = "quantize-linear"
    description = "Linears on frozen weights -> int8 / int4 / fp8 quantized linears on our Triton kernels (RTN, AWQ, " \
                  "GPTQ, SmoothQuant)"
    Options = QuantizeLinearOptions
    after = ("canonicalize",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        import llmcompress.kernels  # noqa: F401  (registers the quantized ops)

        stats: dict[str, int] = {}
        decisions: list[dict[str, Any]] = []
        targets = self._targets(gm, ctx, stats, decisions)
        if any(t.layer.scheme == "fp8" for t in targets):
            _check_fp8(gm, targets)
        calibrated = [t for t in targets if t.layer.method != "rtn"]
        results: dict[torch.fx.Node, tuple[tuple[torch.Tensor, ...], str]] = {}
        fingerprint = None
        if calibrated:
            with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
                rounded = [t for t in targets if t.layer.method == "rtn"]
                calibrated_results, fingerprint = self._calibrate(gm, ctx, calibrated, stats, rounded)
                results.update(calibrated_results)
        for t in targets:
            t.cpu = _cpu_plan(ctx, t)
            packed = t.cpu is not None and t.cpu["packed"]
            if t.node not in results and packed:  # only the packed form is derived (cached): the codes are temporary
                key = self.cache_key(*self._key(t.layer, "rtn").parts, "cpu", t.cpu["dtype"], t.cpu["isa"])
                results[t.node] = (ctx.weights.derive(t.node.args[1], key, lambda _w, t=t: _pack_for_cpu(t, _rtn(t))),
                                   "rtn")
            elif t.node not in results:
                key = self._key(t.layer, "rtn")
                results[t.node] = (ctx.weights.derive(_sources(t), key, lambda _w, t=t: _rtn(t)), "rtn")
            elif packed:
                tensors, method = results[t.node]
                key = self.cache_key(*self._key(t.layer, method, fingerprint).parts, "cpu", t.cpu["dtype"], t.cpu["isa"])
                results[t.node] = (ctx.weights.derive(t.node.args[1], key,
                                                      lambda _w, t=t, q=tensors: _pack_for_cpu(t, q)), method)
            if t.cpu is not None:
                label = "cpu: packed" if packed else f"cpu: reference ({t.cpu['reason']})"
                stats[label] = stats.get(label, 0) + 1
        changed = False
        for t in targets:
            tensors, method = results[t.node]
            decision = self._rewrite(gm, ctx, t, tensors)
            decision.update(method=method)
            decisions.append(decision)
            stats[f"{t.layer.scheme} {method}"] = stats.get(f"{t.layer.scheme} {method}", 0) + 1
            changed = True
        if self.options.embedding != "dense":
            changed |= quantize_embeddings(gm, ctx, self, self.options.embedding, self.options.group_size, stats,
                                           decisions)
        if changed:
            finish_rewrite(gm)
        return PassResult(changed, stats, decisions)

    # --- which layers -------------------------------------------------------------------------------------------

    def _layer_options(self, name: str) -> _Layer | None:
        o = self.options
        merged = {"scheme": o.scheme, "method": o.method, "group_size": o.group_size, "alpha": o.alpha,
                  "skip": any(_matches(name, p) for p in o.skip)}
        for pattern, opts in o.overrides.items():
            if _matches(name, pattern):
                merged.update(opts)
                break
        if merged["skip"]:
            return None
        return _Layer(merged["scheme"], merged["method"], merged["group_size"], float(merged["alpha"]))

    def _targets(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: dict, decisions: list) -> list[_Target]:
        grouped_ops = _grouped_ops()
        targets: list[_Target] = []
        names: list[str] = []

        def skip(node: torch.fx.Node, name: str, reason: str, warn: bool = False) -> None:
            stats[f"skipped: {reason.split(':')[0]}"] = stats.get(f"skipped: {reason.split(':')[0]}", 0) + 1
            decisions.append({"node": node.name, "layer": name, "skipped": reason})
            if warn:
                warnings.warn(f"llmcompress: quantize-linear left {name} dense: {reason}", UserWarning, stacklevel=4)

        for node in gm.graph.nodes:
            if fused_experts.is_fused_experts(node):
                target = self._fused_target(node, ctx, names, skip)
                if target is not None:
                    targets.append(target)
                continue
            grouped = node.op == "call_function" and node.target in grouped_ops
            if not (node.op == "call_function" and (node.target is aten.linear.default or grouped)):
                continue
            w_node = node.args[1]
            if not ctx.weights.is_constant(w_node):
                stats["skipped: dynamic weight"] = stats.get("skipped: dynamic weight", 0) + 1
                continue
            name = _module_name(ctx.weights.name(w_node) or w_node.name)
            names.append(name)
            layer = self._layer_options(name)
            if layer is None:
                skip(node, name, "skip pattern")
                continue
            x = node.args[0].meta["val"]
            if not x.is_floating_point() or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                skip(node, name, f"activation dtype {x.dtype}: quantized linears take float16/bfloat16/float32",
                     warn=True)
                continue
            with unset_fake_temporarily():
                try:
                    value = ctx.weights.value(w_node)
                except WeightReleasedError:
                    # Released by an earlier graph's compile (release_weights): its shape is all this graph needs
                    # while the derived-weight cache holds the layer's quantized tensors (a prefill graph, then
                    # decode's); `derive` raises this error again on a miss.
                    value = w_node.meta["val"]
                weight = value.transpose(-2, -1) if grouped else value  # grouped ops take (E, K, N)
            k = weight.shape[-1]
            if grouped and layer.scheme not in ("w4a16", "w8a16"):
                skip(node, name, f"3-D expert weights: scheme {layer.scheme} has no grouped kernel (w4a16 and "
                     "w8a16 do)", warn=True)
                continue
            if layer.scheme == "w4a16" and k % layer.group_size:
                skip(node, name, f"group size: group_size {layer.group_size} does not divide K={k}", warn=True)
                continue
            if layer.method == "gptq" and node.meta.get("llmcompress.sparsity"):
                # sparsify-linear marks what it pruned; GPTQ's error feedback would fill the pruned weights in.
                raise OptionError(f"quantize-linear method gptq after sparsify-linear ({name}, pattern "
                                  f"{node.meta['llmcompress.sparsity']['pattern']}) would spread rounding errors into "
                                  "the pruned weights: use sparsify-linear's joint sweep (method sparsegpt, quantize "
                                  "w4a16; recipe sparse-2of4-w4a16) or quantize-linear method rtn / awq")
            targets.append(_Target(node, name, weight, layer, grouped))
        user_skip = [] if self.options.skip == _DEFAULT_SKIP else self.options.skip
        for pattern in [*user_skip, *self.options.overrides]:
            if names and not any(_matches(n, pattern) for n in names):
                warnings.warn(f"llmcompress: quantize-linear pattern {pattern!r} matches no layer of graph "
                              f"{ctx.graph_id} (layers: {names[0]} ... {names[-1]})", UserWarning, stacklevel=3)
        return targets

    def _fused_target(self, node: torch.fx.Node, ctx: PassContext, names: list[str], skip: Callable[..., None]
                      ) -> _Target | None:
        """A `moe_experts` node's target (fused experts, named by their module `<block>.experts`), or None."""
        w_nodes = fused_experts.weight_nodes(node)
        if not all(ctx.weights.is_constant(w) for w in w_nodes):
            return None
        name = _module_name(ctx.weights.name(w_nodes[0]) or w_nodes[0].name).removesuffix(".gate_up_proj")
        names.append(name)
        layer = self._layer_options(name)
        if layer is None:
            skip(node, name, "skip pattern")
            return None
        if layer.scheme not in fused_experts.SCHEMES:
            skip(node, name, f"3-D expert weights: scheme {layer.scheme} has no grouped kernel (w4a16 and w8a16 do)",
                 warn=True)
            return None
        with unset_fake_temporarily():
            gate_up, down = (ctx.weights.value(w) for w in w_nodes)
        if layer.scheme == "w4a16" and (gate_up.shape[-1] % layer.group_size or down.shape[-1] % layer.group_size):
            skip(node, name, f"group size: group_size {layer.group_size} does not divide H={gate_up.shape[-1]} and "
                 f"I={down.shape[-1]}", warn=True)
            return None
        return _Target(node, name, gate_up, layer, True, down=down)

    # --- calibration --------------------------------------------------------------------------------------------

    def _key(self, layer: _Layer, method: str | None = None, calibration: str | None = None) -> DerivedKey:
        """The derived-weight key of one layer's quantized tensors: the pass's options are in its uuid, the layer's
        effective ones (an override's) and the calibration data's fingerprint are the parts."""
        return self.cache_key(layer.scheme, method or layer.method, layer.group_size, layer.alpha, calibration)

    def _calibrate(self, gm: torch.fx.GraphModule, ctx: PassContext, targets: list[_Target], stats: dict,
                   rounded: Sequence[_Target] = ()
                   ) -> tuple[dict[torch.fx.Node, tuple[tuple[torch.Tensor, ...], str]], str]:
        """(node -> (quantized tensors, method), the calibration data's fingerprint). rounded: the layers an override
        sets to round-to-nearest; the calibration run applies them where they stand, so the layers after them are
        fitted to the rows the compiled model gives them."""
        cfg = ctx.config
        cal = ctx.calibration or Calibration(cfg.calibration, cfg.tokenizer, cfg.calibration_samples,
                                             cfg.calibration_seq_len, example_inputs=ctx.example_inputs,
                                             input_names=ctx.input_names)
        cal.require(f"recipe asks for {min(t.layer.method for t in targets)} calibration")
        fp = cal.fingerprint
        out: dict[torch.fx.Node, tuple[tuple[torch.Tensor, ...], str]] = {}
        pending = []
        for t in targets:
            hit = ctx.weights.cached(_sources(t), self._key(t.layer, calibration=fp))
            if hit is not None:
                out[t.node] = (hit, t.layer.method)
            else:
                pending.append(t)
        if out:
            stats["calibrated: cached"] = len(out)  # in memory, or on disk from another process
        if not pending:
            return out, fp
        fed = cal.feeds()
        if isinstance(fed, str):
            warnings.warn(f"llmcompress: quantize-linear cannot calibrate graph {ctx.graph_id} ({fed}) and no "
                          f"calibrated weights are cached for its {len(pending)} layers: they are quantized by round "
                          "to nearest. Run the model once on a plain forward (model(input_ids)) first, so that "
                          "graph calibrates them.", CalibrationWarning, stacklevel=3)
            stats["calibration: rtn instead"] = len(pending)
            return out, fp
        stats["calibration tokens"] = fed.tokens
        by_node = {t.node: t for t in pending}
        bar = _progress(len(pending), f"calibrating graph {ctx.graph_id}")

        def quantize(inputs: TargetInputs) -> Callable[..., torch.Tensor]:
            t = by_node[inputs.node]
            # persist: GPTQ on tiny-llama takes minutes, loading its 42 layers well under a second.
            tensors = ctx.weights.derive(_sources(t), self._key(t.layer, calibration=fp),
                                         lambda _w: _calibrated(t, inputs, self.options), persist=True)
            out[t.node] = (tensors, t.layer.method)
            return _applied(t, tensors)

        known = {t.node: _applied(t, out[t.node][0]) for t in targets if t.node in out}
        known.update({t.node: _applied(t, _rtn(t)) for t in rounded})
        try:
            float_shadow = self.options.awq_float_target and any(t.layer.method == "awq" and not t.grouped
                                                                 for t in pending)
            cal.run_sequential(gm, list(by_node), quantize, float_shadow=float_shadow,
                               progress=lambda i: bar.update(1), known=known)
        finally:
            bar.close()
        return out, fp

    # --- rewrite -------------------------------------------------------------------------------------------------

    def _rewrite(self, gm: torch.fx.GraphModule, ctx: PassContext, t: _Target, tensors: tuple[torch.Tensor, ...]
                 ) -> dict[str, Any]:
        node, layer = t.node, t.layer
        x = node.args[0]
        dtype = x.meta["val"].dtype
        bias = node.args[2] if len(node.args) > 2 and not t.grouped else None
        decision: dict[str, Any] = {"node": node.name, "layer": t.name, "scheme": layer.scheme,
                                    "shape": list(t.weight.shape)}
        with gm.graph.inserting_before(node):
            suffixes = _SUFFIXES[f"{layer.scheme}_cpu" if t.cpu is not None and t.cpu["packed"] else layer.scheme]
            if t.down is not None:
                gate_up, down = fused_experts.split(tensors, layer.scheme)
                consts = [ctx.weights.add(gm, c, f"{t.name}.{proj}.{suffix}")
                          for proj, part in (("gate_up_proj", gate_up), ("down_proj", down))
                          for c, suffix in zip(part, suffixes)]
            else:
                consts = [ctx.weights.add(gm, c, f"{t.name}.{suffix}") for c, suffix in zip(tensors, suffixes)]
            if t.down is not None:
                gemv_max, priced = _choose_fused_path(ctx, t, dtype)
                op, args = fused_experts.replacement(node, consts, layer.scheme, layer.group_size, gemv_max)
                decision.update(kernel=f"fused experts {op.name()} (GEMV for T <= {gemv_max}, block_m "
                                       f"{fused_experts.block_m_of(node)})", predicted_s=priced)
            elif t.grouped:
                offs = _offs(node.args, node.kwargs)
                op = torch.ops.llmcompress.grouped_linear_w4a16.default if layer.scheme == "w4a16" else \
                    torch.ops.llmcompress.grouped_linear_w8a16.default
                act_scale = consts[3] if layer.scheme == "w4a16" and len(consts) > 3 else None
                args = (x, *consts[:3], layer.group_size, offs, act_scale) if layer.scheme == "w4a16" else \
                    (x, *consts[:2], offs)
                decision["kernel"] = f"grouped {layer.scheme} (per-expert GEMV/GEMM)"
            elif t.cpu is not None and t.cpu["packed"]:
                act_scale = consts[2] if len(consts) > 2 else None
                if layer.scheme == "w4a16":
                    op = torch.ops.llmcompress.linear_w4a16_cpu.default
                    args = (x, consts[0], consts[1], layer.group_size, bias, act_scale)
                else:
                    op = torch.ops.llmcompress.linear_w8a16_cpu.default
                    args = (x, consts[0], consts[1], bias, None)
                decision.update(kernel=f"cpu packed ({op.name()})", predicted_s=t.cpu["priced"])
            elif layer.scheme in ("w4a16", "w8a16"):
                n, k = t.weight.shape
                gemv_max, dense_min, priced = _choose_kernels(ctx, n, k, dtype, tensors)
                act_scale = consts[3] if layer.scheme == "w4a16" and len(consts) > 3 else None
                if layer.scheme == "w4a16":
                    op = torch.ops.llmcompress.linear_w4a16.default
                    args = (x, *consts[:3], layer.group_size, bias, act_scale, gemv_max, dense_min)
                else:
                    op = torch.ops.llmcompress.linear_w8a16.default
                    args = (x, *consts[:2], bias, None, gemv_max, dense_min)
                decision.update(kernel={"gemv_max_m": gemv_max, "dense_min_m": None if dense_min == DENSE_OFF
                                        else dense_min}, predicted_s=priced)
            elif layer.scheme == "w8a8":
                op = torch.ops.llmcompress.linear_w8a8.default
                smooth = consts[2] if len(consts) > 2 else None
                args = (x, consts[0], consts[1], bias, smooth)
                decision["kernel"] = "per-token int8 quant + int8 GEMM"
            else:
                op = torch.ops.llmcompress.linear_fp8.default
                args = (x, consts[0], consts[1], bias)
                decision["kernel"] = "per-token e4m3 quant + fp8 GEMM"
            new = call(gm.graph, ctx.fake_mode, op, args)
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("val",)})
        new.meta["llmcompress.linear"] = f"{t.name}.weight"
        decision["predicted"] = _predicted(ctx, node, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        decision["quantized_bytes"] = int(sum(c.numel() * c.element_size() for c in tensors))
        decision["dense_bytes"] = int(sum(w.numel() * w.element_size() for w in (t.weight, t.down) if w is not None))
        return decision


def _predicted(ctx: PassContext, dense: torch.fx.Node, quantized: torch.fx.Node) -> dict[str, Any] | None:
    """Predicted seconds of the layer before and after, at the graph's example sizes (the report's numbers)."""
    if ctx.cost_model is None:
        return None
    try:
        before = ctx.cost_model.estimate(dense, ctx.sizes)
        after = ctx.cost_model.estimate(quantized, ctx.sizes)
        return {"dense_s": float(before.time_s), "quantized_s": float(after.time_s),
                "dense_bytes": float(before.bytes), "quantized_bytes": float(after.bytes)}
    except Exception as e:  # noqa: BLE001 - a pricing gap must not fail the rewrite
        return {"error": f"{type(e).__name__}: {e}"}


_SUFFIXES = {"w8a16": ("qweight", "scale"), "w4a16": ("qweight", "scales", "zeros", "act_scale"),
             "w8a8": ("qweight", "wscale", "smooth"), "fp8": ("qweight", "wscale"),
             "w8a16_cpu": ("qweight", "scale"), "w4a16_cpu": ("qweight", "scales_and_zeros", "act_scale")}


def _cpu_plan(ctx: PassContext, t: _Target) -> dict[str, Any] | None:
    """Where a weight-only layer on the CPU runs: torch's packed kernel or our op's reference (None: not a CPU
    weight-only layer, or the Triton lowering, which keeps our ops)."""
    if t.grouped or t.layer.scheme not in ("w8a16", "w4a16") or t.weight.device.type != "cpu":
        return None
    if getattr(ctx.config, "lowering", None) == "triton":
        return None
    dtype = t.node.args[0].meta["val"].dtype
    n, k = t.weight.shape
    e = torch.empty((), dtype=dtype).element_size()
    if t.layer.scheme == "w8a16":
        fmt, reason = "int8", cpu_packed.int8_cpu_unsupported(n, k)
        packed_bytes, stored_bytes = n * k + n * e, n * k + 4 * n
    else:
        groups = k // t.layer.group_size
        fmt, reason = "int4", cpu_packed.int4_cpu_unsupported(n, k, t.layer.group_size)
        packed_bytes, stored_bytes = n * k // 2 + 2 * groups * n * e, n * k // 2 + 4 * groups * n
    if reason is not None:
        return {"packed": False, "dtype": dtype, "reason": "shape", "detail": reason, "priced": {}, "isa": None}
    slow = packed_dtype_unsupported(dtype)
    if slow is not None:
        return {"packed": False, "dtype": dtype, "reason": "dtype", "detail": slow, "priced": {}, "isa": None}
    choice = choose_cpu_kernel(ctx.cost_model, fmt, n, k, dtype, float(packed_bytes), float(stored_bytes))
    # torch's int4 CPU layout follows the vector ISA it was packed for: a key part, so a cache shared between
    # machines never serves an AVX-512 packing to an AVX2 CPU.
    return {"packed": choice.packed, "dtype": dtype, "reason": None if choice.packed else "cost model",
            "priced": choice.priced, "isa": torch.backends.cpu.get_cpu_capability()}


def _pack_for_cpu(t: _Target, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Our format -> torch's CPU layout for activations in the layer's dtype; AWQ's act_scale is kept as is."""
    dtype = t.cpu["dtype"]
    if t.layer.scheme == "w8a16":
        return cpu_packed.pack_int8_for_cpu(tensors[0], tensors[1], dtype)
    packed = cpu_packed.pack_int4_for_cpu(*tensors[:3], t.layer.group_size, dtype)
    return (*packed, *tensors[3:])


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"llmcompress: {desc}", unit="layer", leave=False)


def _rtn(t: _Target) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest quantization of a target's weight (2-D, or per expert for 3-D)."""
    w, layer = t.weight, t.layer
    if t.down is not None:
        return (*_rtn(dataclasses.replace(t, down=None)), *_rtn(dataclasses.replace(t, weight=t.down, down=None)))
    if w.dim() == 3:
        parts = [_rtn(dataclasses.replace(t, weight=w[e], grouped=False)) for e in range(w.shape[0])]
        return tuple(torch.stack(p) for p in zip(*parts))
    if layer.scheme == "w8a16" or layer.scheme == "w8a8":
        return formats.quantize_int8_per_channel(w)
    if layer.scheme == "w4a16":
        return formats.quantize_int4_rtn(w, layer.group_size)
    return formats.quantize_fp8_per_channel(w)


# The activation statistics (`calibration/stats.py`) each method quantizes from; AWQ adds `cross` when the layer's
# inputs differ from the float model's.
_STATISTICS = {"gptq": ("gram",), "awq": ("absmean", "gram"), "smoothquant": ("absmax",)}


def _calibrated(t: _Target, inputs: TargetInputs, o: QuantizeLinearOptions) -> tuple[torch.Tensor, ...]:
    """AWQ, GPTQ or SmoothQuant of one layer from the statistics of its input activations (shared with the other
    layers reading the same activation); AWQ's also pull towards the float model's outputs where the layer's inputs
    differ from the float model's (`inputs.float_inputs`). MoE experts (3-D weights) are calibrated one by one on
    the rows routed to each (padding included: expert-sorted rows no longer say which token they hold)."""
    if t.down is not None:
        def quantize_3d(w, rows, offs):
            return _calibrated_experts(dataclasses.replace(t, weight=w, down=None), rows, o, offs)
        return fused_experts.calibrate(t.weight, t.down, inputs.calls, t.layer.scheme, t.layer.group_size,
                                       quantize_3d)
    if t.grouped:
        k = t.weight.shape[-1]
        return _calibrated_experts(t, [x.reshape(-1, k) for x in inputs.inputs], o, inputs.offsets())
    kinds = _STATISTICS[t.layer.method]
    if t.layer.method == "awq" and inputs.float_inputs is not None:
        kinds = (*kinds, "cross")
    return _from_statistics(t, inputs.statistics(*kinds), o)


def _from_statistics(t: _Target, stats: dict[str, torch.Tensor], o: QuantizeLinearOptions
                     ) -> tuple[torch.Tensor, ...]:
    method = t.layer.method
    if method == "gptq":
        from llmcompress.passes.quantize.gptq import gptq_quantize_int4

        # GPTQ's Hessian is 2 x^T x / n: `gram` doubled, bit for bit its HessianAccumulator's.
        return gptq_quantize_int4(t.weight.float(), 2 * stats["gram"], group_size=t.layer.group_size, damp=o.damp,
                                  block_size=o.block_size, act_order=o.act_order, mse=o.mse)
    if method == "awq":
        from llmcompress.passes.quantize.awq import awq_from_stats

        r = awq_from_stats(t.weight.float(), stats["absmean"], stats["gram"], stats.get("cross"),
                           group_size=t.layer.group_size)
        return r.qweight, r.scales, r.zeros, r.act_scale
    if method == "smoothquant":
        from llmcompress.passes.quantize.smoothquant import smoothquant_quantize

        return smoothquant_quantize(t.weight.float(), stats["absmax"], alpha=t.layer.alpha)
    raise AssertionError(method)


# An expert routed fewer calibration rows than this is quantized by round to nearest: GPTQ's Hessian and AWQ's
# statistics from a handful of tokens fit those tokens, not the expert.
_MIN_EXPERT_ROWS = 16


def _calibrated_experts(t: _Target, inputs: list[torch.Tensor], o: QuantizeLinearOptions, offs: list[Any]
                        ) -> tuple[torch.Tensor, ...]:
    """Each expert of a 3-D weight (E, N, K) calibrated on the rows routed to it in every chunk (rows
    offs[e - 1]:offs[e] of the expert-sorted activations (rows, K)); rarely routed experts fall back to round to
    nearest, with a warning. AWQ's act_scale comes back as (E, K)."""
    from llmcompress.calibration.stats import statistics_of

    n_experts, _, k = t.weight.shape
    bounds = [[0, *(int(v) for v in o_.tolist())] for o_ in offs]
    parts, fallback = [], []
    for e in range(n_experts):
        rows = [x[b[e]:b[e + 1]] for x, b in zip(inputs, bounds)]
        count = sum(r.shape[0] for r in rows)
        one = dataclasses.replace(t, weight=t.weight[e], grouped=False)
        if count < _MIN_EXPERT_ROWS:
            fallback.append(f"{e} ({count} rows)")
            part = _rtn(one)
            if t.layer.method == "awq":
                part = (*part, torch.ones(k, dtype=torch.float32, device=t.weight.device))
        else:
            stats = statistics_of(rows, _STATISTICS[t.layer.method], k, device=t.weight.device)
            part = _from_statistics(one, stats.as_dict(), o)
        parts.append(part)
    if fallback:
        warnings.warn(f"llmcompress: quantize-linear: {t.name}: experts {', '.join(fallback)} got fewer than "
                      f"{_MIN_EXPERT_ROWS} calibration rows and are quantized by round to nearest; give more "
                      "calibration samples to calibrate them", CalibrationWarning, stacklevel=2)
    return tuple(torch.stack(p) for p in zip(*parts))


def _offs(args: tuple, kwargs: dict) -> Any:
    """The expert offsets of a grouped matmul's call (`_grouped_mm(x, w, offs)`, transformers' fallback)."""
    return kwargs.get("offs", args[2] if len(args) > 2 else None)


def _applied(t: _Target, tensors: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
    """The quantized layer as the calibration run calls it in the dense node's place."""
    return lambda *args, **kwargs: _apply(t, tensors, args, kwargs)


def _apply(t: _Target, tensors: tuple[torch.Tensor, ...], args: tuple, kwargs: dict) -> torch.Tensor:
    """The quantized layer's output during calibration, from the dense node's evaluated arguments: the op the
    graph will call."""
    ops = torch.ops.llmcompress
    layer, x = t.layer, args[0]
    if t.down is not None:
        return fused_experts.apply(tensors, layer.scheme, layer.group_size, args)
    if t.grouped:
        offs = _offs(args, kwargs)
        if layer.scheme == "w4a16":
            return ops.grouped_linear_w4a16(x, *tensors[:3], layer.group_size, offs,
                                            tensors[3] if len(tensors) > 3 else None)
        return ops.grouped_linear_w8a16(x, *tensors[:2], offs)
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if layer.scheme == "w4a16":
        act_scale = tensors[3] if len(tensors) > 3 else None
        return ops.linear_w4a16(x, tensors[0], tensors[1], tensors[2], layer.group_size, bias, act_scale)
    if layer.scheme == "w8a16":
        return ops.linear_w8a16(x, tensors[0], tensors[1], bias, None)
    if layer.scheme == "w8a8":
        return ops.linear_w8a8(x, tensors[0], tensors[1], bias, tensors[2] if len(tensors) > 2 else None)
    return ops.linear_fp8(x, tensors[0], tensors[1], bias)


def _choose_kernels(ctx: PassContext, n: int, k: int, dtype: torch.dtype,
                    tensors: tuple[torch.Tensor, ...]) -> tuple[int, int, dict[str, Any]]:
    """(gemv_max_m, dense_min_m, priced) of a weight-only layer whose quantized tensors are `tensors`: the kernels
    layer's choice (`choose_kernel_path`), priced on the packed weight, scales and zeros as stored."""
    packed = float(sum(c.numel() * c.element_size() for c in tensors))
    path = choose_kernel_path(ctx.cost_model, n, k, dtype, packed, dense=True)
    return path.gemv_max_m, path.dense_min_m, path.priced


def _choose_fused_path(ctx: PassContext, t: _Target, dtype: torch.dtype) -> tuple[int, dict[str, Any]]:
    """(gemv_max_tokens, priced) of fused experts in their quantized format: the kernels layer's choice
    (`moe_path.choose_moe_path`), on the device the fused ops will run on (CUDA also under the Triton lowering)."""
    from llmcompress.kernels.moe_path import choose_moe_path

    e, i2, h = t.weight.shape
    top_k = t.node.args[4].meta["val"].shape[1]
    triton = getattr(ctx.config, "lowering", None) == "triton"
    device = "cuda" if t.weight.device.type == "cuda" or triton else "cpu"
    path = choose_moe_path(ctx.cost_model, int(h), int(i2) // 2, int(e), int(top_k), dtype, device,
                           t.layer.group_size if t.layer.scheme == "w4a16" else None, t.layer.scheme)
    return path.gemv_max_tokens, path.priced


def _check_fp8(gm: torch.fx.GraphModule, targets: list[_Target]) -> None:
    """Raises `FP8UnsupportedError` (naming the device and what fp8 needs) before anything is rewritten."""
    from llmcompress.kernels.fp8_linear import FP8UnsupportedError, check_fp8_device, fp8_supported

    device = targets[0].weight.device
    name = "quantize-linear scheme fp8 (recipe fp8)"
    check_fp8_device(device, name=name)  # a GPU without fp8: names the GPU and its capability
    if not fp8_supported(device):
        raise FP8UnsupportedError(f"{name}: the model is on {device}; fp8 e4m3 matmuls need a CUDA GPU of compute "
                                  "capability >= 8.9 (Ada, Hopper or later). Use w8a8-smoothquant or w8a16 here.")


__all__ = ["METHODS", "SCHEMES", "QuantizeLinearOptions", "QuantizeLinearPass"]
