"""Put a generated kernel into the graph: `insert_call(gm, kernel)` replaces a group's nodes by one
`llmcompress::fused` call. The code generator (`codegen/`) only makes kernels; rewriting graphs is the passes' job."""

from __future__ import annotations

import operator

import torch
import torch.fx

from llmcompress.codegen import CodegenError, FusedKernel
from llmcompress.fx_utils import call, fake_mode_of


def insert_call(gm: torch.fx.GraphModule, kernel: FusedKernel) -> list[torch.fx.Node]:
    """Replace the group's nodes in `gm` by one `llmcompress::fused` call; returns its getitem nodes, one per output.

    The call goes before the first node outside the group that reads an output; nodes after that point that the
    group's inputs depend on are moved before it (a group that is not convex raises CodegenError).
    """
    graph = gm.graph
    members = set(kernel.group.nodes)
    if any(n.graph is not graph or n._erased for n in members):
        raise CodegenError(f"fused kernel {kernel.key}: its nodes are not all in this graph any more")
    fake_mode = fake_mode_of(gm)
    if fake_mode is None:
        raise CodegenError("the graph has no fake values (meta['val']) to type the fused call with")
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = [u for o in kernel.outputs for u in o.users if u not in members]
    anchor = min(readers, key=order.__getitem__)
    late: dict[torch.fx.Node, None] = {}
    stack = [x for x in kernel.inputs if order[x] >= order[anchor]]
    while stack:
        x = stack.pop()
        if x in late or order[x] < order[anchor]:
            continue
        if x in members or any(a in members for a in x.all_input_nodes):
            raise CodegenError(f"fused kernel {kernel.key}: the group is not convex ({x.name} reads the group and "
                               "feeds it)")
        late[x] = None
        stack.extend(x.all_input_nodes)
    for x in sorted(late, key=order.__getitem__):
        anchor.prepend(x)
    with graph.inserting_before(anchor):
        fused = call(graph, fake_mode, torch.ops.llmcompress.fused.default, (kernel.key, list(kernel.inputs)))
        # Provenance of the group's first node: reports attribute the kernel to that module (layer).
        first = kernel.group.nodes[0]
        for key in ("stack_trace", "nn_module_stack"):
            if first.meta.get(key) is not None:
                fused.meta[key] = first.meta[key]
        results = [call(graph, fake_mode, operator.getitem, (fused, i)) for i in range(len(kernel.outputs))]
    for o, r in zip(kernel.outputs, results):
        o.replace_all_uses_with(r, delete_user_cb=lambda u: u not in members)
    for n in reversed(kernel.group.nodes):
        graph.erase_node(n)
    return results
