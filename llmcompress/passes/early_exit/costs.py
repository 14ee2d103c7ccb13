"""`graph_costs`: the cascade's `exit_gates.CascadeCosts` priced from a decode graph's own weights (the model-level
`exit_gates.cascade_costs` prices HF modules; the pass has only the graph). Same roofline terms: one row (M = 1),
every weight read once, 2 FLOP per weight, one launch per weight; the translation and gates are priced by
`exit_gates.priced_cascade`, as for the modules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx

from llmcompress.cost.roofline import CostModel
from llmcompress.exit_gates import CascadeCosts, priced_cascade
from llmcompress.passes.early_exit.structure import DecoderGraph, layer_of


def _weights(nodes: Iterable[torch.fx.Node]) -> list[torch.fx.Node]:
    return list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"))


def _time(cost: CostModel, weights: list[torch.fx.Node], dtype: torch.dtype) -> float:
    vals = [w.meta["val"] for w in weights]
    return cost.kernel_time(2 * sum(v.numel() for v in vals), sum(v.numel() * v.element_size() for v in vals), dtype,
                            rows=1, launches=max(len(vals), 1))


def graph_costs(gm: torch.fx.GraphModule, dg: DecoderGraph, cost: CostModel, head_nodes: Iterable[torch.fx.Node],
                fill_nodes: list[set[torch.fx.Node]]) -> CascadeCosts:
    """head_nodes: the final norm + LM head; fill_nodes[i]: layer i's K/V path (the backward slice of its writes)."""
    weight = dg.head_weight.meta["val"]
    dtype = weight.dtype
    by_layer: list[list[torch.fx.Node]] = [[] for _ in range(dg.num_layers)]
    for n in gm.graph.nodes:
        i = layer_of(n)
        if i is not None and n.op == "call_function":
            by_layer[i].append(n)
    layer = sum(_time(cost, _weights(ns), dtype) for ns in by_layer) / dg.num_layers
    head = _time(cost, _weights(head_nodes), dtype)
    fill = sum(_time(cost, _weights(ns), dtype) for ns in fill_nodes) / dg.num_layers
    return priced_cascade(cost, weight, layer=layer, head=head, fill=fill, num_layers=dg.num_layers)
