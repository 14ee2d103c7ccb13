"""`sparsify-linear`: prune the weights of linears (and of MoE experts stored as 3-D weights) on frozen weights.

Methods (option `method`): `magnitude` (|W|, `magnitude.py`), `wanda` (|W| * ||X||, `wanda.py`), `sparsegpt`
(Hessian error feedback, `sparsegpt.py`); patterns (option `pattern`): `unstructured` (option `sparsity`) or N:M
(`2:4`, `4:8`). `quantize: w4a16` also rounds SparseGPT's kept weights to int4 (groups of `group_size` along K) in
the same sweep (recipe `sparse-2of4-w4a16`).

Wanda and SparseGPT calibrate through `ctx.calibration`: the graph runs node by node and each layer is pruned on the
inputs that reach it after the layers before it were pruned (`sequential`, default) or on the dense model's
(`sequential: false`). Results are derived weights keyed by `cache_key` (and persisted: SparseGPT is the cost of
GPTQ), so recompiles and later graphs reuse them. A pruned layer is stored as its masked dense weight; `_lower` is
the one place that decides what each layer runs as (today: the dense linear on the masked weight, report kernel
`dense (masked)`), and keeps what a 2:4 format needs (`Pruned.mask`, and the int4 codes / scales / zeros).

Composition: run `sparsify-linear` before `quantize-linear`. Round to nearest, AWQ, SmoothQuant and fp8 keep a
pruned zero zero (0 is exactly representable in every format); GPTQ would spread error back into the pruned weights,
so `quantize-linear` refuses GPTQ on a sparsified layer and names the joint mode. `sparsify-linear` after
`quantize-linear` finds no dense linears to prune and raises, naming the order to use.
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
from llmcompress.calibration.stats import statistics_of
from llmcompress.errors import OptionError, WeightReleasedError, did_you_mean
from llmcompress.formats import quantized as formats
from llmcompress.formats.sparse import pack_2of4, pack_2of4_int4
from llmcompress.fx_utils import call, finish_rewrite, grouped_matmul_ops, layer_matches
from llmcompress.kernels.linear_common import DENSE_OFF, SUPPORTED_DTYPES
from llmcompress.kernels.sparse_path import choose_sparse_path
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.sparsify.magnitude import magnitude_mask
from llmcompress.passes.sparsify.masks import Pattern, parse_pattern
from llmcompress.passes.sparsify.sparsegpt import sparsegpt_prune
from llmcompress.passes.sparsify.wanda import wanda_mask
from llmcompress.passes.weights import DerivedKey

aten = torch.ops.aten

METHODS = ("magnitude", "wanda", "sparsegpt")
_CALIBRATED = ("wanda", "sparsegpt")
_OVERRIDE_KEYS = ("method", "pattern", "sparsity", "skip")
# lm_head: the logits are the most sensitive output. `*.gate`: MoE routers, whose pruning would change which experts
# run (the same defaults as quantize-linear).
_DEFAULT_SKIP = ["lm_head", "*.gate"]
_DEFAULT_SPARSITY = 0.5
_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32)
# The statistic each calibrated method prunes from (`calibration/stats.py`).
_STATISTIC = {"wanda": "sqnorm", "sparsegpt": "gram"}
# An expert routed fewer calibration rows than this is pruned by magnitude: a Hessian or channel norms from a
# handful of tokens fit those tokens, not the expert (quantize-linear's threshold for GPTQ).
_MIN_EXPERT_ROWS = 16
# The node meta key a pruned linear carries (read by quantize-linear to refuse GPTQ on it).
SPARSITY_META = "llmcompress.sparsity"


@dataclasses.dataclass(frozen=True)
class SparsifyLinearOptions:
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    pattern: str = "unstructured"
    """`unstructured`, or N:M (N weights kept in every M consecutive inputs of a row): `2:4`, `4:8`."""
    sparsity: float | None = None
    """Fraction of weights pruned, in (0, 1), for `unstructured` (default 0.5); N:M fixes it at 1 - N/M."""
    quantize: Literal["none", "w4a16"] = "none"
    """`w4a16`: SparseGPT also rounds the kept weights to int4 in the same sweep (method sparsegpt only)."""
    group_size: int = 128
    """int4 group along K for `quantize: w4a16`: 32, 64 or 128."""
    damp: float = 0.01
    """SparseGPT: damping, as a fraction of the Hessian's mean diagonal."""
    block_size: int = 128
    """SparseGPT: columns per lazy block (a multiple of M, and of group_size with quantize)."""
    sequential: bool = True
    """Wanda / SparseGPT: prune each layer on the inputs that reach it after the layers before it are pruned
    (False: on the dense model's activations)."""
    fallback: Literal["none", "magnitude"] = "none"
    """Without calibration data, `magnitude` prunes wanda / sparsegpt layers by magnitude with a warning; `none`
    raises."""
    skip: list[str] = dataclasses.field(default_factory=lambda: list(_DEFAULT_SKIP))
    """Layer name patterns left dense, as quantize-linear's: fnmatch on the module path or its tail. Default:
    `lm_head` and MoE routers (`*.gate`)."""
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-layer options: {pattern: {method / pattern / sparsity / skip: ...}}; the first match applies."""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        where = "pass 'sparsify-linear'"
        _check_layer(self.method, self.pattern, self.sparsity, where)
        if self.quantize not in ("none", "w4a16"):
            raise OptionError(f"{where}: key 'quantize' got {self.quantize!r}; expected 'none' or 'w4a16'")
        if self.fallback not in ("none", "magnitude"):
            raise OptionError(f"{where}: key 'fallback' got {self.fallback!r}; expected 'none' or 'magnitude'")
        if not 0 < self.damp < 1:
            raise OptionError(f"{where}: key 'damp' got {self.damp!r}; expected 0 < damp < 1")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise OptionError(f"{where}: key 'block_size' got {self.block_size!r}; expected an integer >= 1")
        if self.quantize == "w4a16":
            if self.group_size not in formats.INT4_GROUP_SIZES:
                raise OptionError(f"{where}: group_size {self.group_size!r}; expected one of "
                                  f"{formats.INT4_GROUP_SIZES}")
            if self.block_size % self.group_size:
                raise OptionError(f"{where}: block_size {self.block_size} must be a multiple of group_size "
                                  f"{self.group_size} with quantize w4a16")
        for pattern, opts in self.overrides.items():
            if not isinstance(opts, dict):
                raise OptionError(f"{where}: override {pattern!r} must be a mapping of {', '.join(_OVERRIDE_KEYS)}")
            bad = sorted(set(opts) - set(_OVERRIDE_KEYS))
            if bad:
                raise OptionError(f"{where}: override {pattern!r} has unknown key {bad[0]!r}"
                                  f"{did_you_mean(bad[0], _OVERRIDE_KEYS)}; allowed: {', '.join(_OVERRIDE_KEYS)}")
            merged = {"method": self.method, **_inherited_sparsity(self.pattern, self.sparsity, opts), **opts}
            _check_layer(merged["method"], merged["pattern"], merged["sparsity"], f"{where}: override {pattern!r}")
        for name, pat in (("the pass", self.pattern), *((p, o.get("pattern", self.pattern))
                                                         for p, o in self.overrides.items())):
            parsed = parse_pattern(pat, where)
            if parsed.structured and self.method == "sparsegpt" and self.block_size % parsed.m:
                raise OptionError(f"{where}: block_size {self.block_size} must be a multiple of M={parsed.m} "
                                  f"(pattern {pat} of {name})")
        methods = {self.method, *(o.get("method", self.method) for o in self.overrides.values())}
        if self.quantize == "w4a16" and methods != {"sparsegpt"}:
            raise OptionError(f"{where}: quantize w4a16 is SparseGPT's joint sweep: method must be 'sparsegpt' "
                              f"(got {', '.join(sorted(methods))}); for magnitude or wanda, prune with sparsify-linear "
                              "then quantize with quantize-linear (method rtn)")


def _check_layer(method: Any, pattern: Any, sparsity: Any, where: str) -> None:
    if method not in METHODS:
        raise OptionError(f"{where}: method {method!r} unknown{did_you_mean(str(method), METHODS)}; expected one of "
                          f"{', '.join(METHODS)}")
    parsed = parse_pattern(pattern, where)
    if sparsity is not None:
        if parsed.structured:
            raise OptionError(f"{where}: sparsity applies to pattern 'unstructured'; N:M pattern {pattern} prunes "
                              f"{parsed.sparsity:g} of each row by definition (drop the sparsity key)")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise OptionError(f"{where}: sparsity {sparsity!r}; expected a fraction in (0, 1), e.g. 0.5")


def _inherited_sparsity(pattern: str, sparsity: float | None, override: dict[str, Any]) -> dict[str, Any]:
    """What an override inherits of the pass's pattern and sparsity: an override to N:M drops the pass's
    unstructured sparsity (N:M fixes its own)."""
    new_pattern = override.get("pattern", pattern)
    if "sparsity" not in override and new_pattern != pattern and new_pattern != "unstructured":
        return {"pattern": new_pattern, "sparsity": None}
    return {"pattern": pattern, "sparsity": sparsity}


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One layer's effective options."""

    method: str
    pattern: Pattern
    sparsity: float
    """The fraction asked for: `sparsity` for unstructured, 1 - N/M for N:M."""


