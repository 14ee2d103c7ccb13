"""Group analysis: what a fusion group reads, writes and computes, and its reference `GraphModule`.

Entry point: `analyze(nodes) -> Group`, raising `CodegenError` with the reason when the generator cannot compute the
group. The row model (docs in `emit.py`): the group is evaluated over rows x columns, columns being each node's last
dim and rows the leading dims, right-aligned and broadcast.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx

from llmcompress.codegen.ops import RULES, fusible, is_reduction, op_name
from llmcompress.fx_utils import same_size, val

aten = torch.ops.aten

# One program holds a whole row when the group reduces it: 16K fp32 values is 64 KiB of registers per program
# (16 warps x 32 lanes x 32 values); LLM hidden sizes stop at 16384 (Llama 3.1 405B).
MAX_REDUCTION_COLS = 16384


class CodegenError(Exception):
    """The code generator cannot compile a group; the message says why."""


@dataclasses.dataclass
class Group:
    nodes: list[torch.fx.Node]
    members: set[torch.fx.Node]
    inputs: list[torch.fx.Node]
    """Nodes outside the group (or get_attr constants) whose tensors the kernel reads, in argument order."""
    outputs: list[torch.fx.Node]
    """Group nodes whose values are used outside the group, in result order."""
    load_base: dict[torch.fx.Node, int]
    """Every node whose value is read from memory -> index of the input it views: the inputs themselves and the views
    of them inside the group (a view is only strides and an offset, computed at run time)."""
    identity_views: set[torch.fx.Node]
    """Views of computed values that leave the rows as they are (leading size-1 dims added or dropped, broadcast)."""
    column_slices: set[torch.fx.Node]
    rank: int
    """Number of leading (row) dims of the group."""
    has_reduction: bool
    reference: torch.fx.GraphModule
    ref_nodes: dict[torch.fx.Node, torch.fx.Node]
    """Group node or input -> its node in `reference`."""

    evaluated: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    """Nodes the kernel evaluates: computed members and the loads they read (not views on the way to a load)."""

    def _evaluated(self) -> list[torch.fx.Node]:
        out: dict[torch.fx.Node, None] = {}
        for n in self.nodes:
            if n in self.load_base:
                if n in self.outputs:
                    out[n] = None
                continue
            if not is_multi(n):
                out[n] = None
            for x in n.all_input_nodes:
                if x in self.load_base:
                    out[x] = None
        return list(out)


def is_multi(n: torch.fx.Node) -> bool:
    return n.target is not operator.getitem and RULES[n.target].kind == "multi"


def static_one(x: Any) -> bool:
    """Whether x's last dim is statically 1 (or x is 0-d): it is evaluated at column 0 and broadcast."""
    v = val(x)
    if not isinstance(v, torch.Tensor):
        return True
    return v.dim() == 0 or (isinstance(v.shape[-1], int) and v.shape[-1] == 1)


def _is_one(a: Any) -> bool:
    return isinstance(a, int) and a == 1


def rows_unchanged(src: Any, dst: Any) -> bool:
    """Whether viewing src as dst keeps every row and column where the right-aligned row model has it: same last
    dim (or src broadcast along it), leading dims equal or broadcast from size 1, extra leading dims of size 1."""
    s, d = list(val(src).shape) or [1], list(val(dst).shape) or [1]
    if not (same_size(s[-1], d[-1]) or _is_one(s[-1])):
        return False
    s_lead, d_lead = s[:-1], d[:-1]
    for i in range(1, max(len(s_lead), len(d_lead)) + 1):
        a = s_lead[-i] if i <= len(s_lead) else None
        b = d_lead[-i] if i <= len(d_lead) else None
        if a is None or _is_one(a):
            continue
        if b is None or not same_size(a, b):
            return False
    return True


