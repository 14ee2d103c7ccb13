"""Slice a pruned MoE block down to its kept experts: `remove_experts(gm, ctx, block, kept, tensors, masked)`.

`moe-prune` chooses the experts; this takes the others out of the graph. The router becomes `aten.linear(x, W[kept])`
(kept, H), so the softmax runs over the kept logits only (the kept experts renormalised, exactly as the −inf mask
did) and the top-k picks positions in the kept list; the experts' 3-D weights become their kept rows; and the
block's nodes between the router and the experts' output (`region.experts_output`, `block_region`) are copied onto
them, their fake values recomputed and the one count of experts they carry as a constant (the grouped matmul's
`histc` bins, transformers' `torch.histc(ids, bins=E, min=0, max=E - 1)`) set to the kept count. Whatever reads the
new block (`fuse-moe`, `quantize-linear`) sees an ordinary block of `len(kept)` experts; the router node's meta
(`blocks.EXPERT_IDS`, `ORIGINALS`) gives the original id of each position and the module's weights, for the load
counters.

The copy is checked before it replaces the block: both run on random hidden states (the original with the masked
router and the kept experts' refit down projections, i.e. what the −inf mask computes) and must agree within the
dtype's rounding. A block whose copy cannot be made, traced or checked is left unchanged and the reason returned:
`moe-prune` then masks it as before. Only the eager experts loop never reaches the graph (it breaks it): nothing to
slice there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.fx_utils import fake_value
from llmcompress.passes.base import PassContext
from llmcompress.passes.moe.blocks import EXPERT_IDS, ORIGINALS, MoEBlock
from llmcompress.passes.moe.region import VERIFY_RTOL, Region, block_region, concrete_size, experts_output, run_nodes

aten = torch.ops.aten
_PROVENANCE = ("nn_module_stack", "stack_trace")


def remove_experts(gm: torch.fx.GraphModule, ctx: PassContext, block: MoEBlock, kept: list[int],
                   tensors: dict[str, torch.Tensor | None], masked: dict[str, torch.Tensor | None]) -> str | None:
    """Rewrite `block` onto its kept experts; None when done, else why not (the graph is then as it was).

    tensors: the kept experts' weights: {"weight": (n, H) router rows, "bias": (n,) or None, "gate_up": (n, 2I, H),
      "down": (n, H, I)}, n = len(kept), original ids `kept` in increasing order.
    masked: what the −inf mask would put in the graph, the reference of the check: {"weight": (E, H), "bias": (E,)
      0 / −inf (plus the router's own bias), "down": (E, H, I)}.
    """
    out = experts_output(block)
    if out is None:
        return "no single node carries the experts' output (unknown block shape)"
    region = block_region(block, out)
    if region is None:
        return "the block reads graph inputs other than its hidden states (unknown block shape)"
    inside = set(region.nodes)
    for n in [block.router, block.gate_up, block.down, *inside - {out}]:
        outside = [u for u in n.users if u not in inside]
        if outside:
            return f"{n.name} is read outside the block (by {outside[0].name}): its shape must stay"
    e, kept_n = block.num_experts, len(kept)
    graph, fake = gm.graph, ctx.fake_mode
    added: list[torch.fx.Node] = []
    env: dict[torch.fx.Node, Any] = {}
    try:
        with graph.inserting_before(out):
            consts = {k: ctx.weights.add(gm, t, _name(block, k)) for k, t in tensors.items() if t is not None}
            added += consts.values()
            router = _traced(graph, fake, aten.linear.default, (block.router.args[0], consts["weight"],
                                                                consts.get("bias")), {})
            added.append(router)
            env.update({block.router: router, block.gate_up: consts["gate_up"], block.down: consts["down"]})
            for n in region.nodes:
                args = torch.fx.node.map_arg(n.args, lambda a: env.get(a, a))
                kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env.get(a, a))
                if n.target is aten.histc.default:
                    args = _histc_args(args, e, kept_n)
                copy = _traced(graph, fake, n.target, args, kwargs)
                added.append(copy)
                copy.meta.update({k: v for k, v in n.meta.items() if k in _PROVENANCE})
                env[n] = copy
    except Exception as err:  # noqa: BLE001 - a block the copy cannot trace is a block we do not slice
        _undo(gm, ctx, added)
        return f"the sliced block does not trace ({type(err).__name__}: {err})"
    router.meta.update({k: v for k, v in block.router.meta.items() if k in _PROVENANCE})
    router.meta[EXPERT_IDS] = [block.expert_ids[i] for i in kept]
    router.meta[ORIGINALS] = block.originals or [n.target for n in (block.router.args[1], block.gate_up, block.down)
                                                 if n.op == "get_attr"]
    problem = _check(ctx, block, region, out, env, masked)
    if problem is not None:
        _undo(gm, ctx, added)
        return problem
    out.replace_all_uses_with(env[out])
    return None


def _traced(graph: torch.fx.Graph, fake: Any, target: Any, args: tuple, kwargs: dict) -> torch.fx.Node:
    """`fx_utils.call`, but the node is inserted only once its fake value computed: a copy that does not trace
    leaves nothing behind to undo."""
    with fake:
        value = target(*fake_value(args), **fake_value(kwargs))
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = value
    return node


def _name(block: MoEBlock, key: str) -> str:
    return {"weight": f"{block.name}.gate.weight_pruned", "bias": f"{block.name}.gate.bias_pruned",
            "gate_up": f"{block.name}.experts.gate_up_proj", "down": f"{block.name}.experts.down_proj"}[key]


def _histc_args(args: tuple, e: int, n: int) -> tuple:
    """`histc(ids, bins=E, min=0, max=E - 1)` → bins n, max n - 1; any other histogram is not one we know."""
    full = (*args, *(100, 0, 0)[len(args) - 1:])
    if tuple(full[1:]) != (e, 0, e - 1):
        raise ValueError(f"histc{tuple(full[1:])} is not the experts' histogram (bins={e}, min=0, max={e - 1})")
    return (full[0], n, 0, n - 1)


def _undo(gm: torch.fx.GraphModule, ctx: PassContext, added: list[torch.fx.Node]) -> None:
    for n in reversed(added):
        gm.graph.erase_node(n)
        if n.op == "get_attr":
            ctx.weights.by_attr.pop(n.target, None)
            delattr(gm, n.target)


def _check(ctx: PassContext, block: MoEBlock, region: Region, out: torch.fx.Node, env: dict[torch.fx.Node, Any],
           masked: dict[str, torch.Tensor | None]) -> str | None:
    """Run the masked block and its sliced copy on random hidden states; None when they agree."""
    shape = [concrete_size(d, ctx) for d in region.source.meta["val"].shape]
    if None in shape:
        return "the hidden states' shape is unknown at compile time (the slice cannot be checked)"
    x = block.router.args[0]
    with unset_fake_temporarily():
        dtype = region.source.meta["val"].dtype
        device = ctx.weights.value(block.gate_up).device
        xs = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        try:
            values = run_nodes(ctx, region.to_router, {region.source: xs})
            rdtype = block.router.meta["val"].dtype
            bias = None if masked["bias"] is None else masked["bias"].to(rdtype)
            reference = {**values, block.router: F.linear(values[x], masked["weight"].to(rdtype), bias),
                         block.down: masked["down"]}
            expected = run_nodes(ctx, region.nodes, reference)[out]
            sliced = run_nodes(ctx, [env[block.router], *(env[n] for n in region.nodes)], dict(values))
            got = sliced[env[out]]
        except Exception as err:  # noqa: BLE001 - a block we cannot run is a block we do not slice
            return f"the sliced block could not be checked ({type(err).__name__}: {err})"
        scale = float(expected.float().abs().amax().clamp_min(1e-6))
        err = float((got.float() - expected.float()).abs().amax()) / scale
        tolerance = VERIFY_RTOL.get(dtype, 1e-4)
        if err > tolerance:
            return f"the sliced block differs from the masked one by {err:.2e} of its max (tolerance {tolerance:.0e})"
    return None

