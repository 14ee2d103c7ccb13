"""Helpers passes use to edit a captured aten graph while keeping `node.meta["val"]` (fake values) right.

Every node a pass adds must carry `meta["val"]`: later passes, the cost model and Inductor read it.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

# The one table of view ops: aten ops whose result is a view of their first argument, so no data moves and no kernel
# runs. The frozen-weight store applies them to real weights, the cost model prices them free, the folds look
# through them, the code generator folds them into loads. `reshape` is a view wherever the strides allow one (a copy
# elsewhere); `detach` and `alias` return the same data.
VIEW_OPS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unflatten.int, aten.t.default,
    aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.as_strided.default,
    aten.alias.default, aten.detach.default, aten.view_as_real.default, aten.view_as_complex.default,
})
# Ops returning a tuple of views of their first argument, read by getitem.
MULTI_VIEW_OPS = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default})
# The views that keep elements in row-major order (reshapes, alias): a row stays whole when the last dim does.
RESHAPE_OPS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default})


def val(x: Any) -> Any:
    """The value of an FX argument: a node's fake value (`meta["val"]`, None if it has none), anything else as is."""
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else x


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of a (fake) value, in order: itself, or those in its nested lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are equal; for SymInts, provably so under the guards so far (no new guard is added)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(statically_known_true(a == b))
    return a == b


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def fake_mode_of(gm: torch.fx.GraphModule) -> FakeTensorMode | None:
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
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


def add_constant(gm: torch.fx.GraphModule, fake_mode: FakeTensorMode, tensor: torch.Tensor, hint: str,
                 taken: Container[str] = ()) -> torch.fx.Node:
    """Register `tensor` as a new constant attribute of `gm` and return a get_attr node for it. taken: names to
    avoid besides gm's own (the pieces of a split graph each add constants to one shared weights table)."""
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "const"
    name, i = base, 0
    while hasattr(gm, name) or name in taken:
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor, persistent=False)
    node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
    return node


def only_user(node: Any) -> torch.fx.Node | None:
    """The one node that reads `node`, or None (several users, none, or `node` is not a node)."""
    users = list(node.users) if isinstance(node, torch.fx.Node) else []
    return users[0] if len(users) == 1 else None


def finish_rewrite(gm: torch.fx.GraphModule) -> None:
    """Drop what a rewrite left dead, check the graph and regenerate its code: the end of a pass that changed it.

    The pass manager lints and recompiles after every pass too; this keeps a pass run on its own runnable.
    """
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def reaches_output(node: torch.fx.Node) -> bool:
    """Whether `node` reaches the graph output through views only (replacing it would alias what it is replaced
    by to an output)."""
    views = VIEW_OPS | MULTI_VIEW_OPS | {operator.getitem}
    stack = [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u.op == "call_function" and u.target in views and u.args[0] is n:
                stack.append(u)
    return False


def _same_layout(old: Any, new: Any) -> bool:
    olds, news = torch.utils._pytree.tree_leaves(old), torch.utils._pytree.tree_leaves(new)
    if len(olds) != len(news):
        return False
    for o, n in zip(olds, news):
        if isinstance(o, torch.Tensor) != isinstance(n, torch.Tensor):
            return False
        if isinstance(o, torch.Tensor) and (o.dtype != n.dtype or not same_shape(o.shape, n.shape)
                                            or not same_shape(o.stride(), n.stride())):
            return False
    return True


def refresh_meta(gm: torch.fx.GraphModule, fake_mode: Any, start: Iterable[torch.fx.Node]) -> int:
    """Recompute `meta["val"]` of `start` and of every node downstream whose input's layout changed.

    A pass that replaces a node by another of the same shape but other strides (a slice of a fused output, the
    input of a removed mul) leaves stale strides behind; a `view` that the new strides do not allow becomes a
    `reshape` (a copy only where a view is impossible). Returns how many views became reshapes.
    """
    todo, dirty, reshaped = set(start), set(), 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not (node in todo or any(a in dirty for a in node.all_input_nodes)):
            continue
        old = node.meta.get("val")
        try:
            with fake_mode:
                new = node.target(*fake_value(node.args), **fake_value(node.kwargs))
        except (RuntimeError, ValueError):  # fake tensors raise ValueError for an impossible view
            if node.target not in (aten.view.default, aten._unsafe_view.default):
                raise
            node.target = aten.reshape.default
            with fake_mode:
                new = node.target(*fake_value(node.args), **fake_value(node.kwargs))
            reshaped += 1
        node.meta["val"] = new
        if not _same_layout(old, new):
            dirty.add(node)
    return reshaped


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


def layer_matches(name: str, pattern: str) -> bool:
    """A `skip` / `overrides` pattern of the compressing passes against a layer's module path: fnmatch on the path,
    or on its tail (`lm_head` matches `lm_head` and `model.lm_head`). A layer fused by `fuse-sibling-linears`
    (`a.q_proj+k_proj+v_proj`) matches when any of its members does."""
    return any(fnmatch.fnmatchcase(m, pattern) or fnmatch.fnmatchcase(m, f"*.{pattern}") for m in member_names(name))


_GROUPED_OPS: frozenset[Any] | None = None


def grouped_matmul_ops() -> frozenset[Any]:
    """The ops MoE experts stored as 3-D weights run as: `aten._grouped_mm(x, w, offs)` and transformers'
    `grouped_mm_fallback` (same arguments), w (E, K, N). The cost model asks for every node it prices, so the set is
    kept once transformers has registered its op (before that it is looked up again: it may be imported later)."""
    global _GROUPED_OPS
    if _GROUPED_OPS is not None:
        return _GROUPED_OPS
    ops: set[Any] = set()
    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is not None:
        ops.add(op.default)
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        ops.add(fallback.default)
        _GROUPED_OPS = frozenset(ops)
    return frozenset(ops)