def analyze(nodes: list[torch.fx.Node]) -> Group:
    if not nodes:
        raise CodegenError("empty group")
    members = set(nodes)
    if len(members) != len(nodes):
        raise CodegenError("a node appears twice in the group")
    graph = nodes[0].graph
    for n in nodes:
        if n.graph is not graph:
            raise CodegenError("group nodes come from different graphs")
        reason = fusible(n)
        if reason is not None:
            raise CodegenError(f"{n.name}: {reason}")
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(nodes, key=order.__getitem__)

    inputs: list[torch.fx.Node] = []
    for n in nodes:
        if n.target is operator.getitem and n.args[0] not in members:
            raise CodegenError(f"{n.name}: getitem of {n.args[0].name}, which is outside the group")
        if is_multi(n):
            outside = [u.name for u in n.users if u not in members or u.target is not operator.getitem]
            if outside:
                raise CodegenError(f"{n.name}: its results are read by {outside} outside the group (take the "
                                   "getitems into the group)")
        for a in n.all_input_nodes:
            if a in members or a in inputs:
                continue
            if isinstance(val(a), torch.SymInt) and RULES.get(n.target, None) is not None and \
                    RULES[n.target].kind == "multi":
                continue  # normalized_shape of a layer norm: rebuilt from the input's last dim
            if not isinstance(val(a), torch.Tensor):
                raise CodegenError(f"{n.name}: input {a.name} is not a tensor")
            inputs.append(a)
    devices = {val(x).device.type for x in inputs} | {
        t.device.type for n in nodes for t in ([val(n)] if isinstance(val(n), torch.Tensor) else [])}
    if len(devices) > 1:
        raise CodegenError(f"group mixes devices {sorted(devices)}")

    outputs = [n for n in nodes if isinstance(val(n), torch.Tensor) and any(u not in members for u in n.users)]
    if not outputs:
        raise CodegenError("group has no outputs (nothing outside reads its values)")

    load_base = {x: i for i, x in enumerate(inputs)}
    identity_views: set[torch.fx.Node] = set()
    column_slices: set[torch.fx.Node] = set()
    for n in nodes:
        kind = RULES[n.target].kind if n.target is not operator.getitem else "getitem"
        if kind not in ("view", "slice"):
            continue
        x = n.args[0]
        if x in load_base:
            load_base[n] = load_base[x]
        elif kind == "slice" and n.args[1] % max(val(x).dim(), 1) == val(x).dim() - 1:
            column_slices.add(n)
        elif rows_unchanged(x, n):
            identity_views.add(n)
        else:
            raise CodegenError(f"{n.name}: {op_name(n.target)} of {x.name}, a value computed in the group, moves "
                               "its rows (views inside a group must read a group input or keep the rows)")

    group = Group(nodes, members, inputs, outputs, load_base, identity_views, column_slices, 0,
                  any(is_reduction(n) for n in nodes), *_reference(nodes, inputs, outputs))
    group.evaluated = group._evaluated()
    ranks = [val(x).dim() - 1 for x in group.evaluated]
    group.rank = max([0, *ranks])
    _check_rows(group)
    if group.has_reduction:
        for x in group.evaluated:
            c = val(x).shape[-1] if val(x).dim() else 1
            if isinstance(c, int) and c > MAX_REDUCTION_COLS:
                raise CodegenError(f"{x.name}: rows of {c} columns in a group with a reduction (at most "
                                   f"{MAX_REDUCTION_COLS})")
    return group


def _check_rows(group: Group) -> None:
    """Every evaluated node's leading dims must broadcast (right-aligned) into one row space."""
    lead: list[tuple[Any, torch.fx.Node | None]] = [(1, None)] * group.rank
    for x in group.evaluated:
        shape = list(val(x).shape[:-1])
        for j, size in enumerate(shape):
            d = group.rank - len(shape) + j
            seen, owner = lead[d]
            if _is_one(size):
                continue
            if _is_one(seen):
                lead[d] = (size, x)
            elif not same_size(seen, size):
                raise CodegenError(f"rows of {x.name} {tuple(val(x).shape)} and {owner.name} "
                                   f"{tuple(val(owner).shape)} do not broadcast (right-aligned) into one row space")


def _reference(nodes: list[torch.fx.Node], inputs: list[torch.fx.Node], outputs: list[torch.fx.Node]
               ) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, torch.fx.Node]]:
    """The group as a GraphModule of aten ops (inputs -> tuple of outputs), with canonical names, so that two groups
    computing the same thing print the same code."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, x in enumerate(inputs):
        env[x] = g.placeholder(f"in{i}")
        env[x].meta["val"] = val(x)
    for i, n in enumerate(nodes):
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env.get(a, a))
        if n.target is aten._to_copy.default:
            # Device moves were refused; dropping device/layout lets the reference run on meta tensors.
            kwargs = {k: v for k, v in kwargs.items() if k in ("dtype", "memory_format")}
        if n.target is aten.native_layer_norm.default:
            x = args[0]
            last = g.call_function(aten.sym_size.int, (x, len(val(n.args[0]).shape) - 1))
            args = (x, [last], *args[2:])
        new = g.create_node("call_function", n.target, args, kwargs, name=f"n{i}")
        new.meta["val"] = val(n)
        env[n] = new
    g.output(tuple(env[o] for o in outputs))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    return gm, env
