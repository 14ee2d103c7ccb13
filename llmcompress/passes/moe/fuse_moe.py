"""`fuse-moe`: a transformers MoE block's routing and experts rewritten into `llmcompress::moe_route` and
`llmcompress::moe_experts`, whatever experts implementation traced it (eager loop, `batched_mm`, `grouped_mm`).

Blocks come from `blocks.find_blocks` (a softmax top-k router on a frozen (E, H) weight, and frozen 3-D experts
`<block>.experts.gate_up_proj` (E, 2I, H) / `down_proj` (E, H, I) beside it). The experts' output is the node every
path from the expert weights to the rest of the graph goes through (`region.experts_output`: the post-dominator of
the two weights), so a shared expert added after it (Qwen2-MoE) stays as it is. Every rewrite is checked before it
is kept: the block's original subgraph and the two ops run on random hidden states at the compile's sizes
(`region.run_nodes`), and the expert ids and outputs must agree (`_verify`); a block that does not, or whose
subgraph reads anything but the hidden states and constants, is left as it is with the reason in the report — never
rewritten wrongly.

Where it pays: `kernels/moe_path.choose_moe_path` gives the op's GEMV/GEMM switch and block size; with `objective:
speed` (default) the cost model must price the two ops no slower than the nodes they replace at the compile's sizes
(on a CPU both sides run torch's matmuls in a host loop over the hit experts). `objective: always` fuses every block
it can (CUDA graphs need it: the unfused grouped matmuls sync the host).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, ClassVar, Literal

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.errors import OptionError
from llmcompress.fx_utils import call, finish_rewrite, grouped_matmul_ops
from llmcompress.kernels import moe_experts as _experts_op  # noqa: F401  (registers llmcompress::moe_experts)
from llmcompress.kernels import moe_route as _route_op  # noqa: F401  (registers llmcompress::moe_route)
from llmcompress.kernels.linear_common import SUPPORTED_DTYPES
from llmcompress.kernels.moe_experts import KEPT_SLOTS_META
from llmcompress.kernels.moe_load_counters import drop_counter, new_counter, zero_counter
from llmcompress.kernels.moe_path import choose_moe_path
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.moe.blocks import MoEBlock, find_blocks
from llmcompress.passes.moe.region import VERIFY_RTOL, Region, block_region, concrete_size, experts_output, run_nodes
from llmcompress.passes.moe.skip_option import SkipChoice, apply_skip_fallback, skip_choices

ops = torch.ops.llmcompress
FUSE_META = "llmcompress.moe"
# On a CPU both sides are host loops over the experts, which one roofline launch per op does not price. Counted from
# the code: `moe_experts`' CPU path runs 7 torch ops per expert that received tokens (gather x, gate-up mm, SiLU,
# mul, down mm, weight mul, index_put) and `moe_route`'s about 10 (softmax, top-k, renormalise, the host-built
# layout); transformers' `grouped_mm_fallback` runs 2 per such expert (a slice and a mm) in each grouped matmul.
# Measured on tiny-mixtral before this was priced: fused 1.25x slower at decode, 1.18x at 128 tokens
# (benchmarks/moe_cpu.py).
_CPU_OPS_PER_HIT_EXPERT = {"fused": 7, "grouped_mm": 2}
_CPU_ROUTE_OPS = 10


@dataclasses.dataclass(frozen=True)
class FuseMoeOptions:
    objective: Literal["speed", "always"] = "speed"
    """`speed`: fuse a block where the cost model prices the two ops no slower than what they replace at the
    compile's sizes; `always`: every block the pass can rewrite (e.g. for CUDA graphs)."""
    verify: bool = True
    """Run each rewritten block beside the original on random hidden states and keep the rewrite only if they
    agree (expert ids equal, outputs within rounding). Off only to save compile time on blocks already checked."""
    skip_beta: float | None = None
    """Dynamic expert skipping, one β in [0, 1) for every MoE layer: a token's slot whose routing weight < β × its
    top weight is dropped inside `moe_route` (`moe_experts` reads nothing for it)."""
    skip_budget: float | None = None
    """Dynamic expert skipping with a β per layer calibrated on calibration data so that the calibration
    perplexity rises by at most this fraction (0.01: +1 %; `skip_calibration.py`)."""
    skip_compensate: bool = True
    """With skipping: a skipped slot adds its routing weight × its expert's mean output on the calibration tokens
    it would be skipped on (`skip_compensation.py`; needs calibration data), instead of nothing. On tiny-mixtral
    (32 validation windows) skip_budget 0.02 skips 20.3 % at +1.05 % with it, 19.7 % at +1.40 % without
    (benchmarks/results/moe_quality.json)."""
    load_counters: bool = False
    """Count, on the device and without host syncs, the tokens routed to each expert of each fused block and their
    routing weights (`kernels/moe_load_counters.py`); read with `llmcompress.moe_load_counters(model)`."""
    version: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if self.skip_beta is not None and not (isinstance(self.skip_beta, (int, float))
                                               and 0.0 <= self.skip_beta < 1.0):
            raise OptionError(f"pass 'fuse-moe': skip_beta must be in [0, 1) (a slot is skipped when its weight < "
                              f"skip_beta × the token's top weight), got {self.skip_beta!r}")
        if self.skip_budget is not None and not (isinstance(self.skip_budget, (int, float)) and self.skip_budget > 0):
            raise OptionError(f"pass 'fuse-moe': skip_budget must be > 0 (the relative calibration perplexity "
                              f"increase allowed, 0.01 = +1 %), got {self.skip_budget!r}")
        if self.skip_beta is not None and self.skip_budget is not None:
            raise OptionError("pass 'fuse-moe': give skip_beta (one β for every layer) or skip_budget (a β per layer "
                              "calibrated to it), not both")
        if self.objective not in ("speed", "always"):
            raise OptionError(f"pass 'fuse-moe': key 'objective' got {self.objective!r}; expected 'speed' or 'always'")
        if not isinstance(self.verify, bool):
            raise OptionError(f"pass 'fuse-moe': key 'verify' got {self.verify!r}; expected true or false")
        if not isinstance(self.skip_compensate, bool):
            raise OptionError(f"pass 'fuse-moe': key 'skip_compensate' got {self.skip_compensate!r}; expected true or "
                              "false")
        if not isinstance(self.load_counters, bool):
            raise OptionError(f"pass 'fuse-moe': key 'load_counters' got {self.load_counters!r}; expected true or "
                              "false")


