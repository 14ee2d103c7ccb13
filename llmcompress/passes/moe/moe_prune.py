"""`moe-prune`: remove the experts that matter least from every softmax top-k MoE block, on calibration data.

Options:
* `keep` (required): experts kept per layer, an int (2 ≤ top-k ≤ keep < E) or a fraction in (0, 1) of each layer's
  E (rounded; the same bounds apply after rounding).
* `method`: `reconstruction` (default) keeps the subset of experts whose block output on the calibration tokens is
  closest to the dense block's (every subset up to 512 of them, else greedy removal: `prune.py`); `routed-weight`
  keeps those with the most routing weight summed over the tokens (the issue's simple rule, for comparison).
* `refit_router` (default true), `refit_steps` (50), `refit_lr` (0.01 of the rows' RMS): Adam steps on the kept
  router rows towards the dense block's output (the best step is kept, so the calibration error never rises).
* `correct_down` (default true), `down_ridge` (0.1): then the kept experts' down projections are refit jointly by
  ridge least squares toward the dense block's output (`prune.correct_down`; the derived weight keeps the name
  `<block>.experts.down_proj`). The later layers' calibration inputs see the refit router, not the refit downs.
  tiny-mixtral, 8 -> 6, 32 windows: +3.69 % without, +2.48 % with (eager experiment, ridge 0.1).
* `sequential` (default true): each layer is pruned on the inputs that reach it after the layers before it were.
* `allocate`: `per-layer` (default) keeps `keep` experts in every layer; `global` keeps `keep` × layers experts in
  all, a layer whose experts are rarely needed giving up more (`prune.allocate_counts`), each layer keeping ≥ top-k.
  On tiny-mixtral `global` is worse (6 of 8 on average: +5.25 % against +3.69 % per layer; 4 of 8: +194 % against
  +29.4 %; 32 windows): the layers' relative output errors are not comparable (layer 0's MoE output is 40× its
  residual input's energy).

* `remove_experts` (default true): slice the removed experts out of the graph (`remove.py`): the router keeps
  its kept rows (the softmax runs over the kept logits: the kept experts renormalised exactly as the −inf mask
  did), the experts' 3-D weights their kept rows, and the block's expert count becomes the kept one, so later
  passes (`fuse-moe`, `quantize-linear`) and the compiled graph hold only the kept experts (with `release_weights`
  the originals' memory is freed). False keeps every expert in the graph and masks the removed ones with a −inf
  router bias (the same model; for comparison). A block whose slice cannot be checked is masked, with the reason.

Each MoE layer's decision has `experts_kept` (original ids), the reconstruction error, `bytes` (the router's and
experts' weights in the graph before and after) and the layer's load statistics (tokens and mean routing weight per
original expert, dense model, calibration data; cached with the result, so a compile served from the disk cache
reports them too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.calibration.moe_load import ExpertLoad, expert_load
from llmcompress.errors import OptionError
from llmcompress.fx_utils import call, finish_rewrite
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.moe.blocks import MoEBlock, find_blocks
from llmcompress.passes.moe.prune import allocate_counts, choose_experts, correct_down, error_curve, refit_router
from llmcompress.passes.moe.remove import remove_experts
from llmcompress.passes.moe.routing import combine, expert_outputs, route

aten = torch.ops.aten
METHODS = ("reconstruction", "routed-weight")


@dataclasses.dataclass(frozen=True)
class MoEPruneOptions:
    keep: int | float | None = None
    """Experts kept per MoE layer: an int, or a fraction of each layer's experts in (0, 1)."""
    method: Literal["reconstruction", "routed-weight"] = "reconstruction"
    refit_router: bool = True
    refit_steps: int = 50
    refit_lr: float = 0.01
    correct_down: bool = True
    """Refit the kept experts' down projections toward the dense block's output (ridge least squares,
    `prune.correct_down`), after the router refit."""
    down_ridge: float = 0.1
    sequential: bool = True
    allocate: Literal["per-layer", "global"] = "per-layer"
    """`per-layer`: every layer keeps `keep`; `global`: the layers keep `keep` on average (the same experts in all),
    spread by each layer's reconstruction-error curve on the dense model's calibration activations."""
    remove_experts: bool = True
    """Slice the removed experts out of the graph (router rows, 3-D expert weights); false masks them with a −inf
    router bias and keeps every expert's weights in the graph (the same model)."""
    version: ClassVar[int] = 3

    def __post_init__(self) -> None:
        where = "pass 'moe-prune'"
        if self.keep is None:
            raise OptionError(f"{where}: give option 'keep', the experts kept per layer (an int ≥ top-k and < the "
                              "number of experts, or a fraction in (0, 1))")
        if isinstance(self.keep, float) and not 0 < self.keep < 1:
            raise OptionError(f"{where}: keep {self.keep} as a fraction must be in (0, 1); give an int for a count")
        if isinstance(self.keep, int) and self.keep < 1:
            raise OptionError(f"{where}: keep must be ≥ 1 (and ≥ top-k), got {self.keep}")
        if not self.down_ridge > 0:
            raise OptionError(f"{where}: down_ridge must be > 0 (the pull toward the original down projections, "
                              f"relative to the Gram matrix's mean diagonal), got {self.down_ridge}")
        if not isinstance(self.remove_experts, bool):
            raise OptionError(f"{where}: remove_experts must be true or false, got {self.remove_experts!r}")
        if self.refit_steps < 0 or self.refit_lr <= 0:
            raise OptionError(f"{where}: refit_steps must be ≥ 0 and refit_lr > 0 (got {self.refit_steps}, "
                              f"{self.refit_lr})")


