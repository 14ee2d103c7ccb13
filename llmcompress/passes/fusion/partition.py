"""Partition an aten graph into fusion groups for the code generator: `partition(graph, fusible)`.

A group is a set of call_function nodes the code generator can compute (`fusible(node)` is true), connected by
producer -> consumer edges, that can run as one kernel: contracting it to one node must leave the graph acyclic (a
path from the group back into it through a node outside, such as a view or a matmul, would need that node's result
in the middle of the kernel).

Greedy, in graph order (the FX graph is topologically sorted): each fusible node joins the groups of its fusible
producers when that keeps the graph acyclic, else the largest one that does, else starts its own group. The
acyclicity check walks back from the node's other inputs, bounded by the earliest member of the candidate groups.
networkx holds the graph of groups; `check_acyclic` verifies the result (tests call it; the pass can too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import networkx as nx
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

Rows = tuple[Any, ...]


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(dict.fromkeys(node.all_input_nodes))


class _Groups:
    """Union of fusible nodes into groups, with each group's earliest graph position."""

    def __init__(self, order: dict[torch.fx.Node, int]) -> None:
        self.order = order
        self.group_of: dict[torch.fx.Node, int] = {}
        self.members: dict[int, list[torch.fx.Node]] = {}
        self.first: dict[int, int] = {}
        self.rows: dict[int, Rows | None] = {}
        self._next = 0

    def new(self, node: torch.fx.Node, rows: Rows | None) -> int:
        gid = self._next
        self._next += 1
        self.group_of[node] = gid
        self.members[gid] = [node]
        self.first[gid] = self.order[node]
        self.rows[gid] = rows
        return gid

    def merge(self, gids: list[int], node: torch.fx.Node, rows: Rows | None) -> int:
        keep = max(gids, key=lambda g: len(self.members[g]))
        for g in gids:
            if g == keep:
                continue
            for n in self.members.pop(g):
                self.group_of[n] = keep
                self.members[keep].append(n)
            self.first[keep] = min(self.first[keep], self.first.pop(g))
            self.rows.pop(g)
        self.rows[keep] = rows
        self.group_of[node] = keep
        self.members[keep].append(node)
        return keep


def _dim_broadcast(a: Any, b: Any) -> Any:
    if statically_known_true(a == b) or statically_known_true(b == 1):
        return a
    if statically_known_true(a == 1):
        return b
    return None


def broadcast_rows(shapes: Sequence[Rows | None]) -> Rows | None | bool:
    """The leading shape all `shapes` broadcast to (right-aligned), None if none constrains, False if they clash."""
    out: list[Any] | None = None
    for shape in shapes:
        if shape is None:
            continue
        if out is None:
            out = list(shape)
            continue
        a, b = (out, list(shape)) if len(out) >= len(shape) else (list(shape), out)
        merged = a[: len(a) - len(b)]
        for x, y in zip(a[len(a) - len(b):], b):
            d = _dim_broadcast(x, y)
            if d is None:
                return False
            merged.append(d)
        out = merged
    return None if out is None else tuple(out)


def _reaches(groups: _Groups, gids: set[int], start: Iterable[torch.fx.Node]) -> bool:
    """Whether any node in `start` (outside the groups `gids`) depends on a member of those groups."""
    bound = min(groups.first[g] for g in gids)
    stack = [n for n in start if groups.group_of.get(n) not in gids]
    seen: set[torch.fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen or groups.order[n] < bound:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if groups.group_of.get(a) in gids:
                return True
            if a not in seen:
                stack.append(a)
    return False


def partition(graph: torch.fx.Graph, fusible: Callable[[torch.fx.Node], bool],
              rows: Callable[[torch.fx.Node], Rows | None] | None = None) -> list[list[torch.fx.Node]]:
    """Fusion groups of `graph`, each a list of nodes in graph order; groups listed by their first node.

    rows(node): the node's leading (row) shape, or None where it does not constrain the group (a view the kernel
    folds into a load). The rows of a group must broadcast into one row space (the code generator's row model):
    q and k of grouped-query attention (4 and 2 heads) share cos/sin but not rows, so they get one kernel each.
    Single-node groups are included: whether one pays is the caller's (cost model's) decision.
    """
    rows = rows or (lambda _n: None)
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    groups = _Groups(order)
    for node in nodes:
        if node.op != "call_function" or not fusible(node):
            continue
        inputs = _inputs(node)
        node_rows = rows(node)
        producer_gids = [g for g in dict.fromkeys(groups.group_of[a] for a in inputs if a in groups.group_of)
                         if broadcast_rows([groups.rows[g], node_rows]) is not False]
        chosen: list[int] = []
        if producer_gids:
            # All producers' groups at once, if their rows agree and no other input of the node (or, joining
            # several groups, of their members) depends on them: that input would be computed in the middle of
            # the kernel. Else the largest single group that allows it.
            joined = inputs + [a for g in producer_gids for m in groups.members[g] for a in m.all_input_nodes] \
                if len(producer_gids) > 1 else inputs
            all_rows = broadcast_rows([groups.rows[g] for g in producer_gids] + [node_rows])
            if all_rows is not False and not _reaches(groups, set(producer_gids), joined):
                chosen = producer_gids
            else:
                for gid in sorted(producer_gids, key=lambda g: -len(groups.members[g])):
                    if not _reaches(groups, {gid}, inputs):
                        chosen = [gid]
                        break
        if chosen:
            groups.merge(chosen, node, broadcast_rows([groups.rows[g] for g in chosen] + [node_rows]) or None)
        else:
            groups.new(node, node_rows)
    result = [sorted(m, key=order.__getitem__) for m in groups.members.values()]
    return sorted(result, key=lambda m: order[m[0]])


def group_graph(graph: torch.fx.Graph, groups: list[list[torch.fx.Node]]) -> nx.DiGraph:
    """The graph with each group contracted to one vertex (`("group", i)`); other nodes stay themselves."""
    label: dict[torch.fx.Node, object] = {}
    for i, members in enumerate(groups):
        for n in members:
            label[n] = ("group", i)
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(label.get(n, n))
    for n in graph.nodes:
        for user in n.users:
            a, b = label.get(n, n), label.get(user, user)
            if a != b:
                g.add_edge(a, b)
    return g


def check_acyclic(graph: torch.fx.Graph, groups: list[list[torch.fx.Node]]) -> None:
    """Raise if contracting the groups makes a cycle, or a group is not connected by producer edges."""
    contracted = group_graph(graph, groups)
    if not nx.is_directed_acyclic_graph(contracted):
        cycle = nx.find_cycle(contracted)
        raise AssertionError(f"fusion groups make a cycle: {cycle}")
    for members in groups:
        sub = nx.Graph()
        sub.add_nodes_from(members)
        member_set = set(members)
        sub.add_edges_from((a, n) for n in members for a in n.all_input_nodes if a in member_set)
        if not nx.is_connected(sub):
            raise AssertionError(f"fusion group is not connected: {[n.name for n in members]}")
