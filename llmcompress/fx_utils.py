"""Helpers passes use to edit a captured aten graph while keeping `node.meta["val"]` (fake values) right.

Every node a pass adds must carry `meta["val"]`: later passes, the cost model and Inductor read it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


def fake_mode_of(gm: torch.fx.GraphModule) -> FakeTensorMode | None:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return None


def fake_value(arg: Any) -> Any:
    """The fake value of an FX argument (nodes replaced by their meta["val"], containers mapped)."""
    return torch.fx.node.map_arg(arg, lambda n: n.meta["val"])


def call(graph: torch.fx.Graph, fake_mode: FakeTensorMode, target: Callable, args: tuple, kwargs: dict | None = None
         ) -> torch.fx.Node:
    """Insert `target(*args, **kwargs)` at the graph's insertion point, with its fake value computed."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    with fake_mode:
        node.meta["val"] = target(*fake_value(args), **fake_value(kwargs))
    return node


def add_constant(gm: torch.fx.GraphModule, fake_mode: FakeTensorMode, tensor: torch.Tensor, hint: str) -> torch.fx.Node:
    """Register `tensor` as a new constant attribute of `gm` and return a get_attr node for it."""
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor, persistent=False)
    node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
    return node


def replace_with_traced(gm: torch.fx.GraphModule, node: torch.fx.Node, fn: Callable[..., Any],
                        args: Sequence[torch.fx.Node | Any]) -> torch.fx.Node:
    """Replace `node` by the aten graph of `fn(*args)`, traced on the args' fake values and inlined before it.

    Non-node args are baked into the trace as constants. Returns the node holding the (single) result.
    """
    fake_mode = fake_mode_of(gm)
    node_positions = [i for i, a in enumerate(args) if isinstance(a, torch.fx.Node)]
    fakes = [args[i].meta["val"] for i in node_positions]

    def traced_fn(*xs):
        full = list(args)
        for i, x in zip(node_positions, xs):
            full[i] = x
        return fn(*full)

    with fake_mode:
        sub = make_fx(traced_fn, tracing_mode="real")(*fakes)
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(args[i] for i in node_positions)
    result = None
    with gm.graph.inserting_before(node):
        for sub_node in sub.graph.nodes:
            if sub_node.op == "placeholder":
                env[sub_node] = next(placeholders)
            elif sub_node.op == "output":
                result = torch.fx.node.map_arg(sub_node.args[0], env.__getitem__)
            elif sub_node.op == "get_attr":
                env[sub_node] = add_constant(gm, fake_mode, getattr(sub, sub_node.target), sub_node.target)
            else:
                new = gm.graph.node_copy(sub_node, env.__getitem__)
                new.meta["val"] = sub_node.meta.get("val")
                new.meta.setdefault("stack_trace", node.meta.get("stack_trace"))
                env[sub_node] = new
    if not isinstance(result, torch.fx.Node):
        raise TypeError(f"replace_with_traced: {fn} must return one tensor, got {result!r}")
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return result


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


# Names of layers fused from several (`fuse-sibling-linears` writes them, `quantize-linear` matches them).
def fused_name(weight_names: list[str]) -> str:
    """`[a.q_proj.weight, a.k_proj.weight]` -> `a.q_proj+k_proj.weight`: a member after the first is written
    relative to the one before it when they share a parent module, else in full (see `member_names`)."""
    suffix = ".weight" if all(n.endswith(".weight") for n in weight_names) else ""
    modules = [n.removesuffix(".weight") if suffix else n for n in weight_names]
    # A top-level name (no dot) written after a nested one would read as relative: put top-level names first.
    modules = sorted(modules, key=lambda m: "." in m)
    parts = [modules[0]]
    for prev, m in zip(modules, modules[1:]):
        parts.append(m.rpartition(".")[2] if m.rpartition(".")[0] == prev.rpartition(".")[0] else m)
    return "+".join(parts) + suffix


def member_names(module_name: str) -> list[str]:
    """The members of a fused module name (`fused_name` without `.weight`): `a.q_proj+k_proj` -> `[a.q_proj,
    a.k_proj]`; a plain name -> `[name]`."""
    out: list[str] = []
    for part in module_name.split("+"):
        if out and "." not in part:
            parent = out[-1].rpartition(".")[0]
            part = f"{parent}.{part}" if parent else part
        out.append(part)
    return out