def kept_count(keep: float, block: MoEBlock) -> int:
    """The experts `keep` leaves in `block`; raises `OptionError` outside top-k ≤ kept < E."""
    n = keep if isinstance(keep, int) else round(keep * block.num_experts)
    if n >= block.num_experts:
        raise OptionError(f"moe-prune: keep={keep} leaves {n} of {block.name}'s {block.num_experts} experts; keep "
                          f"must be < {block.num_experts} (fewer than all)")
    if n < block.k:
        raise OptionError(f"moe-prune: keep={keep} leaves {n} experts in {block.name}, fewer than its top-{block.k}; "
                          f"keep must be in [{block.k}, {block.num_experts - 1}]")
    return n


class MoEPrunePass(Pass):
    name = "moe-prune"
    description = "Remove the least useful experts of each MoE layer (calibrated: output reconstruction, router refit)"
    Options = MoEPruneOptions
    after = ("canonicalize",)
    before = ("quantize-linear", "fuse-sibling-linears", "fold-into-weights")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, Any] = {}
        decisions: list[dict[str, Any]] = []
        blocks = find_blocks(gm, ctx.weights)
        for b in blocks:
            if b.why is not None:
                why = b.why
                if why.startswith("no 3-D experts"):
                    why += ("; transformers' `eager` experts loop breaks the graph there, so its experts never reach "
                            "a graph: model.set_experts_implementation('grouped_mm') (or 'batched_mm') keeps the block "
                            "whole")
                decisions.append({"node": b.router.name, "layer": b.name, "experts_kept": "all", "left as is": why})
                stats["left as is"] = stats.get("left as is", 0) + 1
        for b in blocks:
            if b.why is None and b.k >= b.num_experts:
                decisions.append({"node": b.router.name, "layer": b.name, "experts_kept": "all",
                                  "left as is": f"top-{b.k} of {b.num_experts} experts: every token uses every one"})
                stats["left as is"] = stats.get("left as is", 0) + 1
        usable = [b for b in blocks if b.why is None and b.k < b.num_experts]
        if not usable:
            return PassResult(False, stats, decisions)
        counts = {b.router: kept_count(self.options.keep, b) for b in usable}
        if ctx.calibration is None or not ctx.calibration.available:
            raise OptionError("moe-prune: needs calibration data (options['calibration']) to choose the experts")
        with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
            results, loads, counts = self._calibrate(gm, ctx, usable, counts)
            plain = {n: (r["kept"].tolist(), r["error"].tolist()) for n, r in results.items() if r is not None}
            load_dicts = {n: load.as_dict() for n, load in loads.items()}
        o = self.options
        for b in usable:
            if counts[b.router] == b.num_experts:
                decisions.append({"node": b.router.name, "layer": b.name, "experts_kept": list(range(b.num_experts)),
                                  "experts_removed": [], "num_experts": b.num_experts, "top_k": b.k,
                                  "why": "global allocation kept every expert", "load": load_dicts.get(b.router)})
                continue
            kept, errors = plain[b.router]
            decision = {"layer": b.name, "experts_kept": kept,
                        "experts_removed": [e for e in range(b.num_experts) if e not in kept],
                        "num_experts": b.num_experts, "top_k": b.k, "method": o.method,
                        "reconstruction_error": round(errors[0], 6)}
            decision.update(self._rewrite(gm, ctx, b, results[b.router], kept))
            if o.refit_router:
                decision["reconstruction_error_refit"] = round(errors[1], 6)
            if o.correct_down:
                decision["reconstruction_error_down"] = round(errors[2], 6) if "down" in results[b.router] else \
                    "not corrected: the kept experts have more than 8192 features for the least squares"
            if b.router in load_dicts:
                decision["load"] = load_dicts[b.router]
            decisions.append(decision)
            stats["pruned layers"] = stats.get("pruned layers", 0) + 1
            stats["experts removed"] = stats.get("experts removed", 0) + b.num_experts - len(kept)
            removed = decision["bytes"]["before"] - decision["bytes"]["after"]
            stats["bytes removed"] = stats.get("bytes removed", 0) + removed
            if removed == 0:
                stats["masked, not sliced"] = stats.get("masked, not sliced", 0) + 1
        if not stats.get("pruned layers"):
            return PassResult(False, stats, decisions)
        finish_rewrite(gm)
        return PassResult(True, stats, decisions)

    def _rewrite(self, gm: torch.fx.GraphModule, ctx: PassContext, b: MoEBlock, r: dict[str, torch.Tensor],
                 kept: list[int]) -> dict[str, Any]:
        """Slice block `b` down to `kept` (`remove.py`), or mask the others with a −inf router bias; the
        decision's `node`, `how` and `bytes` (router and experts in the graph, before → after)."""
        bias_node = _bias(b)
        with unset_fake_temporarily():
            originals = {"weight": ctx.weights.value(b.router.args[1]), "gate_up": ctx.weights.value(b.gate_up),
                         "down": ctx.weights.value(b.down),
                         "bias": None if bias_node is None else ctx.weights.value(bias_node)}
            masked = _masked(originals, r, kept)
        before = _nbytes(originals.values())
        why = "remove_experts: false"
        if self.options.remove_experts:
            def rows(node: torch.fx.Node | None) -> torch.Tensor | None:  # cached: prefill and decode share them
                key = self.cache_key("kept rows", tuple(kept))
                return None if node is None else ctx.weights.derive(node, key, lambda v: v[kept].clone())

            sliced = {"weight": r["weight"], "bias": rows(bias_node), "gate_up": rows(b.gate_up),
                      "down": r["down"] if "down" in r else rows(b.down)}
            why = remove_experts(gm, ctx, b, kept, sliced, masked)
            if why is None:
                return {"node": b.router.name, "bytes": {"before": before, "after": _nbytes(sliced.values())},
                        "how": f"router rows and experts sliced to the {len(kept)} kept (positions in "
                               f"experts_kept order)"}
        with gm.graph.inserting_before(b.router):
            w = ctx.weights.add(gm, masked["weight"], f"{b.name}.gate.weight_pruned")
            bias = ctx.weights.add(gm, masked["bias"], f"{b.name}.gate.bias_pruned")
            new = call(gm.graph, ctx.fake_mode, aten.linear.default, (b.router.args[0], w, bias))
        new.meta.update({k: v for k, v in b.router.meta.items() if k in ("nn_module_stack", "stack_trace")})
        b.router.replace_all_uses_with(new)
        gm.graph.erase_node(b.router)
        if "down" in r:  # the same name, so later passes (fuse-moe) find the block's experts beside the router
            with gm.graph.inserting_before(b.down):
                down = ctx.weights.add(gm, masked["down"], f"{b.name}.experts.down_proj")
            b.down.replace_all_uses_with(down)
            gm.graph.erase_node(b.down)
        return {"node": new.name, "bytes": {"before": before, "after": before},
                "how": f"removed experts' router logits masked with -inf (bias), expert weights not sliced: {why}"}

    def _calibrate(self, gm: torch.fx.GraphModule, ctx: PassContext, blocks: list[MoEBlock],
                   counts: dict[torch.fx.Node, int]
                   ) -> tuple[dict[torch.fx.Node, dict], dict[torch.fx.Node, ExpertLoad], dict[torch.fx.Node, int]]:
        """(pruned router per block, load statistics per block, experts kept per block)."""
        o = self.options
        cal = ctx.calibration
        fingerprint = cal.fingerprint
        by_router = {b.router: b for b in blocks}

        def nodes(b: MoEBlock) -> list[torch.fx.Node]:
            return [b.router.args[1], b.gate_up, b.down] + ([b.router.args[2]] if _bias(b) is not None else [])

        def keys() -> dict[torch.fx.Node, Any]:
            return {b.router: self.cache_key(b.name, counts[b.router], b.k, b.renormalize, fingerprint)
                    for b in blocks}

        routers = [b.router.args[1] for b in blocks]
        alloc_key = self.cache_key("allocation", tuple(b.name for b in blocks), sum(counts.values()), fingerprint)
        allocated = ctx.weights.cached(routers, alloc_key) if o.allocate == "global" else None
        if allocated is not None:
            counts = {b.router: int(c) for b, c in zip(blocks, allocated)}

        def pruned() -> list[MoEBlock]:
            return [b for b in blocks if counts[b.router] < b.num_experts]

        key_of = keys()
        results = {b.router: ctx.weights.cached(nodes(b), key_of[b.router]) for b in pruned()}
        # The load statistics are cached beside the results (and persisted), so a compile that finds the results in
        # memory or on disk still reports them.
        load_key = {b.router: self.cache_key("load", b.name, b.num_experts, fingerprint) for b in blocks}
        loads = {b.router: _as_load(ctx.weights.cached(nodes(b), load_key[b.router])) for b in blocks}
        need_allocation = o.allocate == "global" and allocated is None
        if (all(r is not None for r in results.values()) and all(v is not None for v in loads.values())
                and not need_allocation):
            return results, loads, counts  # computed by an earlier graph (generate's decode after its prefill)
        feeds = cal.feeds()
        if isinstance(feeds, str):
            raise OptionError(f"moe-prune: calibration cannot feed this graph: {feeds}")
        inputs = [b.router.args[0] for b in blocks] if need_allocation else []
        if inputs or any(v is None for v in loads.values()):
            seen = cal.hidden_states(gm, [n for b in blocks for n in (b.indices, b.weights)] + inputs)
            for b in blocks:
                load = expert_load(seen[b.indices], seen[b.weights], b.num_experts)
                loads[b.router] = _as_load(ctx.weights.derive(nodes(b), load_key[b.router],
                                                              lambda _, load=load: _load_dict(load), persist=True))
        if inputs:
            curves = []
            for b in blocks:
                x = torch.cat([v.reshape(-1, v.shape[-1]) for v in seen[b.router.args[0]]])
                values = [ctx.weights.value(n) for n in nodes(b)]
                y = expert_outputs(x, values[1], values[2])
                logits = F.linear(x.float(), values[0].float(), None if len(values) < 4 else values[3].float())
                curves.append(error_curve(y, logits, b.k, b.renormalize, range(b.k, b.num_experts), o.method,
                                          loads[b.router].weight_sum))
            chosen = allocate_counts(curves, sum(counts.values()))
            ctx.weights.derive(routers, alloc_key, lambda _: torch.tensor(chosen, dtype=torch.int64), persist=True)
            counts = {b.router: c for b, c in zip(blocks, chosen)}
            key_of = keys()
            results = {b.router: ctx.weights.cached(nodes(b), key_of[b.router]) for b in pruned()}
        if all(r is not None for r in results.values()):
            return results, loads, counts

        def on_target(inputs: Any) -> Any:
            b = by_router[inputs.node]
            x = torch.cat(inputs.rows())

            def compute(values: list[torch.Tensor], b: MoEBlock = b, x: torch.Tensor = x) -> dict[str, torch.Tensor]:
                return _prune_layer(values, x, b, counts[b.router], loads[b.router], o)

            r = ctx.weights.derive(nodes(b), key_of[b.router], compute, persist=True)
            results[b.router] = r
            if not o.sequential:
                return None
            kept = r["kept"].tolist()

            def masked_router(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                              r: dict = r, kept: list[int] = kept) -> torch.Tensor:
                m = _masked({"weight": w, "bias": bias, "down": None}, r, kept)
                return F.linear(x, m["weight"].to(x.dtype), m["bias"].to(x.dtype))

            return masked_router

        cal.run_sequential(gm, [b.router for b in pruned()], on_target)
        return results, loads, counts