@dataclasses.dataclass
class _Target:
    node: torch.fx.Node
    name: str
    """Module path of the layer (`model.layers.0.mlp.up_proj`)."""
    weight: torch.Tensor
    """(N, K), or (E, N, K) for experts: the dense weight in the orientation y = x @ W.T."""
    layer: _Layer
    grouped: bool


@dataclasses.dataclass
class Pruned:
    """What pruning one layer produced (a derived weight: the dict form is what the cache stores)."""

    weight: torch.Tensor
    """The masked dense weight in the layer's dtype, (N, K) or (E, N, K) (y = x @ W.T)."""
    mask: torch.Tensor
    """bool, the weight's shape, True where kept: `formats.sparse.pack_2of4` takes `weight` (zeros where pruned)."""
    codes: torch.Tensor | None = None
    """Joint int4 mode: uint8 codes in [0, 15], the weight's shape (`pack_2of4_int4`'s `codes`)."""
    scales: torch.Tensor | None = None
    """Joint int4 mode: float16 (..., N, K // group_size)."""
    zeros: torch.Tensor | None = None
    """Joint int4 mode: float16 (..., N, K // group_size), integer-valued."""

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Pruned:
        return cls(**d)


def _module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


class SparsifyLinearPass(Pass):
    name = "sparsify-linear"
    description = "Prune linears and MoE experts on frozen weights (magnitude, Wanda, SparseGPT; unstructured or " \
                  "N:M such as 2:4; SparseGPT + int4 jointly)"
    Options = SparsifyLinearOptions
    after = ("canonicalize",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        decisions: list[dict[str, Any]] = []
        _check_order(gm)
        targets = self._targets(gm, ctx, stats, decisions)
        results: dict[torch.fx.Node, tuple[Pruned, str, DerivedKey]] = {}
        calibrated = [t for t in targets if t.layer.method in _CALIBRATED]
        if calibrated:
            with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
                by_magnitude = [t for t in targets if t.layer.method not in _CALIBRATED]
                results.update(self._calibrate(gm, ctx, calibrated, stats, by_magnitude))
        for t in targets:
            if t.node not in results:
                key = self._key(t.layer, "magnitude")
                value = ctx.weights.derive(t.node.args[1], key, lambda _w, t=t: _magnitude(t, self.options).as_dict())
                results[t.node] = (Pruned.from_dict(value), "magnitude", key)
        for t in targets:
            pruned, method, key = results[t.node]
            # The packed 2:4 form is derived from the pruned weight: keyed by its key, packed once for all graphs.
            decisions.append(_lower(gm, ctx, t, pruned, method, self.cache_key("2:4 packed", *key.parts)))
            label = f"{t.layer.pattern} {method}"
            stats[label] = stats.get(label, 0) + 1
        if targets:
            finish_rewrite(gm)
        return PassResult(bool(targets), stats, decisions)

    # --- which layers -------------------------------------------------------------------------------------------

    def _layer_options(self, name: str) -> _Layer | None:
        o = self.options
        merged = {"method": o.method, "pattern": o.pattern, "sparsity": o.sparsity,
                  "skip": any(layer_matches(name, p) for p in o.skip)}
        for pattern, opts in o.overrides.items():
            if layer_matches(name, pattern):
                merged.update({**_inherited_sparsity(o.pattern, o.sparsity, opts), **opts})
                break
        if merged["skip"]:
            return None
        pattern = parse_pattern(merged["pattern"], "pass 'sparsify-linear'")
        sparsity = pattern.sparsity if pattern.structured else float(merged["sparsity"] or _DEFAULT_SPARSITY)
        return _Layer(merged["method"], pattern, sparsity)

    def _targets(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: dict, decisions: list) -> list[_Target]:
        grouped_ops = grouped_matmul_ops()
        targets: list[_Target] = []
        names: list[str] = []

        def skip(node: torch.fx.Node, name: str, reason: str, warn: bool = False) -> None:
            label = f"left dense: {reason.split(':')[0]}"
            stats[label] = stats.get(label, 0) + 1
            decisions.append({"node": node.name, "layer": name, "sparsity": {"pattern": "dense", "reason": reason}})
            if warn:
                warnings.warn(f"llmcompress: sparsify-linear left {name} dense: {reason}", UserWarning, stacklevel=4)

        for node in gm.graph.nodes:
            grouped = node.op == "call_function" and node.target in grouped_ops
            if not (node.op == "call_function" and (node.target is aten.linear.default or grouped)):
                continue
            w_node = node.args[1]
            if not ctx.weights.is_constant(w_node):
                stats["left dense: dynamic weight"] = stats.get("left dense: dynamic weight", 0) + 1
                continue
            name = _module_name(ctx.weights.name(w_node) or w_node.name)
            names.append(name)
            layer = self._layer_options(name)
            if layer is None:
                skip(node, name, "skip pattern")
                continue
            with unset_fake_temporarily():
                try:
                    value = ctx.weights.value(w_node)
                except WeightReleasedError:
                    value = w_node.meta["val"]  # its pruned copy may be cached (`derive` raises again on a miss)
                weight = value.transpose(-2, -1) if grouped else value  # grouped ops take (E, K, N)
            if weight.dtype not in _FLOAT_WEIGHTS:
                skip(node, name, f"weight dtype {weight.dtype}: sparsify-linear prunes float16 / bfloat16 / float32 "
                     "weights", warn=True)
                continue
            k = weight.shape[-1]
            if layer.pattern.structured and k % layer.pattern.m:
                skip(node, name, f"shape: pattern {layer.pattern} needs K (in features) a multiple of "
                     f"{layer.pattern.m}, got K={k}", warn=True)
                continue
            if self.options.quantize == "w4a16" and k % self.options.group_size:
                skip(node, name, f"shape: group_size {self.options.group_size} does not divide K={k}", warn=True)
                continue
            targets.append(_Target(node, name, weight, layer, grouped))
        user_skip = [] if self.options.skip == _DEFAULT_SKIP else self.options.skip
        for pattern in [*user_skip, *self.options.overrides]:
            if names and not any(layer_matches(n, pattern) for n in names):
                warnings.warn(f"llmcompress: sparsify-linear pattern {pattern!r} matches no layer of graph "
                              f"{ctx.graph_id} (layers: {names[0]} ... {names[-1]})", UserWarning, stacklevel=3)
        return targets

    # --- calibration --------------------------------------------------------------------------------------------

    def _key(self, layer: _Layer, method: str, calibration: str | None = None) -> DerivedKey:
        """A layer's derived-weight key: the pass's options are in its uuid, the layer's effective ones (an
        override's), the method that ran and the calibration data's fingerprint are the parts."""
        return self.cache_key(method, str(layer.pattern), layer.sparsity, calibration)

    def _calibrate(self, gm: torch.fx.GraphModule, ctx: PassContext, targets: list[_Target], stats: dict,
                   by_magnitude: Sequence[_Target] = ()) -> dict[torch.fx.Node, tuple[Pruned, str, DerivedKey]]:
        """node -> (pruned, method) for the layers calibration pruned (the others fall back to magnitude).
        by_magnitude: the layers an override prunes by magnitude; a sequential run applies them where they stand,
        so the layers after them are pruned on the rows the compiled model gives them."""
        cfg = ctx.config
        cal = ctx.calibration or Calibration(cfg.calibration, cfg.tokenizer, cfg.calibration_samples,
                                             cfg.calibration_seq_len, example_inputs=ctx.example_inputs,
                                             input_names=ctx.input_names)
        methods = sorted({t.layer.method for t in targets})
        if not cal.available:
            if self.options.fallback == "magnitude":
                warnings.warn(f"llmcompress: sparsify-linear: no calibration data for method {', '.join(methods)}: "
                              f"{len(targets)} layers pruned by magnitude instead (fallback: magnitude)",
                              CalibrationWarning, stacklevel=3)
                stats["fallback: magnitude (no calibration data)"] = len(targets)
                return {}
            cal.require(f"sparsify-linear method {', '.join(methods)} needs calibration data (or set the pass "
                        "option fallback: magnitude to prune by magnitude with a warning)")
        fp = cal.fingerprint
        out: dict[torch.fx.Node, tuple[Pruned, str, DerivedKey]] = {}
        pending = []
        for t in targets:
            key = self._key(t.layer, t.layer.method, fp)
            hit = ctx.weights.cached(t.node.args[1], key)
            if hit is not None:
                out[t.node] = (Pruned.from_dict(hit), t.layer.method, key)
            else:
                pending.append(t)
        if out:
            stats["calibrated: cached"] = len(out)
        if not pending:
            return out
        fed = cal.feeds()
        if isinstance(fed, str):
            warnings.warn(f"llmcompress: sparsify-linear cannot calibrate graph {ctx.graph_id} ({fed}) and no pruned "
                          f"weights are cached for its {len(pending)} layers: they are pruned by magnitude. Run the "
                          "model once on a plain forward (model(input_ids)) first, so that graph calibrates them.",
                          CalibrationWarning, stacklevel=3)
            stats["calibration: magnitude instead"] = len(pending)
            return out
        stats["calibration tokens"] = fed.tokens
        by_node = {t.node: t for t in pending}

        def prune(inputs: TargetInputs) -> Callable[..., torch.Tensor] | None:
            t = by_node[inputs.node]
            # persist: SparseGPT costs what GPTQ does (minutes on a 7B model), loading is well under a second.
            key = self._key(t.layer, t.layer.method, fp)
            value = ctx.weights.derive(t.node.args[1], key,
                                       lambda _w: _calibrated(t, inputs, self.options).as_dict(), persist=True)
            pruned = Pruned.from_dict(value)
            out[t.node] = (pruned, t.layer.method, key)
            if not self.options.sequential:
                return None  # the rest of the run sees the dense layer: every layer pruned on dense activations
            return _applied(t, pruned)

        known = {}
        if self.options.sequential:
            known = {t.node: _applied(t, out[t.node][0]) for t in targets if t.node in out}
            known.update({t.node: _applied(t, _magnitude(t, self.options)) for t in by_magnitude})
        cal.run_sequential(gm, list(by_node), prune, known=known)
        return out


def _check_order(gm: torch.fx.GraphModule) -> None:
    """Raises when quantize-linear already ran on this graph: its quantized linears cannot be pruned."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "llmcompress":
            op = node.target.name().split("::")[-1].split(".")[0]
            if op.startswith(("linear_w", "linear_fp8", "grouped_linear_w")):
                raise OptionError(f"sparsify-linear runs after quantize-linear here (graph has {op}): list "
                                  "sparsify-linear before quantize-linear in the recipe (prune, then quantize the "
                                  "pruned weights), or use recipe sparse-2of4-w4a16 for SparseGPT 2:4 + int4 in one "
                                  "sweep")


def _magnitude(t: _Target, o: SparsifyLinearOptions) -> Pruned:
    """Magnitude pruning of a target (2-D, or each expert of a 3-D weight); with quantize w4a16 the kept weights
    are rounded to nearest."""
    w = t.weight
    masks = [magnitude_mask(w[e], t.layer.pattern, t.layer.sparsity) for e in range(w.shape[0])] if w.dim() == 3 \
        else [magnitude_mask(w, t.layer.pattern, t.layer.sparsity)]
    parts = [_masked(we, m, o) for we, m in zip(w if w.dim() == 3 else [w], masks)]
    return _stack(parts, w.dim() == 3)


def _masked(w: torch.Tensor, mask: torch.Tensor, o: SparsifyLinearOptions) -> Pruned:
    """w (N, K) under a keep mask, as stored: the masked weight, and with quantize w4a16 the kept values rounded to
    nearest (range from the kept values) and dequantized."""
    wf = torch.where(mask, w.float(), 0.0)
    if o.quantize == "none":
        return Pruned(wf.to(w.dtype), mask)
    scale, zero = formats.int4_scales_zeros(wf, o.group_size)
    scales16 = scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    codes = formats.quantize_int4(wf, scales16, zero, o.group_size)
    z = zero.repeat_interleave(o.group_size, dim=1)
    codes = torch.where(mask, codes, z.to(torch.uint8))
    deq = (codes.float() - z) * scales16.float().repeat_interleave(o.group_size, dim=1)
    return Pruned(deq.to(w.dtype), mask, codes, scales16, zero.to(torch.float16))


def _stack(parts: list[Pruned], experts: bool) -> Pruned:
    if not experts:
        return parts[0]
    return Pruned.from_dict({k: torch.stack([p.as_dict()[k] for p in parts]) for k in parts[0].as_dict()})


def _calibrated(t: _Target, inputs: TargetInputs, o: SparsifyLinearOptions) -> Pruned:
    """Wanda or SparseGPT of one layer from the statistics of its input activations (shared with the other layers
    reading the same activation). MoE experts (3-D weights) are pruned one by one on the rows routed to each; an
    expert with too few rows is pruned by magnitude, with a warning."""
    kind = _STATISTIC[t.layer.method]
    if not t.grouped:
        return _from_statistics(t.weight, t.layer, inputs.statistics(kind)[kind], o)
    n_experts, _, k = t.weight.shape
    xs = [x.reshape(-1, k) for x in inputs.inputs]
    bounds = [[0, *(int(v) for v in offs.tolist())] for offs in inputs.offsets()]
    parts, fallback = [], []
    for e in range(n_experts):
        rows = [x[b[e]:b[e + 1]] for x, b in zip(xs, bounds)]
        count = sum(r.shape[0] for r in rows)
        if count < _MIN_EXPERT_ROWS:
            fallback.append(f"{e} ({count} rows)")
            parts.append(_masked(t.weight[e], magnitude_mask(t.weight[e], t.layer.pattern, t.layer.sparsity), o))
        else:
            stat = getattr(statistics_of(rows, (kind,), k, device=t.weight.device), kind)
            parts.append(_from_statistics(t.weight[e], t.layer, stat, o))
    if fallback:
        warnings.warn(f"llmcompress: sparsify-linear: {t.name}: experts {', '.join(fallback)} got fewer than "
                      f"{_MIN_EXPERT_ROWS} calibration rows and are pruned by magnitude; give more calibration "
                      "samples to calibrate them", CalibrationWarning, stacklevel=2)
    return _stack(parts, True)


def _from_statistics(w: torch.Tensor, layer: _Layer, stat: torch.Tensor, o: SparsifyLinearOptions) -> Pruned:
    """One (N, K) weight pruned from its activations' `sqnorm` (Wanda) or `gram` (SparseGPT)."""
    if layer.method == "wanda":
        return _masked(w, wanda_mask(w, stat, layer.pattern, layer.sparsity), o)
    group = o.group_size if o.quantize == "w4a16" else None
    # SparseGPT's Hessian is 2 x^T x / n: `gram` doubled (as GPTQ's).
    r = sparsegpt_prune(w.float(), 2 * stat, layer.pattern, sparsity=layer.sparsity, damp=o.damp,
                        block_size=o.block_size, group_size=group)
    return Pruned(r.weight.to(w.dtype), r.mask, r.codes, r.scales, r.zeros)


def _applied(t: _Target, pruned: Pruned) -> Callable[..., torch.Tensor]:
    """The pruned layer as the sequential calibration run calls it in the dense node's place."""
    w = _node_layout(t, pruned.weight)
    return lambda *args, **kwargs: t.node.target(args[0], w, *args[2:], **kwargs)


def _node_layout(t: _Target, weight: torch.Tensor) -> torch.Tensor:
    """A pruned weight (y = x @ W.T orientation) in the layout the graph's node takes: grouped ops take (E, K, N)."""
    return weight.transpose(-2, -1).contiguous() if t.grouped else weight


def _lower(gm: torch.fx.GraphModule, ctx: PassContext, t: _Target, pruned: Pruned, method: str,
           pack_key: DerivedKey) -> dict[str, Any]:
    """Every pruned layer's lowering, the one place that decides what it runs as; returns its report decision.

    A 2:4 linear runs `llmcompress::linear_2of4` (or `linear_2of4_w4a16` for the joint int4 mode) on its packed form
    where the chooser (`kernels/sparse_path.py`, the cost model) says the op wins at decode (M = 1): the op then
    holds only the packed bytes. Every other layer, and a 2:4 layer where the op does not win (every CPU layer: the
    op's CPU path is its reference), keeps its own op (dense linear or grouped matmul) on the masked dense weight.
    """
    node = t.node
    plan, reason = _sparse_plan(ctx, t, pruned)
    with unset_fake_temporarily():
        stored = pruned.weight
        achieved = float((stored == 0).sum()) / stored.numel()  # counted from what is stored, not assumed
        if plan is not None:
            packed = ctx.weights.derive(t.node.args[1], pack_key, lambda _w: (
                pack_2of4(pruned.weight) if plan["variant"] == "2of4" else
                pack_2of4_int4(pruned.codes, pruned.mask, pruned.scales, pruned.zeros, plan["group_size"])))
        else:
            weight = _node_layout(t, pruned.weight)
    info: dict[str, Any] = {"pattern": str(t.layer.pattern), "method": method, "target": t.layer.sparsity,
                            "achieved": round(achieved, 6), "shape": list(t.weight.shape),
                            "dense_bytes": int(t.weight.numel() * t.weight.element_size())}
    with gm.graph.inserting_before(node):
        if plan is None:
            const = ctx.weights.add(gm, weight, f"{t.name}.weight")
            new = call(gm.graph, ctx.fake_mode, node.target, (node.args[0], const, *node.args[2:]),
                       dict(node.kwargs))
            info.update(stored_bytes=int(stored.numel() * stored.element_size()), kernel="dense (masked)",
                        reason=reason)
        else:
            names = ("values", "meta") if plan["variant"] == "2of4" else ("qvalues", "meta", "scales", "zeros")
            consts = [ctx.weights.add(gm, x, f"{t.name}.{n}") for n, x in zip(names, packed)]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if plan["variant"] == "2of4":
                op, args = torch.ops.llmcompress.linear_2of4.default, (node.args[0], *consts, bias)
            else:
                op = torch.ops.llmcompress.linear_2of4_w4a16.default
                args = (node.args[0], *consts, plan["group_size"], bias)
            new = call(gm.graph, ctx.fake_mode, op, (*args, plan["gemv_max_m"], plan["dense_min_m"]), {})
            info.update(stored_bytes=int(sum(x.numel() * x.element_size() for x in packed)), kernel=plan["kernel"],
                        reason=reason, ranges=plan["ranges"], priced=plan["priced"])
    if pruned.codes is not None:
        info["quantize"] = ("w4a16 (joint SparseGPT sweep; " +
                            ("int4 codes packed 2:4)" if plan else "dequantized into the masked dense weight)"))
    info["predicted"] = _predicted(ctx, node, new)
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    new.meta["llmcompress.linear"] = f"{t.name}.weight"
    new.meta[SPARSITY_META] = {"pattern": str(t.layer.pattern), "method": method}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return {"node": new.name, "layer": t.name, "sparsity": info}


def _sparse_plan(ctx: PassContext, t: _Target, pruned: Pruned) -> tuple[dict[str, Any] | None, str]:
    """(the 2:4 op's plan, or None for the masked dense weight; the reason, for the report)."""
    pattern = t.layer.pattern
    if not pattern.structured:
        return None, "no kernel for this pattern pays: unstructured sparsity is stored as a masked dense weight"
    if (pattern.n, pattern.m) != (2, 4):
        return None, f"{pattern}: no compressed kernel for this pattern (only 2:4 has one); stored masked dense"
    if t.grouped:
        return None, "2:4 MoE experts (3-D weights): no grouped 2:4 kernel; stored masked dense"
    dtype = t.node.args[0].meta["val"].dtype
    if dtype not in SUPPORTED_DTYPES:
        return None, f"activations in {dtype}: the 2:4 kernels take {', '.join(map(str, SUPPORTED_DTYPES))}"
    variant = "2of4" if pruned.codes is None else "2of4-w4a16"
    n, k = t.weight.shape
    group_size = k // pruned.scales.shape[-1] if pruned.codes is not None else 128  # the joint sweep's groups
    # Our Triton lowering prices the op as a GPU kernel even on a CPU (the interpreter's tests); otherwise the
    # device the weights live on, where a CPU op is its reference.
    triton = getattr(ctx.config, "lowering", None) == "triton"
    device = "cuda" if t.weight.device.type == "cuda" or triton else "cpu"
    path = choose_sparse_path(ctx.cost_model, n, k, dtype, device, variant, group_size)
    priced = {m: {c: v for c, v in p.items() if v is not None} for m, p in path.priced.items()}
    if path.dense_min_m is None:
        return None, (f"cost model: {path.kernel_at(1)} is fastest at M = 1 on {device}"
                      + (" (the 2:4 op's CPU path is its reference)" if device == "cpu" else "")
                      + "; stored masked dense")
    ranges = [[first, last, kernel] for first, last, kernel in path.ranges]
    op = "linear_2of4" if variant == "2of4" else "linear_2of4_w4a16"
    dense = "" if path.dense_min_m >= DENSE_OFF else f", expanded to dense F.linear for M >= {path.dense_min_m}"
    return ({"variant": variant, "group_size": group_size, "gemv_max_m": path.gemv_max_m,
             "dense_min_m": path.dense_min_m, "ranges": ranges, "priced": priced,
             "kernel": f"{op} (GEMV for M <= {path.gemv_max_m}{dense})"},
            f"cost model: the 2:4 op wins at M = 1 on {device}")


def _predicted(ctx: PassContext, dense: torch.fx.Node, pruned: torch.fx.Node) -> dict[str, Any] | None:
    """Predicted seconds of the layer before and after at the graph's example sizes (the cost model's roofline)."""
    if ctx.cost_model is None:
        return None
    try:
        before = ctx.cost_model.estimate(dense, ctx.sizes)
        after = ctx.cost_model.estimate(pruned, ctx.sizes)
        return {"dense_s": float(before.time_s), "pruned_s": float(after.time_s)}
    except Exception as e:  # noqa: BLE001 - a pricing gap must not fail the rewrite
        return {"error": f"{type(e).__name__}: {e}"}


__all__ = ["METHODS", "SPARSITY_META", "Pruned", "SparsifyLinearOptions", "SparsifyLinearPass"]
