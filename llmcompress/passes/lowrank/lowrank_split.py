"""`lowrank-split`: replace a linear W (N, K) by two, x -> V (r, K) -> U (N, r), on frozen weights.

Methods (option `method`): `svd` (the weight's own SVD, `svd.py`), `asvd` (input channels scaled by mean |x|^alpha,
`asvd.py`), `svd-llm` (whitened by the Cholesky factor of XᵀX, `svdllm.py`). Ranks: per layer through `overrides`
(`rank`), or from the global `ratio` (fraction of the targeted linears' parameters kept) by `allocate.py` on each
layer's error curve measured on the dense model's calibration activations. After truncation U is refit in closed form
on the calibration activations (`refit`), and with `sequential` (default) each layer is factored on the inputs that
reach it after the layers before it were split (and refit towards the float model's outputs).

Only where it pays: r must be below N K / (N + K) (else no bytes are saved and the layer stays dense), and with
`objective: speed` (default) the cost model must price the split no slower than the dense linear at the compile's M
(`_plan`, the one place that asks, through `kernels/lowrank_path.py`). Factors are derived weights keyed by
`cache_key` (persisted), so recompiles reuse them. A split layer runs as `llmcompress::linear_lowrank` on CUDA (and
with our Triton lowering), as two plain `aten.linear` nodes on the CPU and whenever `quantize-linear` follows, which
then quantizes both factors (recipe `lowrank-svdllm-80-w8a16`); `lowrank-split` after `quantize-linear` raises.
MoE experts stored as 3-D weights (grouped matmuls) are split per expert at one rank per weight: `experts.py`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import sympy
import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.calibration.data import CalibrationWarning
from llmcompress.calibration.service import Calibration, TargetInputs
from llmcompress.cost.roofline import sym
from llmcompress.errors import OptionError, WeightReleasedError, did_you_mean
from llmcompress.fx_utils import call, finish_rewrite, grouped_matmul_ops, layer_matches
from llmcompress.kernels import lowrank_linear  # noqa: F401  (registers llmcompress::linear_lowrank)
from llmcompress.kernels.linear_common import SUPPORTED_DTYPES
from llmcompress.kernels.lowrank_path import choose_lowrank_path
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.lowrank import experts
from llmcompress.passes.lowrank.allocate import LayerCurve, allocate_ranks, kept_params
from llmcompress.passes.lowrank.asvd import asvd
from llmcompress.passes.lowrank.error_curve import curve_points
from llmcompress.passes.lowrank.factors import Decomposition, refit_u
from llmcompress.passes.lowrank.svd import svd
from llmcompress.passes.lowrank.svdllm import svd_llm
from llmcompress.passes.weights import DerivedKey

aten = torch.ops.aten

METHODS = ("svd", "asvd", "svd-llm")
_CALIBRATED = ("asvd", "svd-llm")
_OVERRIDE_KEYS = ("method", "rank", "skip")
# lm_head: the logits are the most sensitive output; `*.gate`: MoE routers (the defaults of quantize-linear).
_DEFAULT_SKIP = ["lm_head", "*.gate"]
_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32)
# The node meta key both linears of a split layer carry: {"layer", "factor": "v" | "u", "rank", "method"}.
LOWRANK_META = "llmcompress.lowrank"


@dataclasses.dataclass(frozen=True)
class LowrankSplitOptions:
    method: Literal["svd", "asvd", "svd-llm"] = "svd-llm"
    ratio: float | None = None
    """Fraction of the targeted linears' parameters kept, in (0, 1]; ranks allocated by measured sensitivity.
    Layers given a `rank` through `overrides` are outside the allocation. One of ratio or override ranks is needed."""
    objective: Literal["speed", "memory"] = "speed"
    """`speed`: split only where the cost model prices the split no slower than dense at the compile's sizes;
    `memory`: wherever it saves bytes."""
    sequential: bool = True
    """Factor each layer on the inputs that reach it after the layers before it were split (False: the dense
    model's)."""
    refit: bool = True
    """Refit U in closed form (least squares on the calibration activations, given V) after truncation."""
    alpha: float = 0.5
    """ASVD: the exponent of mean |x| that scales the input channels."""
    damp: float = 0.01
    """SVD-LLM: damping added to XᵀX, as a fraction of its mean diagonal (more, with a warning, when singular)."""
    fallback: Literal["none", "svd"] = "none"
    """Without calibration data, `svd` factors asvd / svd-llm layers by plain SVD with a warning; `none` raises."""
    skip: list[str] = dataclasses.field(default_factory=lambda: list(_DEFAULT_SKIP))
    """Layer name patterns left dense (fnmatch on the module path or its tail). Default: `lm_head`, `*.gate`."""
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-layer options: {pattern: {method / rank / skip: ...}}; the first match applies."""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        where = "pass 'lowrank-split'"
        _check_method(self.method, where)
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0 < self.ratio <= 1):
            raise OptionError(f"{where}: key 'ratio' got {self.ratio!r}; expected a fraction in (0, 1] of the "
                              "targeted linears' parameters to keep, e.g. 0.8")
        if self.objective not in ("speed", "memory"):
            raise OptionError(f"{where}: key 'objective' got {self.objective!r}; expected 'speed' or 'memory'")
        if self.fallback not in ("none", "svd"):
            raise OptionError(f"{where}: key 'fallback' got {self.fallback!r}; expected 'none' or 'svd'")
        if not 0 < self.damp < 1:
            raise OptionError(f"{where}: key 'damp' got {self.damp!r}; expected 0 < damp < 1")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise OptionError(f"{where}: key 'alpha' got {self.alpha!r}; expected 0 < alpha <= 1")
        for pattern, opts in self.overrides.items():
            if not isinstance(opts, dict):
                raise OptionError(f"{where}: override {pattern!r} must be a mapping of {', '.join(_OVERRIDE_KEYS)}")
            bad = sorted(set(opts) - set(_OVERRIDE_KEYS))
            if bad:
                raise OptionError(f"{where}: override {pattern!r} has unknown key {bad[0]!r}"
                                  f"{did_you_mean(bad[0], _OVERRIDE_KEYS)}; allowed: {', '.join(_OVERRIDE_KEYS)}")
            if "method" in opts:
                _check_method(opts["method"], f"{where}: override {pattern!r}")
            rank = opts.get("rank")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
                raise OptionError(f"{where}: override {pattern!r}: rank {rank!r}; expected an integer >= 1 (and "
                                  "below min(N, K) of the layers it matches)")
        if self.ratio is None and not any("rank" in o for o in self.overrides.values()):
            raise OptionError(f"{where}: give 'ratio' (fraction of the linear parameters kept, in (0, 1]) or "
                              "per-layer ranks through overrides: {pattern: {rank: r}}")


def _check_method(method: Any, where: str) -> None:
    if method not in METHODS:
        raise OptionError(f"{where}: method {method!r} unknown{did_you_mean(str(method), METHODS)}; expected one of "
                          f"{', '.join(METHODS)}")


@dataclasses.dataclass
class _Target:
    node: torch.fx.Node
    name: str
    weight: torch.Tensor
    """(N, K): y = x @ W.T; (E, N, K) for MoE experts (a grouped matmul's 3-D weight)."""
    method: str
    rank: int | None
    """Fixed by an override; None: allocated from `ratio`."""
    grouped: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight (of each expert)."""
        return tuple(self.weight.shape[-2:])

    @property
    def experts(self) -> int:
        return self.weight.shape[0] if self.grouped else 1


def _module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


class LowrankSplitPass(Pass):
    name = "lowrank-split"
    description = "Split linears into two low-rank factors on frozen weights (SVD, ASVD, SVD-LLM; ranks by a " \
                  "parameter budget and the cost model)"
    Options = LowrankSplitOptions
    after = ("canonicalize",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, Any] = {}
        decisions: list[dict[str, Any]] = []
        _check_order(gm)
        targets = self._targets(gm, ctx, stats, decisions)
        if not targets:
            return PassResult(False, stats, decisions)
        curves: dict[torch.fx.Node, torch.Tensor] = {}
        with unset_fake_temporarily():  # passes run inside AOT's fake mode; factoring computes for real
            cal = self._calibration(ctx, targets, stats)
            ranks = self._ranks(gm, ctx, cal, targets, stats, curves)
            factors = self._factor(gm, ctx, cal, targets, ranks, stats)
        changed = False
        total = kept = 0
        for t in targets:
            n, k = t.shape
            total += t.experts * n * k
            decision = _lower(gm, ctx, t, ranks[t.node], factors.get(t.node), self.options.objective)
            decisions.append(decision)
            r = decision["rank"]["rank"]
            if t.node in curves:  # the allocation's curve, for the report's quality / size plot (real tensors)
                with unset_fake_temporarily():
                    decision["rank"]["error_curve"] = curve_points(curves[t.node], n, k, None if r == "dense" else r)
            kept += t.experts * (n * k if r == "dense" else r * (n + k))
            changed |= r != "dense"
            label = f"split {t.method}" if r != "dense" else f"left dense: {decision['rank']['why']}"
            stats[label] = stats.get(label, 0) + 1
        stats["params_kept_fraction"] = round(kept / total, 6)
        if changed:
            finish_rewrite(gm)
        return PassResult(changed, stats, decisions)

    # --- which layers -------------------------------------------------------------------------------------------

    def _layer(self, name: str) -> tuple[str, int | None] | None:
        o = self.options
        merged: dict[str, Any] = {"method": o.method, "rank": None, "skip": any(layer_matches(name, p) for p in o.skip)}
        for pattern, opts in o.overrides.items():
            if layer_matches(name, pattern):
                merged.update(opts)
                break
        return None if merged["skip"] else (merged["method"], merged["rank"])

    def _targets(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: dict, decisions: list) -> list[_Target]:
        grouped_ops = grouped_matmul_ops()
        targets: list[_Target] = []
        names: list[str] = []

        def dense(node: torch.fx.Node, name: str, why: str, reason: str, warn: bool = False) -> None:
            stats[f"left dense: {why}"] = stats.get(f"left dense: {why}", 0) + 1
            decisions.append({"node": node.name, "layer": name, "rank": {"rank": "dense", "why": why,
                                                                         "reason": reason}})
            if warn:
                warnings.warn(f"llmcompress: lowrank-split left {name} dense: {reason}", UserWarning, stacklevel=4)

        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            grouped = node.target in grouped_ops
            if not (node.target is aten.linear.default or grouped):
                continue
            w_node = node.args[1]
            if not ctx.weights.is_constant(w_node):
                stats["left dense: dynamic weight"] = stats.get("left dense: dynamic weight", 0) + 1
                continue
            name = _module_name(ctx.weights.name(w_node) or w_node.name)
            names.append(name)
            layer = self._layer(name)
            if layer is None:
                dense(node, name, "skip pattern", "skip pattern")
                continue
            with unset_fake_temporarily():
                try:
                    weight = ctx.weights.value(w_node)
                except WeightReleasedError:
                    weight = w_node.meta["val"]  # its factors may be cached (`derive` raises again on a miss)
                if grouped:
                    weight = weight.transpose(-2, -1)  # grouped ops take (E, K, N)
            if weight.dtype not in _FLOAT_WEIGHTS:
                dense(node, name, "dtype", f"weight dtype {weight.dtype}: lowrank-split factors float16 / bfloat16 / "
                      "float32 weights", warn=True)
                continue
            method, rank = layer
            n, k = weight.shape[-2:]
            if rank is not None and rank >= min(n, k):
                raise OptionError(f"lowrank-split: rank {rank} for {name} ({n}x{k}) must be below min(N, K) = "
                                  f"{min(n, k)} (and below N K / (N + K) = {n * k / (n + k):.1f} to save bytes)")
            targets.append(_Target(node, name, weight, method, rank, grouped))
        user_skip = [] if self.options.skip == _DEFAULT_SKIP else self.options.skip
        for pattern in [*user_skip, *self.options.overrides]:
            if names and not any(layer_matches(x, pattern) for x in names):
                warnings.warn(f"llmcompress: lowrank-split pattern {pattern!r} matches no layer of graph "
                              f"{ctx.graph_id} (layers: {names[0]} ... {names[-1]})", UserWarning, stacklevel=3)
        return targets

    # --- calibration, ranks, factors ----------------------------------------------------------------------------

    def _key(self, t: _Target, what: str, rank: int | None, fp: str | None) -> DerivedKey:
        """A layer's derived-weight key: the pass's options are in its uuid; the layer's method, what is derived
        (`curve` or `factors`), its rank and the calibration data's fingerprint are the parts."""
        return self.cache_key(what, t.method, rank, fp)

    def _calibration(self, ctx: PassContext, targets: list[_Target], stats: dict) -> Calibration | None:
        """The graph's calibration, or None without data (calibrated methods then fall back or raise)."""
        cfg = ctx.config
        cal = ctx.calibration or Calibration(cfg.calibration, cfg.tokenizer, cfg.calibration_samples,
                                             cfg.calibration_seq_len, example_inputs=ctx.example_inputs,
                                             input_names=ctx.input_names)
        if cal.available:
            return cal
        calibrated = sorted({t.method for t in targets if t.method in _CALIBRATED})
        if calibrated:
            if self.options.fallback != "svd":
                cal.require(f"lowrank-split method {', '.join(calibrated)} needs calibration data (or set the pass "
                            "option fallback: svd to factor by plain SVD with a warning)")
            warnings.warn(f"llmcompress: lowrank-split: no calibration data for method {', '.join(calibrated)}: "
                          "layers factored by plain SVD instead (fallback: svd)", CalibrationWarning, stacklevel=3)
            for t in targets:
                if t.method in _CALIBRATED:
                    t.method = "svd"
                    stats["fallback: svd (no calibration data)"] = stats.get("fallback: svd (no calibration data)",
                                                                             0) + 1
        stats["refit: no calibration data"] = len(targets) if self.options.refit else 0
        return None

    def _decompose(self, t: _Target, statistics: dict[str, torch.Tensor] | None) -> Decomposition:
        if t.method == "svd":
            return svd(t.weight)
        if t.method == "asvd":
            return asvd(t.weight, statistics["absmean"], self.options.alpha)
        return svd_llm(t.weight, statistics["gram"], self.options.damp)

    def _ranks(self, gm: torch.fx.GraphModule, ctx: PassContext, cal: Calibration | None, targets: list[_Target],
               stats: dict, curves: dict[torch.fx.Node, torch.Tensor]) -> dict[torch.fx.Node, int | None]:
        """node -> rank (None: left dense by the allocation). Override ranks as given; the others allocated from
        `ratio` on error curves measured on the dense model (cached per layer, so recompiles do not calibrate),
        which it puts into `curves` (node -> curve) for the report."""
        ranks: dict[torch.fx.Node, int | None] = {t.node: t.rank for t in targets if t.rank is not None}
        free = [t for t in targets if t.rank is None]
        if not free:
            return ranks
        if self.options.ratio is None:
            raise OptionError(f"lowrank-split: layers {free[0].name} ... have no rank (no override matches them) and "
                              "the pass has no 'ratio': give ratio, or skip them")
        fp = cal.fingerprint if cal is not None else None
        for t in free:
            hit = ctx.weights.cached(t.node.args[1], self._key(t, "curve", None, fp))
            if hit is not None:
                curves[t.node] = hit["curve"]
        missing = [t for t in free if t.node not in curves]
        if any(t.grouped for t in missing):
            self._expert_curves(gm, ctx, cal, [t for t in missing if t.grouped], curves, stats)
            missing = [t for t in missing if not t.grouped]
        if missing:
            observed = {}
            if cal is not None:
                kinds = ("gram", "absmean")
                observed = cal.observe(gm, statistics={t.node: kinds for t in missing}).statistics
                stats["calibration tokens"] = int(next(iter(observed.values()))["rows"])
            for t in missing:
                st = observed.get(t.node)

                def curve(_w: torch.Tensor, t: _Target = t, st: dict | None = st) -> dict[str, torch.Tensor]:
                    d = self._decompose(t, st)
                    return {"curve": d.error_curve(st["gram"] if st is not None else None).float()}

                curves[t.node] = ctx.weights.derive(t.node.args[1], self._key(t, "curve", None, fp), curve,
                                                    persist=True)["curve"]
        layers = [LayerCurve(*t.shape, curves[t.node], t.experts) for t in free]
        total = sum(t.experts * n * k for t in targets for n, k in [t.shape])
        fixed = sum(t.experts * t.rank * (n + k) for t in targets if t.rank is not None for n, k in [t.shape])
        budget = int(self.options.ratio * total) - fixed
        try:
            allocated = allocate_ranks(layers, budget)
        except ValueError as e:
            raise OptionError(f"lowrank-split: ratio {self.options.ratio} is too small for these layers: {e}") from e
        stats["allocated params"] = kept_params(layers, allocated) + fixed
        stats["budget params"] = budget + fixed
        ranks.update({t.node: r for t, r in zip(free, allocated)})
        return ranks

    def _factor(self, gm: torch.fx.GraphModule, ctx: PassContext, cal: Calibration | None, targets: list[_Target],
                ranks: dict[torch.fx.Node, int | None], stats: dict
                ) -> dict[torch.fx.Node, tuple[torch.Tensor, torch.Tensor]]:
        """node -> (U (N, r), V (r, K)) in the weight's dtype for every layer with a rank."""
        o = self.options
        fp = cal.fingerprint if cal is not None else None
        todo = [t for t in targets if ranks[t.node] is not None and ranks[t.node] * sum(t.shape) < t.shape[0] * t.shape[1]]
        out: dict[torch.fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        pending = []
        for t in todo:
            hit = ctx.weights.cached(t.node.args[1], self._key(t, "factors", ranks[t.node], fp))
            if hit is not None:
                out[t.node] = (hit["u"], hit["v"])
            else:
                pending.append(t)
        if out:
            stats["factored: cached"] = len(out)
        if not pending:
            return out
        calibrated = cal is not None and (o.refit or any(t.method in _CALIBRATED for t in pending))

        def factor(t: _Target, st: Any) -> tuple[torch.Tensor, torch.Tensor]:
            def compute(_w: torch.Tensor) -> dict[str, torch.Tensor]:
                if t.grouped:
                    return self._factor_experts(t, ranks[t.node], st, stats)
                u, v = self._decompose(t, st).factors(ranks[t.node])
                if o.refit and st is not None:
                    u = refit_u(t.weight, v, st["gram"], st.get("cross"))
                return {"u": u.to(t.weight.dtype).contiguous(), "v": v.to(t.weight.dtype).contiguous()}

            value = ctx.weights.derive(t.node.args[1], self._key(t, "factors", ranks[t.node], fp), compute,
                                       persist=True)
            out[t.node] = (value["u"], value["v"])
            return out[t.node]

        if not calibrated:
            for t in pending:
                factor(t, None)
            return out
        if not o.sequential:
            kinds = ("gram", "absmean")
            observed = cal.observe(gm, statistics={t.node: kinds for t in pending if not t.grouped}).statistics
            grouped = [t.node for t in pending if t.grouped]
            observed.update(experts.observe_experts(cal, gm, grouped, kinds) if grouped else {})
            for t in pending:
                factor(t, observed[t.node])
            return out
        fed = cal.feeds()
        if isinstance(fed, str):
            raise OptionError(f"lowrank-split cannot calibrate graph {ctx.graph_id} sequentially ({fed}); run the "
                              "model once on a plain forward (model(input_ids)) first, or set sequential: false")
        by_node = {t.node: t for t in pending}

        def on_target(inputs: TargetInputs) -> Callable[..., torch.Tensor]:
            t = by_node[inputs.node]
            if t.grouped:  # per expert; no `cross`: the float model routes its rows to other experts
                return _applied(t, *factor(t, experts.expert_statistics(inputs, ("gram", "absmean"))))
            kinds = ("gram", "absmean", "cross") if o.refit else ("gram", "absmean")
            return _applied(t, *factor(t, inputs.statistics(*kinds)))

        cached = {t.node: _applied(t, *out[t.node]) for t in todo if t.node in out}
        cal.run_sequential(gm, list(by_node), on_target, float_shadow=o.refit, known=cached)
        stats["sequential"] = len(pending)
        return out

    def _expert_curves(self, gm: torch.fx.GraphModule, ctx: PassContext, cal: Calibration | None,
                       targets: list[_Target], curves: dict[torch.fx.Node, torch.Tensor], stats: dict) -> None:
        """The error curves of 3-D expert weights (`experts.experts_curve`) on the dense model's routed rows."""
        fp = cal.fingerprint if cal is not None else None
        observed = experts.observe_experts(cal, gm, [t.node for t in targets], ("gram", "absmean")) \
            if cal is not None else {}
        for t in targets:
            st = observed.get(t.node)

            def curve(_w: torch.Tensor, t: _Target = t, st: Any = st) -> dict[str, torch.Tensor]:
                decs, _ = experts.decompose_experts(t.weight, t.method, st, self.options.alpha, self.options.damp)
                return {"curve": experts.experts_curve(decs, st).float()}

            curves[t.node] = ctx.weights.derive(t.node.args[1], self._key(t, "curve", None, fp), curve,
                                                persist=True)["curve"]

    def _factor_experts(self, t: _Target, rank: int, st: Any, stats: dict) -> dict[str, torch.Tensor]:
        decs, few = experts.decompose_experts(t.weight, t.method, st, self.options.alpha, self.options.damp)
        if few:
            stats[experts.FEW_ROWS] = stats.get(experts.FEW_ROWS, 0) + len(few)
            experts.warn_few_rows(t.name, few)
        return experts.factor_experts(t.weight, decs, rank, st, self.options.refit)


def _applied(t: _Target, u: torch.Tensor, v: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The split layer as the sequential calibration run calls it in the dense node's place."""
    if t.grouped:
        return experts.grouped_split(t.node, u, v)
    return lambda x, _w, *rest, **kw: F.linear(F.linear(x, v), u, *rest, **kw)


def _check_order(gm: torch.fx.GraphModule) -> None:
    """Raises when quantize-linear already ran on this graph: its quantized linears cannot be factored."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "llmcompress":
            op = node.target.name().split("::")[-1].split(".")[0]
            if op.startswith(("linear_w", "linear_fp8", "grouped_linear_w")):
                raise OptionError(f"lowrank-split runs after quantize-linear here (graph has {op}): list lowrank-split "
                                  "before quantize-linear in the recipe (split, then quantize both factors), e.g. "
                                  "recipe lowrank-svdllm-80-w8a16")


def _rows(ctx: PassContext, node: torch.fx.Node) -> int | None:
    """M of the linear at the compile's sizes (the rows of x); None where a size is unknown."""
    shape = node.args[0].meta["val"].shape
    expr = sympy.Mul(*(sym(s) for s in shape[:-1]))
    if ctx.sizes:
        expr = expr.subs({(sympy.Symbol(k) if isinstance(k, str) else k): v for k, v in ctx.sizes.items()})
    return None if expr.free_symbols else max(int(expr), 1)


def _plan(ctx: PassContext, t: _Target, rank: int) -> tuple[bool, str, dict[str, Any]]:
    """(whether the split pays, the kernel it runs as, what the report shows): the one place `lowrank-split` asks
    the cost model, through `kernels/lowrank_path.choose_lowrank_path` at the compile's M.

    The kernel: `llmcompress::linear_lowrank` (the fused kernel for M <= its `fused_max_m`, two GEMMs above) on CUDA
    and with our Triton lowering; two `aten.linear` nodes on the CPU (the op's CPU path is the same two F.linear
    calls, and plain linears let Inductor plan them) and wherever `quantize-linear` follows in the pipeline (it
    quantizes each factor into its own int8 / int4 linear, which the fused op does not take)."""
    node, (n, k) = t.node, t.shape
    dtype = node.args[0].meta["val"].dtype
    triton = getattr(ctx.config, "lowering", None) == "triton"
    device = "cuda" if t.weight.device.type == "cuda" or triton else "cpu"
    m = _rows(ctx, node)
    info: dict[str, Any] = {"m": m, "device": device}
    quantized_next = "quantize-linear" in ctx.pipeline
    if dtype not in SUPPORTED_DTYPES:
        return True, "two linears", {**info, "why": f"activations in {dtype}: not priced"}
    path = choose_lowrank_path(ctx.cost_model, n, k, rank, dtype, device)
    if quantized_next:
        kernel = "two linears"
        info["why_kernel"] = "quantize-linear follows: each factor becomes its own quantized linear"
    elif device == "cuda" and path.fused_max_m >= 1:
        kernel = "linear_lowrank"
        info["fused_max_m"] = path.fused_max_m
    else:
        kernel = "two linears"
        info["why_kernel"] = f"cost model: no M where the fused kernel beats two GEMMs on {device}" \
            if device == "cuda" else "CPU: two F.linear (the op's CPU path), planned by the lowering"
    if ctx.cost_model is None:
        return True, kernel, {**info, "why": "no cost model: split as asked"}
    info["priced"] = path.priced
    if m is None:
        return path.pays_at(1), kernel, {**info, "why": "M unknown at compile time: priced at M = 1"}
    times = path.times(m)
    # Two linears when quantize-linear follows: price what will run, not the fused kernel.
    split_s = times[path.kernel_at(m)] if kernel == "linear_lowrank" else times["two-linears"]
    info["at_m"] = {"split_s": split_s, "dense_s": times["dense"]}
    return split_s <= times["dense"], kernel, info


def _lower(gm: torch.fx.GraphModule, ctx: PassContext, t: _Target, rank: int | None,
           factors: tuple[torch.Tensor, torch.Tensor] | None, objective: str) -> dict[str, Any]:
    """Every split layer's lowering, the one place that decides what it runs as; returns its report decision.

    `llmcompress::linear_lowrank(x, V, U, bias, fused_max_m)` or two `aten.linear` nodes x -> V (r, K) -> U (N, r),
    bias on the second, as `_plan` says; every new node carries `LOWRANK_META`. A layer stays dense where the
    allocation kept it dense, where r >= N K / (N + K) (no bytes saved), or, with objective `speed`, where the cost
    model prices the split slower than dense at the compile's M (nothing is added to the graph then)."""
    if t.grouped:
        return experts.lower_experts(gm, ctx, t.node, t.name, t.method, t.weight, rank, factors, objective,
                                     LOWRANK_META)
    node, (n, k) = t.node, t.shape
    elem = t.weight.element_size()
    info: dict[str, Any] = {"method": t.method, "shape": [n, k], "dense_bytes": n * k * elem}

    def dense(why: str, reason: str, **extra: Any) -> dict[str, Any]:
        return {"node": node.name, "layer": t.name, "rank": {"rank": "dense", "why": why, "reason": reason, **info,
                                                             **extra}}

    if rank is None:
        return dense("allocation", "the rank allocation kept this layer dense (its error curve is steep enough that "
                     "its full N K parameters buy more than ranks elsewhere)")
    if factors is None:
        return dense("no bytes saved", f"rank {rank} >= N K / (N + K) = {n * k / (n + k):.1f}: the two factors "
                     f"would store at least the dense weight's {n * k} parameters", asked=rank)
    pays, kernel, plan = _plan(ctx, t, rank)
    if objective == "speed" and not pays:
        return dense("slower", f"cost model: the split ({kernel}) is slower than dense at M = {plan['m']} on "
                     f"{plan['device']} (objective: speed; objective: memory splits it anyway)", asked=rank,
                     predicted=plan)
    u, v = factors
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with gm.graph.inserting_before(node):
        v_const = ctx.weights.add(gm, v, f"{t.name}.lowrank_v.weight")
        u_const = ctx.weights.add(gm, u, f"{t.name}.lowrank_u.weight")
        if kernel == "linear_lowrank":
            new = [call(gm.graph, ctx.fake_mode, torch.ops.llmcompress.linear_lowrank.default,
                        (node.args[0], v_const, u_const, bias, plan["fused_max_m"]), {})]
            parts = [("vu", new[0])]
        else:
            v_node = call(gm.graph, ctx.fake_mode, aten.linear.default, (node.args[0], v_const), {})
            u_node = call(gm.graph, ctx.fake_mode, aten.linear.default, (v_node, u_const, bias), {})
            new, parts = [v_node, u_node], [("v", v_node), ("u", u_node)]
    for part, created in parts:
        created.meta.update({key: val for key, val in node.meta.items() if key != "val"})
        created.meta["llmcompress.linear"] = f"{t.name}.lowrank_{part}.weight"
        created.meta[LOWRANK_META] = {"layer": t.name, "factor": part, "rank": rank, "method": t.method}
    node.replace_all_uses_with(new[-1])
    gm.graph.erase_node(node)
    label = (f"linear_lowrank (fused for M <= {plan['fused_max_m']}, two GEMMs above)" if kernel == "linear_lowrank"
             else "two linears (x -> V -> U)")
    info.update(stored_bytes=(u.numel() + v.numel()) * elem, kernel=label, predicted=plan)
    return {"node": new[-1].name, "layer": t.name, "rank": {"rank": rank, **info}}


__all__ = ["LOWRANK_META", "METHODS", "LowrankSplitOptions", "LowrankSplitPass"]