def _bias(b: MoEBlock) -> Any:
    return b.router.args[2] if len(b.router.args) > 2 else None


def _as_load(d: dict[str, torch.Tensor] | None) -> ExpertLoad | None:
    return None if d is None else ExpertLoad(d["tokens"].cpu(), d["weight_sum"].cpu(), int(d["total"]))


def _load_dict(load: ExpertLoad) -> dict[str, torch.Tensor]:
    """What the cache keeps of a layer's load: tensors only, so it persists."""
    return {"tokens": load.tokens, "weight_sum": load.weight_sum, "total": torch.tensor(load.total_tokens)}


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _masked(originals: dict[str, torch.Tensor | None], r: dict[str, torch.Tensor], kept: list[int]
            ) -> dict[str, torch.Tensor | None]:
    """The full-size tensors that mask the removed experts instead of slicing them: the router weight with the kept
    rows refit, its bias 0 on the kept rows and −inf on the others (plus its own bias), and the down projections
    with the kept experts' refit rows (the originals where not refit, None where not given)."""
    weight = originals["weight"].detach().clone()
    weight[kept] = r["weight"].to(weight.dtype)
    mask = torch.full((weight.shape[0],), float("-inf"), dtype=weight.dtype, device=weight.device)
    mask[kept] = 0
    bias = mask if originals["bias"] is None else originals["bias"].detach().clone() + mask
    down = originals["down"]
    if down is not None and "down" in r:
        down = down.detach().clone()
        down[kept] = r["down"].to(down.dtype)
    return {"weight": weight, "bias": bias, "down": down}