class FuseMoePass(Pass):
    name = "fuse-moe"
    description = "Rewrite MoE blocks (softmax top-k router + SiLU experts) into one routing op and one experts op"
    Options = FuseMoeOptions
    # Before the sibling fusion (it would merge the router with the linears beside it, e.g. Qwen2-MoE's shared
    # expert) and the epilogue / pointwise fusions.
    after = ("canonicalize", "moe-prune", "moe-skip", "fold-into-weights", "sparsify-linear", "lowrank-split")
    before = ("fuse-sibling-linears", "quantize-linear", "fuse-linear-epilogue", "fuse-pointwise")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, Any] = {}
        decisions: list[dict[str, Any]] = []
        changed = False
        blocks = find_blocks(gm, ctx.weights)
        o = self.options
        outputs = {b.router: experts_output(b) for b in blocks if b.why is None}
        skips = skip_choices(gm, ctx, blocks, o.skip_beta, o.skip_budget, o.skip_compensate, outputs, stats,
                             self.cache_key)
        for block in blocks:
            skip = skips.get(block.router)
            decision, output = self._fuse(gm, ctx, block, skip)
            if skip is not None:
                decision["skip"] = apply_skip_fallback(gm, ctx, block, skip, decision["fused"],
                                                       output or outputs.get(block.router))
                changed |= not decision["fused"] and skip.beta > 0
            decisions.append({"node": block.router.name, "layer": block.name, "moe": decision})
            key = "fused" if decision["fused"] else f"left: {decision['why']}"
            stats[key] = stats.get(key, 0) + 1
            changed |= decision["fused"]
        if changed:
            finish_rewrite(gm)
        return PassResult(changed, stats, decisions)

    def _fuse(self, gm: torch.fx.GraphModule, ctx: PassContext, block: MoEBlock, skip: SkipChoice | None = None
              ) -> tuple[dict[str, Any], torch.fx.Node | None]:
        """(the block's decision, the fused experts node or None where the block is left as it is)."""
        info = self._fuse_block(gm, ctx, block, skip)
        return info, info.pop("_node", None)

    def _fuse_block(self, gm: torch.fx.GraphModule, ctx: PassContext, block: MoEBlock, skip: SkipChoice | None
                    ) -> dict[str, Any]:
        skip_beta = skip.beta if skip is not None else 0.0
        info: dict[str, Any] = {"fused": False, "experts": block.num_experts, "top_k": block.k,
                                "norm_topk_prob": block.renormalize}
        if block.originals:  # sliced by moe-prune: position -> original expert id
            info["expert_ids"] = block.expert_ids
        if block.why is not None:
            why = block.why
            if why.startswith("no 3-D experts"):
                why += ("; if the model runs transformers' `eager` experts loop, its graph breaks there and the experts "
                        "never reach this graph: model.set_experts_implementation('grouped_mm') keeps the block whole")
            return {**info, "why": why}
        out = experts_output(block)
        if out is None:
            return {**info, "why": "no single node carries the experts' output (unknown block shape)"}
        x = block.router.args[0]
        x_val, out_val = x.meta["val"], out.meta["val"]
        if x_val.dim() != 2 or not isinstance(out_val, torch.Tensor) or tuple(out_val.shape) != tuple(x_val.shape):
            return {**info, "why": f"the experts' output {tuple(getattr(out_val, 'shape', ()))} is not the router "
                                   f"input's (T, H) {tuple(x_val.shape)} (unknown block shape)"}
        gate_up, down = block.gate_up.meta["val"], block.down.meta["val"]
        dtype = x_val.dtype
        if dtype not in SUPPORTED_DTYPES or gate_up.dtype != dtype or down.dtype != dtype:
            return {**info, "why": f"activations {dtype}, experts {gate_up.dtype}: moe_experts takes float16 / "
                                   "bfloat16 / float32 experts in the activations' dtype (quantize-linear after "
                                   "fuse-moe makes them int8 / int4)"}
        e, i2, h = gate_up.shape
        triton = getattr(ctx.config, "lowering", None) == "triton"
        device = "cuda" if gate_up.device.type == "cuda" or triton else "cpu"
        path = choose_moe_path(ctx.cost_model, int(h), int(i2) // 2, int(e), block.k, dtype, device)
        tokens = concrete_size(x_val.shape[0], ctx)
        info.update(device=device, tokens=tokens, block_m=path.block_m, gemv_max_tokens=path.gemv_max_tokens,
                    path=path.path_at(max(tokens or 1, 1)), priced=path.priced)
        region = block_region(block, out)
        if region is None:
            return {**info, "why": "the block reads graph inputs other than its hidden states (unknown block shape)"}
        with gm.graph.inserting_before(out):
            route = call(gm.graph, ctx.fake_mode, ops.moe_route.default,
                         (block.router, block.k, "softmax", block.renormalize, path.block_m), {})
            parts = []
            for idx in range(5):
                item = gm.graph.call_function(operator.getitem, (route, idx))
                item.meta["val"] = route.meta["val"][idx]
                parts.append(item)
            counted = self._count(gm, ctx, block, parts)
            fused = call(gm.graph, ctx.fake_mode, ops.moe_experts.default,
                         (x, block.gate_up, block.down, *parts[:1], counted or parts[1], *parts[2:], path.block_m,
                          path.gemv_max_tokens), {})
        if skip_beta > 0 and skip.skipped is not None:  # priced on the experts still evaluated
            fused.meta[KEPT_SLOTS_META] = block.k * (1 - skip.skipped)
        new_nodes = [route, *parts, *([counted] if counted else []), fused]
        for n in new_nodes:
            for key in ("stack_trace", "nn_module_stack"):
                if key in out.meta:
                    n.meta[key] = out.meta[key]
            n.meta[FUSE_META] = block.name

        def undo(why: str, **extra: Any) -> dict[str, Any]:
            if counted is not None:
                drop_counter(counted.args[2])
            for n in reversed(new_nodes):
                gm.graph.erase_node(n)
            return {**info, "why": why, **extra}

        if ctx.cost_model is not None:
            try:
                lowering = getattr(ctx.config, "lowering", "inductor")
                before = float(ctx.cost_model.lowered_cost(region.nodes, lowering, ctx.sizes).total("time_s"))
                after = float(ctx.cost_model.lowered_cost([route, fused], lowering, ctx.sizes).total("time_s"))
                if device == "cpu" and tokens is not None:
                    hit = int(e) * (1 - (1 - block.k / int(e)) ** tokens)
                    grouped = sum(n.target in grouped_matmul_ops() for n in region.nodes)
                    loop = ctx.cost_model.kernel_time  # zero-work ops: their launches only
                    before += loop(0.0, 0.0, dtype, launches=round(grouped * _CPU_OPS_PER_HIT_EXPERT["grouped_mm"]
                                                                   * hit))
                    after += loop(0.0, 0.0, dtype, launches=round(_CPU_OPS_PER_HIT_EXPERT["fused"] * hit
                                                                  + _CPU_ROUTE_OPS))
            except Exception as err:  # noqa: BLE001 - a pricing gap must not fail the rewrite
                before = after = None
                info["predicted"] = {"error": f"{type(err).__name__}: {err}"}
            else:
                info["predicted"] = {"unfused_s": before, "fused_s": after}
            if self.options.objective == "speed" and before is not None and after > before:
                return undo(f"cost model: the fused ops ({after:.3g} s) are slower than the block as traced "
                            f"({before:.3g} s) at {tokens} tokens on {device} (objective: always fuses anyway)")
        if self.options.verify:
            problem = _verify(ctx, block, out, x, region, tokens, parts[1], fused)
            if problem is not None:
                return undo(f"verification failed: {problem} (left as it is)")
        if skip_beta > 0:  # after `_verify`, which checks the exact routing
            route.args = (*route.args, skip_beta)
        if counted is not None:
            with unset_fake_temporarily():
                zero_counter(counted.args[2])  # the verification's random tokens counted
            info["load_counter"] = counted.args[2]
        out.replace_all_uses_with(fused)
        info.update(fused=True, kernel=f"moe_route + moe_experts ({info['path']} at {tokens} tokens)", _node=fused)
        return info

    def _count(self, gm: torch.fx.GraphModule, ctx: PassContext, block: MoEBlock, parts: list[torch.fx.Node]
               ) -> torch.fx.Node | None:
        """With `load_counters`, the `moe_count_load` node between the routing and the experts (its copy of the
        ids feeds `moe_experts`), on a counter allocated now on the experts' device; else None."""
        if not self.options.load_counters:
            return None
        with unset_fake_temporarily():  # real buffers: the pass runs in AOT's fake mode
            weights = [ctx.weights.value(block.router.args[1]), ctx.weights.value(block.gate_up)]
            # A block moe-prune sliced holds copies: the module's own weights find the model.
            weights += [ctx.weights.by_attr[a].tensor for a in block.originals if a in ctx.weights.by_attr]
            key = new_counter(block.name, block.num_experts, weights[1].device, weights, block.expert_ids)
        return call(gm.graph, ctx.fake_mode, ops.moe_count_load.default, (parts[0], parts[1], key), {})


def _verify(ctx: PassContext, block: MoEBlock, out: torch.fx.Node, x: torch.fx.Node, region: Region,
            tokens: int | None, new_ids: torch.fx.Node, fused: torch.fx.Node) -> str | None:
    """Run the original region and the inserted nodes (the two ops, with the very arguments they got) on random
    hidden states; None when they agree, else what differs.

    The hidden states are drawn at the router input's scale (unit RMS after the block's RMSNorm) with a fixed
    seed; ids must be equal wherever the original's top-k is not a near tie, outputs within the dtype's rounding."""
    if tokens is None:
        return "token count unknown at compile time"
    val, src = x.meta["val"], region.source.meta["val"]
    shape = [concrete_size(d, ctx) for d in src.shape]
    if None in shape:
        return "the hidden states' shape is unknown at compile time"
    with unset_fake_temporarily():
        gen = torch.Generator().manual_seed(0)
        xs = torch.randn(shape, generator=gen).to(src.dtype)
        env: dict[torch.fx.Node, Any] = {region.source: xs.to(ctx.weights.value(block.gate_up).device)}
        try:  # the inserted ops last: `run_nodes` evaluates their arguments (routing, counter) on demand
            run_nodes(ctx, [*region.to_router, block.router, *region.nodes, fused, new_ids], env)
            expected = env[out]
            logits = env[block.router]
            got, ids = env[fused], env[new_ids]
        except Exception as err:  # noqa: BLE001 - a block we cannot run is a block we do not rewrite
            return f"could not run the block ({type(err).__name__}: {err})"
        if block.indices is not None and block.indices in env:
            model_ids = env[block.indices]
            if block.k < logits.shape[-1]:
                top = torch.topk(logits.float(), block.k + 1, dim=-1).values
                clear = (top[:, block.k - 1] - top[:, block.k]) > 1e-4 * top.abs().amax(-1).clamp_min(1)
            else:  # top-k of k experts (moe-prune kept top-k): every token picks all, no near ties
                clear = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            same = (torch.sort(model_ids.long(), -1).values == torch.sort(ids.long(), -1).values).all(-1)
            if not bool(same[clear].all()):
                return f"expert ids differ on {int((~same & clear).sum())} of {tokens} tokens"
        scale = float(expected.float().abs().amax().clamp_min(1e-6))
        err = float((got.float() - expected.float()).abs().amax()) / scale
        if err > VERIFY_RTOL[val.dtype]:
            return f"outputs differ by {err:.2e} of their max (tolerance {VERIFY_RTOL[val.dtype]:.0e})"
    return None


__all__ = ["FUSE_META", "FuseMoeOptions", "FuseMoePass"]
