"""`probe-graph`: a pass that records the graph it sees, so tests can assert on the structure other passes left.

Import this module to register it; add ``"probe-graph"`` after the passes under test.
"""

from __future__ import annotations

import collections
from typing import ClassVar

import torch

from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.registry import register_pass


@register_pass
class ProbeGraphPass(Pass):
    name: ClassVar[str] = "probe-graph"
    description: ClassVar[str] = "Record each graph's op counts and code (for tests); changes nothing."
    seen: ClassVar[list[dict]] = []

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
        type(self).seen.append({
            "ops": ops,
            "code": gm.code,
            "linear_weights_constant": [ctx.weights.is_constant(n.args[1]) for n in linears],
            "graph_id": ctx.graph_id,
            "weights": len(ctx.weights),
        })
        return PassResult(False)


def ops_of_last_graph() -> collections.Counter[str]:
    return ProbeGraphPass.seen[-1]["ops"]