def _prune_layer(values: list[torch.Tensor], x: torch.Tensor, b: MoEBlock, keep: int, load: ExpertLoad,
                 o: MoEPruneOptions) -> dict[str, torch.Tensor]:
    """One layer pruned, the kept experts' rows only (in increasing original id): {weight (keep, H) router rows
    (refit), kept (keep,) original ids, error (3,) reconstruction error chosen / router refit / downs refit, and
    down (keep, H, I) where the down projections were refit}."""
    weight, gate_up, down = values[:3]
    bias = values[3] if len(values) > 3 else None
    y = expert_outputs(x, gate_up, down)
    logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    kept, error = choose_experts(y, logits, b.k, b.renormalize, keep, o.method, load.weight_sum)
    new_weight, refit_error = weight.detach().clone(), error
    if o.refit_router and o.refit_steps:
        new_weight, _, refit_error = refit_router(x, weight, bias, y, kept, b.k, b.renormalize, o.refit_steps,
                                                  o.refit_lr)
    out = {"weight": new_weight[kept].clone(), "kept": torch.tensor(kept, dtype=torch.int64)}
    down_error = refit_error
    if o.correct_down:
        allowed = torch.zeros(b.num_experts, dtype=torch.bool)
        allowed[kept] = True
        pruned_logits = F.linear(x.float(), new_weight.float(), None if bias is None else bias.float())
        w, i = route(logits, b.k, b.renormalize)
        target = combine(y, w, i)
        masked_logits = pruned_logits.masked_fill(~allowed, float("-inf"))
        new_down = correct_down(x, gate_up, down, masked_logits, kept, b.k, b.renormalize, target, o.down_ridge)
        if new_down is not None:
            out["down"] = new_down[kept].clone()
            y_new = y.clone()
            y_new[:, kept] = expert_outputs(x, gate_up[kept], new_down[kept])
            wp, ip = route(pruned_logits, b.k, b.renormalize, allowed)
            down_error = float(((combine(y_new, wp, ip) - target) ** 2).sum() / (target**2).sum().clamp_min(1e-30))
    out["error"] = torch.tensor([error, refit_error, down_error], dtype=torch.float64)
    return out
