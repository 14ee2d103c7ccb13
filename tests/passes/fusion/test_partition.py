"""The fusion partitioner: groups are connected, contracting them keeps the graph acyclic, and a node joins its
producers' groups whenever that is possible."""

from __future__ import annotations

import operator
import random

import pytest
import torch
import torch.fx

from llmcompress.passes.fusion.partition import check_acyclic, partition

FUSIBLE = {torch.sin, torch.cos, torch.neg, operator.add, operator.mul}


def _fusible(node: torch.fx.Node) -> bool:
    return node.target in FUSIBLE


def _names(groups):
    return [[n.name for n in g] for g in groups]


def _groups(fn):
    gm = torch.fx.symbolic_trace(fn)
    groups = partition(gm.graph, _fusible)
    check_acyclic(gm.graph, groups)
    return _names(groups)


def test_a_chain_is_one_group():
    assert _groups(lambda x: torch.cos(torch.sin(x) * 2) + x) == [["sin", "mul", "cos", "add"]]


def test_a_consumer_joins_two_producer_groups():
    assert _groups(lambda x, y: torch.sin(x) * torch.cos(y)) == [["sin", "cos", "mul"]]


def test_unfusible_nodes_split_groups():
    # matmul is not fusible: sin and cos are separate groups around it.
    assert _groups(lambda x, w: torch.cos(torch.matmul(torch.sin(x), w))) == [["sin"], ["cos"]]


def test_no_group_spans_a_path_through_an_outside_node():
    # d = a + b with b computed from a through a matmul: {a, d} would need the matmul inside the kernel.
    def fn(x, w):
        a = torch.sin(x)
        b = torch.cos(torch.matmul(a, w))
        return a + b

    assert _groups(fn) == [["sin"], ["cos", "add"]]


def test_two_producer_groups_linked_outside_are_not_joined():
    # a -> matmul -> b: joining {a} and {b} through c = a * b would contain the matmul's path.
    def fn(x, w):
        a = torch.sin(x)
        b = torch.neg(torch.matmul(a, w))
        return a * b

    groups = _groups(fn)
    assert ["sin", "neg", "mul"] not in groups and sorted(map(len, groups)) == [1, 2]


@pytest.mark.parametrize("seed", range(25))
def test_random_graphs_partition_acyclic_and_maximal(seed):
    """Random DAGs of fusible ops and opaque matmuls: the contracted graph is acyclic and every fusible
    producer -> consumer edge inside no group is one that joining would have made cyclic."""
    rng = random.Random(seed)
    graph = torch.fx.Graph()
    values = [graph.placeholder(f"x{i}") for i in range(3)]
    for _ in range(rng.randint(5, 40)):
        kind = rng.random()
        a, b = rng.choice(values), rng.choice(values)
        if kind < 0.2:
            node = graph.call_function(torch.matmul, (a, b))
        elif kind < 0.5:
            node = graph.call_function(rng.choice([torch.sin, torch.cos, torch.neg]), (a,))
        else:
            node = graph.call_function(rng.choice([operator.add, operator.mul]), (a, b))
        values.append(node)
    graph.output(tuple(values[3:]))
    groups = partition(graph, _fusible)
    check_acyclic(graph, groups)
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    assert set(group_of) == {n for n in graph.nodes if n.op == "call_function" and _fusible(n)}
    for n in group_of:
        for a in n.all_input_nodes:
            if a in group_of and group_of[a] != group_of[n]:
                merged = [g for g in groups if n in g or a in g]
                joined = [x for g in merged for x in g]
                others = [g for g in groups if g not in merged]
                with pytest.raises(AssertionError):
                    check_acyclic(graph, others + [joined])


def test_groups_only_join_when_their_rows_broadcast():
    # q (2, 4, 5) and k (2, 2, 5) rows both read c (5,): the consumers of c cannot share one row space.
    def fn(c, q, k):
        s = torch.sin(c)
        return q * s, k * s

    gm = torch.fx.symbolic_trace(fn)
    shapes = {"sin": (), "mul": (2, 4), "mul_1": (2, 2)}
    groups = partition(gm.graph, _fusible, rows=lambda n: shapes.get(n.name))
    check_acyclic(gm.graph, groups)
    assert _names(groups) == [["sin", "mul"], ["mul_1"]]


def test_broadcast_rows():
    from llmcompress.passes.fusion.partition import broadcast_rows

    assert broadcast_rows([(2, 1, 7), (5, 1), None]) == (2, 5, 7)
    assert broadcast_rows([(2, 4), (2, 2)]) is False
    assert broadcast_rows([None, None]) is None
