"""Capture: turn the parameters and buffers Dynamo passes as graph inputs into constants passes can read and replace.

Two steps, because AOT autograd sits between them:
1. `capture_dynamo_graph` (torch level): placeholders that hold a module's parameter or buffer become buffers of the
   Dynamo GraphModule, so AOT autograd lifts them as the first inputs of its aten graph, in a known order.
2. `freeze_aten_graph` (aten level): those first inputs become get_attr constants, except the ones the graph
   mutates (they stay inputs). The compiled function then drops the frozen ones from the arguments it receives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from llmcompress.passes.weights import FrozenWeight, FrozenWeights, fqn_from_source

_WEIGHT_SOURCES = ("._parameters[", "._buffers[")


@dataclasses.dataclass
class DynamoCapture:
    gm: torch.fx.GraphModule
    """Dynamo's graph with frozen placeholders turned into buffers."""
    frozen: list[FrozenWeight]
    runtime_positions: list[int]
    """Positions of Dynamo's inputs that still reach the graph at run time."""


def _source_name(node: torch.fx.Node) -> str | None:
    source = getattr(node, "_dynamo_source", None)
    if source is None and "grapharg" in node.meta:
        source = node.meta["grapharg"].source
    return source.name if source is not None and hasattr(source, "name") else None


def is_weight_input(node: torch.fx.Node, example: Any) -> bool:
    """A placeholder that carries a module's parameter or buffer (per Dynamo's source, or being a Parameter)."""
    if not isinstance(example, torch.Tensor):
        return False
    name = _source_name(node)
    if name is not None:
        return any(s in name for s in _WEIGHT_SOURCES)
    return isinstance(example, torch.nn.Parameter)


def needs_grad(example_inputs: list[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def capture_dynamo_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> DynamoCapture:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    frozen: list[FrozenWeight] = []
    runtime_positions: list[int] = []
    has_sources = hasattr(gm, "_param_name_to_source")
    for i, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not is_weight_input(node, example):
            runtime_positions.append(i)
            continue
        attr = f"_frozen_{len(frozen)}"
        gm.register_buffer(attr, example)
        if has_sources:
            gm._param_name_to_source[attr] = node._dynamo_source
        with gm.graph.inserting_before(node):
            get = gm.graph.get_attr(attr)
        get.meta.update(node.meta)
        node.replace_all_uses_with(get)
        gm.graph.erase_node(node)
        source = _source_name(node)
        frozen.append(FrozenWeight(attr, fqn_from_source(source) if source else node.name, example))
    gm.recompile()
    return DynamoCapture(gm, frozen, runtime_positions)


def freeze_aten_graph(aten_gm: torch.fx.GraphModule, capture: DynamoCapture, fw_metadata: Any
                      ) -> tuple[FrozenWeights, list[int]]:
    """Replace AOT's lifted weight inputs by constants; returns the weights and the kept input positions."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    n_frozen = len(capture.frozen)
    if len(placeholders) < n_frozen:
        raise RuntimeError(f"AOT graph has {len(placeholders)} inputs, fewer than the {n_frozen} lifted weights")
    weights = []
    frozen_positions = set()
    for i, w in enumerate(capture.frozen):
        node = placeholders[i]
        val = node.meta.get("val")
        if val is None or tuple(val.shape) != tuple(w.tensor.shape) or val.dtype != w.tensor.dtype:
            raise RuntimeError(f"AOT input {i} ({node.name}) does not match lifted weight {w.fqn}")
        info = fw_metadata.input_info[i] if fw_metadata is not None else None
        if info is not None and (info.mutates_data or info.mutates_metadata):
            continue  # a buffer the graph writes (a cache): it stays an input
        aten_gm.register_buffer(w.attr, w.constant, persistent=False)
        with aten_gm.graph.inserting_before(node):
            get = aten_gm.graph.get_attr(w.attr)
        get.meta.update(node.meta)
        node.replace_all_uses_with(get)
        aten_gm.graph.erase_node(node)
        weights.append(w)
        frozen_positions.add(i)
    aten_gm.recompile()
    kept = [i for i in range(len(placeholders)) if i not in frozen_positions]
    return FrozenWeights(aten_gm, weights), kept
