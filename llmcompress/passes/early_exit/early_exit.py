"""`early-exit`: the early-exit cascade in a compiled decode graph (issue 16; recipe `early-exit-cascade`).

1. Structure (`structure.py`): the residual stream entering / leaving each decoder layer, the final norm + LM head
   and each layer's static-cache writes, from the nodes' `nn_module_stack`. Anything else (no static cache, other
   outputs than the logits, an LM head not on the last layer's state) is left alone with the reason.
2. Plan: the layer-boundary values on the calibration data (`ctx.calibration.hidden_states`) go to
   `exit_gates.calibrate_from_states` with the cascade priced from the graph's weights (`costs.py`): exit heads
   (tuned lens), gates and thresholds to `min_agreement`, the exits the cost model keeps, or a declined plan. The
   plan is a derived result (`cache_key` over the graph's weights, persisted): generate's decode graph cannot be
   fed calibration data and takes the plan its prefill graph calibrated.
3. Rewrite, decode steps only (one token per row; the prefill and longer runs keep the full graph): the graph is cut
   into pieces (`split.py`) that the backend lowers and chooses between at run time (`backend/branches.py`).
Options `gate: open | closed` force every kept exit's gate (for measuring and tests; `head: lens` then needs no
calibration data).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Literal

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.errors import OptionError
from llmcompress.exit_gates import (
    CascadePlan,
    Gate,
    calibrate_from_states,
    check_max_perplexity_increase,
    check_min_agreement,
    fit_fill_maps,
)
from llmcompress.exit_heads import (
    DISTILL_STEPS,
    DecoderParts,
    ExitHead,
    calibrated_heads,
    check_exit_layer,
    fit_heads_from_states,
)
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.early_exit.costs import graph_costs
from llmcompress.passes.early_exit.split import (
    META_KEY,
    ExitParts,
    PieceBuilder,
    UnsupportedGraph,
    closure,
    split_cascade,
)
from llmcompress.passes.early_exit.structure import DecoderGraph, find_decoder, layer_of

aten = torch.ops.aten
GATES = ("calibrated", "open", "closed")
HEADS = ("fitted", "distilled", "lens")


@dataclasses.dataclass(frozen=True)
class EarlyExitOptions:
    min_agreement: float = 0.99
    """Top-1 agreement with the full model the cascade keeps on held-back calibration tokens, in (0, 1]."""
    exit_layers: Literal["auto"] | tuple[int, ...] = "auto"
    """Candidate exits (after decoder layer E, 1 … L − 1); the cost model keeps those that pay."""
    gate: Literal["calibrated", "open", "closed"] = "calibrated"
    """`open` / `closed` force the gate of one given exit (`exit_layers: [E]`) for measuring and tests."""
    head: Literal["fitted", "distilled", "lens"] = "fitted"
    """The exit's translation: fitted by ridge least squares (tuned lens), that fit refined on the full model's
    next-token distribution (`exit_heads.distill_heads`), or the identity (logit lens)."""
    distill_steps: int = DISTILL_STEPS
    """Adam steps of the distilled heads (512 tokens each)."""
    features: Literal["auto", "hidden", "logits"] = "auto"
    hidden_units: int = 32
    max_perplexity_increase: float | None = None
    """Also hold the held-back expected perplexity within 1 + this (0.02: +2 %; null: top-1 agreement only)."""
    version: ClassVar[int] = 2  # 2: exit temperatures in the plan

    def __post_init__(self) -> None:
        where = "pass 'early-exit'"
        try:
            check_min_agreement(self.min_agreement)
            check_max_perplexity_increase(self.max_perplexity_increase)
        except OptionError as e:
            raise OptionError(f"{where}: {e}") from None
        if self.exit_layers != "auto" and (not self.exit_layers or any(
                isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in self.exit_layers)):
            raise OptionError(f"{where}: exit_layers {list(self.exit_layers)!r}; expected 'auto' or a non-empty list "
                              "of decoder layers ≥ 1 (an exit after layer E; the model's L bounds it to L − 1)")
        if self.gate != "calibrated" and (self.exit_layers == "auto" or len(self.exit_layers) != 1):
            raise OptionError(f"{where}: gate {self.gate!r} forces one exit's gate; give exit_layers: [E] (one layer)")
        if self.gate == "calibrated" and self.head == "lens":
            raise OptionError(f"{where}: head 'lens' is for forced gates (gate: open | closed); calibrated gates use "
                              "the fitted exit heads")
        if self.distill_steps < 1:
            raise OptionError(f"{where}: distill_steps {self.distill_steps}; expected ≥ 1")
        if self.hidden_units < 0:
            raise OptionError(f"{where}: hidden_units {self.hidden_units}; expected ≥ 0 (0: logistic gate)")


class EarlyExitPass(Pass):
    name = "early-exit"
    description = "Early-exit cascade at decode: exit heads, calibrated gates, skipped layers' K/V filled (CALM)"
    Options = EarlyExitOptions
    # It cuts the final graph into the pieces the backend lowers: every rewrite runs before it.
    after = ("canonicalize", "fold-into-weights", "fuse-sibling-linears", "quantize-linear", "sparsify-linear",
             "lowrank-split", "moe-prune", "moe-skip", "fuse-moe")
    # The fusions (the Triton lowering's own passes) hide the layer structure it reads: they run on its pieces.
    before = ("fuse-linear-epilogue", "fuse-pointwise")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        o = self.options
        stats: dict[str, Any] = {}
        decisions: list[dict[str, Any]] = []
        dg = find_decoder(gm)
        if isinstance(dg, str):
            return _leave(stats, decisions, dg)
        exits = list(range(1, dg.num_layers)) if o.exit_layers == "auto" else sorted(set(o.exit_layers))
        for e in exits:
            try:
                check_exit_layer(e, dg.num_layers)
            except OptionError as err:
                raise OptionError(f"pass 'early-exit': {err}") from None
        seq = dg.states[0].meta["val"].shape[1]
        decode = isinstance(seq, int) and seq == 1
        head_nodes = closure([dg.logits], {dg.states[-1]})
        plan: CascadePlan | None | str = None
        if o.gate == "calibrated" or o.head != "lens":
            plan = self._plan(gm, ctx, dg, exits, head_nodes, stats, decisions)
        if not decode:
            why = ("; the plan is cached for the decode graph" if isinstance(plan, CascadePlan)
                   else f"; no plan: {plan}" if isinstance(plan, str) else "")
            return _leave(stats, decisions, f"not a decode step (sequence length {seq}): prefill and longer runs go "
                                            f"through the full graph{why}")
        if dg.cannot_split:
            return _leave(stats, decisions, dg.cannot_split)
        if isinstance(plan, str):
            return _leave(stats, decisions, plan)
        if plan is not None and plan.declined:
            return _leave(stats, decisions, plan.declined)
        parts = self._exit_parts(plan, exits, dg, gm)
        try:
            branches = split_cascade(gm, dg, parts, ctx.fake_mode)
        except UnsupportedGraph as e:
            return _leave(stats, decisions, str(e))
        branches.plan = plan
        gm.meta[META_KEY] = branches
        stats["exits"] = branches.exits
        stats["pieces"] = len(branches.pieces())
        stats["gate"] = o.gate
        decisions.append({"early-exit": "split", "exits": branches.exits, "gate": o.gate,
                          "pieces": {"segments": len(branches.segments), "skips": len(branches.skips), "rest": 1}})
        return PassResult(True, stats, decisions)

    def _exit_parts(self, plan: CascadePlan | None, exits: list[int], dg: DecoderGraph, gm) -> list[ExitParts]:
        o = self.options
        if o.gate != "calibrated":
            (e,) = exits
            head = None if plan is None else plan.heads[e]
            translation = None if head is None else (head.weight, head.bias)
            fills = {} if plan is None else {i: (m.weight, m.bias) for (x, i), m in plan.fill_maps.items() if x == e}
            return [ExitParts(e, translation, None, o.gate == "open", fills)]
        out = []
        for e in plan.exits:
            fills = {i: (m.weight, m.bias) for (x, i), m in plan.fill_maps.items() if x == e}
            out.append(ExitParts(e, (plan.heads[e].weight, plan.heads[e].bias), plan.gates[e], None, fills,
                                 plan.temperatures.get(e, 1.0)))
        return out

    def _plan(self, gm: torch.fx.GraphModule, ctx: PassContext, dg: DecoderGraph, exits: list[int],
              head_nodes: set[torch.fx.Node], stats: dict[str, Any], decisions: list[dict[str, Any]]
              ) -> CascadePlan | str:
        """The calibrated plan (forced gates: a plan holding only the fitted heads), or why there is none."""
        o = self.options
        if ctx.calibration is None:
            raise OptionError("early-exit: calibration data is needed (options['calibration']); or force a gate "
                              "with head: lens")
        ctx.calibration.require("early-exit (exit heads and gates are fitted on calibration data)")
        weights = list(dict.fromkeys(a for n in gm.graph.nodes if n.op == "call_function"
                                     for a in n.all_input_nodes if a.op == "get_attr"))
        with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
            key = self.cache_key("cascade-plan", tuple(exits), ctx.calibration.fingerprint, ctx.hardware.name)
            feeds = ctx.calibration.feeds()
            if isinstance(feeds, str):
                got = ctx.weights.cached(weights, key)
                if got is None:
                    return (f"no calibrated plan for this model yet and this graph cannot be fed calibration data "
                            f"({feeds}): compile a prefill graph first (generate does), which calibrates it")
                stats["plan"] = "cached (calibrated by an earlier graph)"
            else:
                costs = graph_costs(gm, dg, ctx.cost_model, head_nodes, [_kv_path(gm, dg, i) for i in range(dg.num_layers)])

                def calibrate(_: Any) -> dict[str, Any]:
                    return _calibrate(gm, ctx, dg, exits, head_nodes, costs, o)

                got = ctx.weights.derive(weights, key, calibrate, persist=True)
        plan, info = _load_plan(got)
        stats.update({k: v for k, v in info.items() if k in ("calibration tokens", "held-back tokens")})
        decisions.append({"early-exit": "plan", **info})
        return plan


def _kv_path(gm: torch.fx.GraphModule, dg: DecoderGraph, i: int) -> set[torch.fx.Node]:
    """Layer i's K/V path for pricing the fill: the slice of its cache writes, or (a prefill graph that creates the
    cache returns its tensors instead of writing them) the slice of its k_proj / v_proj linears."""
    if dg.writes[i]:
        return closure(dg.writes[i], {dg.states[i]})
    kv = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default and layer_of(n) == i
          and any(str(p).endswith(("k_proj", "v_proj")) for p, _ in n.meta.get("nn_module_stack", {}).values())]
    return closure(kv, {dg.states[i]})


def _leave(stats: dict[str, Any], decisions: list[dict[str, Any]], reason: str) -> PassResult:
    stats["left as is"] = 1
    decisions.append({"early-exit": "left as is", "reason": reason})
    return PassResult(False, stats, decisions)


class _GraphHead(torch.nn.Module):
    """The graph's final norm + LM head as a module on (..., hidden) states: `DecoderParts.lm_head` for calibration
    (`weight`: the LM head's). The norm is the graph's own nodes (per-row ops only); the head a plain linear, as the
    graph's may be traced for its example's shape (generate's prefill keeps only the last position)."""

    def __init__(self, norm: torch.fx.GraphModule, weight: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (normed,) = self.norm(x)
        return torch.nn.functional.linear(normed, self.weight)


_ROW_OPS = frozenset({aten.pow.Tensor_Scalar, aten.mean.dim, aten.add.Tensor, aten.add.Scalar, aten.rsqrt.default,
                      aten.mul.Tensor, aten.mul.Scalar, aten._to_copy.default, aten.sub.Tensor, aten.div.Tensor,
                      aten.sqrt.default, aten.alias.default, torch.ops.prims.convert_element_type.default})
"""The final norm's ops the calibration head runs on any number of rows (RMSNorm's, LayerNorm-free; a dtype cast
is `prims.convert_element_type` in a graph traced with dynamic shapes)."""


def _head_module(gm: torch.fx.GraphModule, ctx: PassContext, dg: DecoderGraph) -> _GraphHead:
    norm = closure([dg.norm_out], {dg.states[-1]})
    odd = sorted({str(n.target) for n in norm if n.target not in _ROW_OPS}
                 | {str(n.target) for n in norm if n.target == aten.mean.dim and list(n.args[1]) not in ([-1],)})
    if odd:
        raise OptionError(f"early-exit: the final norm has ops {odd} the calibration cannot run per row; supported: "
                          "RMSNorm (Llama, Mistral, Qwen2)")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    b = PieceBuilder(gm, ctx.fake_mode, set())
    b.env[dg.states[-1]] = b.input("hidden", dg.states[-1].meta["val"])
    # Under dynamic shapes Dynamo lifts the norm's eps (a float attribute) as a graph input: bind its value now.
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    lifted = []
    for p in {a for n in norm for a in n.all_input_nodes if a.op == "placeholder" and a is not dg.states[-1]}:
        value = ctx.calibration.scalars.get(placeholders.index(p))
        if value is None:
            raise OptionError(f"early-exit: the final norm reads graph input {p.name}, whose value is not known "
                              "when compiling; supported: RMSNorm with a constant eps")
        b.env[p] = b.constant(value, "norm_input")
        lifted.append(b.env[p].target)
    b.copy(norm, order)
    head = _GraphHead(b.finish([b.env[dg.norm_out]]), ctx.weights.value(dg.head_weight))
    for name in lifted:  # the head module holds its own reference; the graph never reads it
        delattr(gm, name)
    return head


def _calibrate(gm: torch.fx.GraphModule, ctx: PassContext, dg: DecoderGraph, exits: list[int],
               head_nodes: set[torch.fx.Node], costs: Any, o: EarlyExitOptions) -> dict[str, Any]:
    seen = ctx.calibration.hidden_states(gm, dg.states)
    states = [torch.cat([c.detach() for c in seen[n]]) for n in dg.states]
    rows = states[0].shape[0]
    if rows < 2:
        raise OptionError(f"early-exit: calibration gave {rows} sequence(s); gates are fitted on some and their "
                          "thresholds set on the others: give ≥ 2 (calibration_samples)")
    held = max(1, rows // 4)
    fit, back = [s[:-held] for s in states], [s[-held:] for s in states]
    head = _head_module(gm, ctx, dg)
    parts = DecoderParts(None, [None] * dg.num_layers, torch.nn.Identity(), head, None)
    dtype = head.weight.dtype
    if o.gate == "calibrated":
        plan = calibrate_from_states(parts, fit, back, min_agreement=o.min_agreement, candidates=exits,
                                     features=o.features, hidden_units=o.hidden_units, costs=costs,
                                     max_perplexity_increase=o.max_perplexity_increase, head=o.head,
                                     distill_steps=o.distill_steps)
    else:  # forced gate: the exit head and the skipped layers' fill maps, fitted on every row
        plan = CascadePlan(calibrated_heads(parts, states, exits, o.head, steps=o.distill_steps), {}, o.min_agreement, "forced", {}, {}, {}, None,
                           fit_fill_maps(states, exits, dtype=dtype))
    info: dict[str, Any] = {"calibration tokens": int(states[0].shape[0] * states[0].shape[1]),
                            "held-back tokens": int(held * states[0].shape[1]),
                            "exit agreement (held-back, lens vs fitted)": _agreement(parts, fit, back, exits, dtype)}
    return _save_plan(plan, info)


@torch.no_grad()
def _agreement(parts: DecoderParts, fit: list[torch.Tensor], back: list[torch.Tensor], exits: list[int],
               dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Per candidate exit, top-1 agreement with the full model on the held-back rows: logit lens and fitted head
    (fitted on the other rows)."""
    heads = fit_heads_from_states(fit, exits, dtype=dtype)
    full = parts.lm_head(back[-1]).argmax(-1)
    out = {}
    for e in exits:
        lens = ExitHead.identity(e, back[e].shape[-1], heads[e].weight)
        out[str(e)] = {name: round((h.logits(parts, back[e]).argmax(-1) == full).double().mean().item(), 4)
                       for name, h in (("lens", lens), ("fitted", heads[e]))}
    return out


def _save_plan(plan: CascadePlan, info: dict[str, Any]) -> dict[str, Any]:
    """The plan as a persistable dict of tensors and plain values (the disk cache's format)."""
    out: dict[str, Any] = {}
    for e, h in plan.heads.items():
        out[f"head.{e}.weight"], out[f"head.{e}.bias"] = h.weight, h.bias
    for e, g in plan.gates.items():
        for f in ("weight", "mean", "std", "hidden_weight", "hidden_bias"):
            if getattr(g, f) is not None:
                out[f"gate.{e}.{f}"] = getattr(g, f)
        out[f"gate.{e}.scalars"] = torch.tensor([g.bias, g.threshold, float(g.logits)], dtype=torch.float64)
    for (e, i), m in plan.fill_maps.items():
        out[f"fill.{e}.{i}.weight"], out[f"fill.{e}.{i}.bias"] = m.weight, m.bias
    meta = {"heads": sorted(plan.heads), "gates": sorted(plan.gates), "fills": sorted(plan.fill_maps),
            "temperatures": {str(e): t for e, t in plan.temperatures.items()},
            "max_perplexity_increase": plan.max_perplexity_increase, "min_agreement": plan.min_agreement, "features": plan.features, "declined": plan.declined,
            "held_back": plan.held_back, "predicted": plan.predicted,
            "dropped": {str(k): v for k, v in plan.dropped.items()}, **info}
    out["info"] = json.dumps(meta, default=lambda x: {str(k): v for k, v in x.items()} if isinstance(x, dict) else str(x))
    return out


def _load_plan(got: dict[str, Any]) -> tuple[CascadePlan, dict[str, Any]]:
    meta = json.loads(got["info"])
    heads = {e: ExitHead(e, got[f"head.{e}.weight"], got[f"head.{e}.bias"]) for e in meta["heads"]}
    gates = {}
    for e in meta["gates"]:
        bias, threshold, logits = got[f"gate.{e}.scalars"].tolist()
        gates[e] = Gate(e, got[f"gate.{e}.weight"], bias, got[f"gate.{e}.mean"], got[f"gate.{e}.std"], bool(logits),
                        threshold,
                        got.get(f"gate.{e}.hidden_weight"), got.get(f"gate.{e}.hidden_bias"))
    fills = {(e, i): ExitHead(e, got[f"fill.{e}.{i}.weight"], got[f"fill.{e}.{i}.bias"]) for e, i in meta["fills"]}
    plan = CascadePlan(heads, gates, meta["min_agreement"], meta["features"], meta["held_back"], meta["predicted"],
                       meta["dropped"], meta["declined"], fills,
                       temperatures={int(e): t for e, t in meta.get("temperatures", {}).items()},
                       max_perplexity_increase=meta.get("max_perplexity_increase"))
    info = {k: v for k, v in meta.items() if k not in ("heads", "gates", "fills", "temperatures")}
    return plan, info
