"""Tiny FX graphs for tests of the cost model."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


def single_node_graph(target, args, kwargs=None) -> torch.fx.Node:
    """The node of a one-op graph `target(*args, **kwargs)` whose placeholders and node carry fake `meta["val"]`
    (make_fx would decompose CompositeImplicit ops). None in `args` is passed as None, not as a placeholder."""
    mode, graph = FakeTensorMode(), torch.fx.Graph()
    nodes = []
    for i, t in enumerate(args):
        if t is None:
            nodes.append(None)
            continue
        ph = graph.placeholder(f"in{i}")
        ph.meta["val"] = mode.from_tensor(t)
        nodes.append(ph)
    node = graph.call_function(target, tuple(nodes), kwargs or {})
    with mode:
        node.meta["val"] = target(*[None if a is None else a.meta["val"] for a in nodes], **(kwargs or {}))
    graph.output(node)
    return node
