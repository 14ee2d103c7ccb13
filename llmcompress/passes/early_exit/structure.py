"""What the `early-exit` pass needs to know about a decoder graph: `find_decoder(gm)` returns a `DecoderGraph` (the
residual-stream value entering and leaving each decoder layer, the final norm + LM head, each layer's static-cache
writes) or the reason the graph is left alone.

Layers are told apart by the nodes' `nn_module_stack` (the `...layers.<i>` module each node was traced in). The
state leaving layer i is the one value of the hidden-state shape that layer i computes and layer i + 1 (or the final
norm) reads; a layer's cache writes are the `copy_` nodes AOT autograd put at the end for the inputs it mutates,
whose written value layer i computed (the key / value `index_copy` and, in transformers 5, the cache's length
counter).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx

from llmcompress.fx_utils import VIEW_OPS

aten = torch.ops.aten
_LAYER = re.compile(r"\.layers\.(\d+)$")


@dataclasses.dataclass
class DecoderGraph:
    """states[i]: the residual stream entering layer i (states[0]: the embeddings; states[L]: the last layer's
    output before the final norm), as `exit_heads.layer_states` lays them out. writes[i]: layer i's `copy_` nodes
    into graph inputs (its static-cache slots). logits: the graph's first output (norm + LM head of states[L])."""

    states: list[torch.fx.Node]
    writes: list[list[torch.fx.Node]]
    logits: torch.fx.Node
    head_weight: torch.fx.Node
    norm_out: torch.fx.Node
    """The final norm's output (what the LM head reads, maybe through a slice)."""
    cannot_split: str | None = None
    """Why the graph can be calibrated on but not cut into the cascade's pieces (other outputs, no cache writes)."""

    @property
    def num_layers(self) -> int:
        return len(self.states) - 1


def layer_of(node: torch.fx.Node) -> int | None:
    """The decoder layer a node was traced in (outermost `...layers.<i>` module of its stack), or None."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = _LAYER.search(str(path))
        if m:
            return int(m.group(1))
    return None


def _stack_paths(node: torch.fx.Node) -> list[str]:
    return [str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def find_decoder(gm: torch.fx.GraphModule) -> DecoderGraph | str:
    """The graph's decoder structure, or why it is not one the pass rewrites."""
    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    heads = [o for o in outs if isinstance(o, torch.fx.Node) and _in_lm_head(_through_views(o))]
    if len(heads) != 1:
        return f"{len(heads)} of the graph's outputs are an LM head's (computed in a module named lm_head)"
    logits = heads[0]
    cannot_split = None
    if len(outs) != 1:
        # a prefill that creates the static cache (transformers' lazy initialisation) returns its tensors too
        cannot_split = (f"the graph returns {len(outs)} values; the cascade rewrites decode graphs returning only the "
                        "logits")
    norm_out = _norm_output(logits)
    if norm_out is None:
        return "no final norm (a model-level module named ...norm) before the LM head"
    weights = {a for n in _ancestors(logits, {norm_out}) for a in n.all_input_nodes
               if a.op == "get_attr" and a.meta["val"].dim() == 2}
    if len(weights) != 1:
        return f"the LM head reads {len(weights)} 2-D constants; expected its one frozen weight"
    (head_weight,) = weights
    by_layer: dict[int, list[torch.fx.Node]] = {}
    for n in nodes:
        i = layer_of(n)
        if i is not None:
            by_layer.setdefault(i, []).append(n)
    if len(by_layer) < 2 or sorted(by_layer) != list(range(len(by_layer))):
        return f"no decoder layers found (modules named ...layers.<i>: {sorted(by_layer)})"
    num_layers = len(by_layer)
    # The last layer's output: what the final norm reads from layer L - 1 (walk back from the LM head).
    last = _last_state(norm_out, num_layers - 1)
    if last is None:
        return "the LM head does not read the last decoder layer's output through a norm"
    shape = tuple(last.meta["val"].shape)
    states: list[torch.fx.Node] = []
    for i in range(num_layers):
        members = set(by_layer[i])
        entering = {a for n in by_layer[i] for a in n.all_input_nodes
                    if a not in members and isinstance(a.meta.get("val"), torch.Tensor)
                    and tuple(a.meta["val"].shape) == shape and a.meta["val"].is_floating_point()}
        if len(entering) != 1:
            return (f"decoder layer {i} reads {len(entering)} values of the hidden-state shape {list(shape)} from "
                    "outside it; expected one residual stream")
        (h,) = entering
        if i > 0 and layer_of(h) != i - 1:
            return f"decoder layer {i}'s input is not computed by layer {i - 1}"
        states.append(h)
    states.append(last)
    writes: list[list[torch.fx.Node]] = [[] for _ in range(num_layers)]
    for n in nodes:
        if n.target == aten.copy_.default and n.args[0].op == "placeholder":
            i = _writer_layer(n.args[1])
            if i is None:
                cannot_split = cannot_split or f"the graph writes input {n.args[0].name} from outside the decoder layers"
                continue
            writes[i].append(n)
    missing = [i for i, w in enumerate(writes) if not w]
    if missing and cannot_split is None:
        cannot_split = (f"decoder layer(s) {missing} write no static cache (no copy_ into a graph input): the cascade fills "
                "skipped layers' K/V slots of a static cache (pass a transformers StaticCache)")
    return DecoderGraph(states, writes, logits, head_weight, norm_out, cannot_split)


def _through_views(n: torch.fx.Node) -> torch.fx.Node:
    while n.op == "call_function" and n.target in VIEW_OPS and isinstance(n.args[0], torch.fx.Node):
        n = n.args[0]
    return n


def _in_lm_head(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and any(p.endswith("lm_head") for p in _stack_paths(n))


def _is_norm(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and layer_of(n) is None and any(p.endswith("norm") for p in _stack_paths(n))


def _ancestors(start: torch.fx.Node, stop: set[torch.fx.Node]) -> set[torch.fx.Node]:
    out, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n in out or n in stop:
            continue
        out.add(n)
        todo.extend(n.all_input_nodes)
    return out


def _norm_output(logits: torch.fx.Node) -> torch.fx.Node | None:
    """The last final-norm node before the LM head (walking back through the head and views)."""
    seen, todo = set(), [logits]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_norm(n):
            return n
        if _in_lm_head(n) or n.target in VIEW_OPS:
            todo.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return None


def _last_state(norm_out: torch.fx.Node, last_layer: int) -> torch.fx.Node | None:
    """The node of layer `last_layer` the final norm reads (the first one met walking back from its output)."""
    seen, todo = set(), [norm_out]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, torch.fx.Node):
            continue
        seen.add(n)
        if layer_of(n) == last_layer:
            return n
        if layer_of(n) is not None:
            return None
        todo.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return None


def _writer_layer(value: torch.fx.Node) -> int | None:
    """The layer that computed a written value (through views the write may read it by)."""
    while layer_of(value) is None and value.op == "call_function" and value.all_input_nodes \
            and value.target in (aten.alias.default, aten.view.default, aten.clone.default):
        value = value.args[0]
    return layer_of(value)
