"""A matched MoE block's extent in the graph, and its evaluation on real tensors: what the family's rewrites
(`fuse_moe.py`, `remove.py`) replace and how they check a rewrite before keeping it.

`experts_output(block)` is the node that carries the experts' combined output, `block_region(block, out)` the nodes
between the hidden states and it (the router excluded); `run_nodes` runs such nodes on random hidden states at the
compile's sizes (`concrete_size`), and `VERIFY_RTOL` is how far a rewrite may differ from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import torch.fx

from llmcompress.cost.roofline import sym
from llmcompress.passes.base import PassContext
from llmcompress.passes.moe.blocks import MoEBlock

# A checked rewrite's tolerance relative to the block output's scale: the fused ops accumulate in fp32 and round
# once, the eager experts round after each product, so a 16-bit block differs by a few of its ulps (2^-8 for bf16).
VERIFY_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def experts_output(block: MoEBlock) -> torch.fx.Node | None:
    """The first node, in graph order, that every path from the expert weights to the rest of the graph passes
    through: the experts' combined (T, H) output, so that what comes after it (Qwen2-MoE's shared expert) is no part
    of the block. Walks the weights' descendants keeping the set of nodes whose users are not all visited; the first
    node that is the only one left, after the down projection was read, with the router input's (T, H) shape
    (before it: the per-slot (T·k, H) products), is it."""
    graph_nodes = list(block.router.graph.nodes)
    order = {n: i for i, n in enumerate(graph_nodes)}
    sources = {block.gate_up, block.down}
    reached = set(sources)
    live = set(sources)
    seen_down = False
    start = min(order[u] for s in sources for u in s.users)
    for n in graph_nodes[start:]:
        if not any(isinstance(a, torch.fx.Node) and a in reached for a in n.all_input_nodes):
            continue
        reached.add(n)
        seen_down |= block.down in n.all_input_nodes
        live.add(n)
        live = {m for m in live if any(order[u] > order[n] for u in m.users)}
        if seen_down and live == {n} and n.op == "call_function" and _same_shape(n, block.router.args[0]):
            return n
        if not live:
            return None
    return None


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and tuple(va.shape) == tuple(vb.shape)


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


@dataclasses.dataclass
class Region:
    nodes: list[torch.fx.Node]
    """What a rewrite replaces: `out`'s ancestors down to the block input, the router linear and constants
    excluded (the ops read those), in graph order."""
    source: torch.fx.Node
    """The one tensor the block's nodes read from before it (the hidden states, often (B, S, H) before the views
    the router and the experts each take of it)."""
    to_router: list[torch.fx.Node]
    """The nodes from `source` to the router input, in graph order (the views), for the checks that run the block
    from `source`."""


def block_region(block: MoEBlock, out: torch.fx.Node) -> Region | None:
    """The block's region, or None when it reads any tensor computed before it other than one source of the
    router input (e.g. a graph input, or a second tensor): only a block that reads nothing else can be rewritten
    and checked on its own."""
    x = block.router.args[0]
    before = _ancestors(x)
    region: set[torch.fx.Node] = set()
    frontier: set[torch.fx.Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in region or n is block.router:
            continue
        if n in before:
            if isinstance(n.meta.get("val"), torch.Tensor):
                frontier.add(n)
            continue
        if n.op == "placeholder":
            if isinstance(n.meta.get("val"), torch.Tensor):
                return None
            continue  # a size symbol (dynamic shapes): bound from the example sizes in `run_nodes`
        if n.op == "get_attr":
            continue
        region.add(n)
        stack.extend(n.all_input_nodes)
    # The frontier lies on the router input's ancestry (the hidden states and the views of them the router and the
    # experts each take): its most upstream node is the source, and every other frontier node derives from it.
    source = next((f for f in frontier if all(f in _ancestors(g) for g in frontier)), None)
    if source is None:
        return None
    chain = {n for n in before if source in _ancestors(n)} - {source} if source is not x else set()
    for n in chain:
        for a in n.all_input_nodes:
            if not (a in chain or a is source or a.op == "get_attr"
                    or (a.op == "placeholder" and not isinstance(a.meta.get("val"), torch.Tensor))):
                return None  # the views read another tensor: not a block we can run alone
    order = list(out.graph.nodes)
    return Region([n for n in order if n in region], source, [n for n in order if n in chain])


def concrete_size(x: Any, ctx: PassContext) -> int | None:
    """A size (int, SymInt or symbol) at the compile's example sizes (`ctx.sizes`); None when it stays symbolic:
    a check runs on real tensors, which need concrete shapes."""
    expr = sym(x)
    if ctx.sizes:
        expr = expr.subs({(sympy.Symbol(k) if isinstance(k, str) else k): v for k, v in ctx.sizes.items()})
    return None if expr.free_symbols else int(expr)


def run_nodes(ctx: PassContext, nodes: list[torch.fx.Node], env: dict[torch.fx.Node, Any]
              ) -> dict[torch.fx.Node, Any]:
    """Evaluate `nodes` in order on real tensors into `env`, and return it: how a rewrite is checked against the
    block it replaces without running the whole graph.

    A node already in `env` keeps its value (the caller's inputs and substitutes, e.g. a masked router). An argument
    not in `env` is looked up on demand: a constant from `ctx.weights`, a size symbol from `ctx.sizes`, and any
    other node evaluated the same way first (so a size computed outside the block, or the ops a rewrite inserted,
    need not be listed). Arguments nested in lists, tuples and dicts are resolved too. Fails (the caller's
    exception handler decides) when a needed node cannot be computed, e.g. one that reads a graph input tensor."""
    def value(a: torch.fx.Node) -> Any:
        if a not in env:
            if a.op == "get_attr":
                env[a] = ctx.weights.value(a)
            elif a.op == "placeholder":
                env[a] = concrete_size(a.meta["val"], ctx)
            else:
                env[a] = run(a)
        return env[a]

    def run(n: torch.fx.Node) -> Any:
        return n.target(*torch.fx.node.map_arg(n.args, value), **torch.fx.node.map_arg(n.kwargs, value))

    for n in nodes:
        if n not in env:
            env[n] = run(n)
    return env


__all__ = ["VERIFY_RTOL", "Region", "block_region", "concrete_size", "experts_output", "run_nodes"]
