"""`fuse-pointwise`: chains of pointwise ops and last-dim reductions -> kernels from our code generator.

The graph is partitioned (`codegen.partition`) into groups of nodes the code generator can compute; each group the
cost model says pays off becomes one `llmcompress::fused` call whose Triton source `codegen` generated from the
group's own aten nodes (and whose reference is those nodes).

"Pays off" is priced against how the chosen lowering would run the same nodes: under `lowering="eager"` each node
is a kernel (launch + a round trip of every intermediate), so a group of two or more kernels wins; Inductor fuses
such chains itself, so under `lowering="inductor"` our kernel only ties and the group is left to Inductor (it can
also fuse it with neighbours we do not see). `force` replaces every group the generator accepts, which is what
`lowering="triton"` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.fx

from llmcompress import codegen
from llmcompress.fx_utils import finish_rewrite
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.fusion.device import no_triton_reason
from llmcompress.passes.fusion.fused_call import insert_call
from llmcompress.passes.fusion.partition import partition


@dataclasses.dataclass(frozen=True)
class FusePointwiseOptions:
    force: bool = False
    """Replace every group the code generator accepts, whatever the cost model says."""
    dump_dir: str | None = None
    """Also write each generated kernel's source here, under a readable name (default: the backend option
    `dump_kernels`)."""
    version: ClassVar[int] = 1


def _name_hint(nodes: list[torch.fx.Node]) -> str:
    ops = []
    for n in nodes:
        op = getattr(n.target, "__name__", str(n.target)).split(".")[0].lstrip("_")
        if op not in ops and op not in ("to_copy", "alias", "clone"):
            ops.append(op)
    return "_".join(ops[:4]) or "fused"


def _rows(node: torch.fx.Node) -> tuple | None:
    """The leading shape the node's kernel rows span; None for a view (folded into a load's strides)."""
    if codegen.is_input_view(node):
        return None
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    return tuple(val.shape[:-1]) if isinstance(val, torch.Tensor) and val.dim() else None


def _trim_views(nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The group without views that only its outside users read: as kernel outputs they would be copies written
    for nothing (the rotary tables' per-layer `unsqueeze`s), where aten gives them free on the kernel's output."""
    members = list(nodes)
    while True:
        member_set = set(members)
        trailing = [n for n in members if codegen.is_input_view(n) and n.users and
                    not any(u in member_set for u in n.users)]
        if not trailing or len(trailing) == len(members):
            return members
        members = [n for n in members if n not in trailing]


def _only_views(nodes: list[torch.fx.Node], stats: dict[str, int]) -> bool:
    """A group of views computes nothing: as a kernel it would only copy what aten gives for free."""
    if all(codegen.is_input_view(n) for n in nodes):
        stats["kept: views only"] = stats.get("kept: views only", 0) + 1
        return True
    return False


def _culprit(nodes: list[torch.fx.Node], message: str) -> torch.fx.Node | None:
    """The group node a `CodegenError` message starts with ("unsqueeze_1: ..."), if any."""
    head = message.split(":", 1)[0].strip()
    return next((n for n in nodes if n.name == head), None)


def _kernels(costs: Any) -> int:
    return sum(1 for c in costs.nodes if c.kind != "free")


class FusePointwisePass(Pass):
    name = "fuse-pointwise"
    description = "Chains of pointwise ops with last-dim reductions -> one generated Triton kernel each"
    Options = FusePointwiseOptions
    after = ("canonicalize", "fold-into-weights", "fuse-sibling-linears", "quantize-linear", "fuse-linear-epilogue")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        decisions: list[dict[str, Any]] = []
        reason = None if self.options.force else no_triton_reason(ctx)
        if reason is not None:
            return PassResult(False, {f"skipped: {reason}": 1})

        def fusible(node: torch.fx.Node) -> bool:
            return codegen.fusible(node) is None

        worklist = [g for g in map(_trim_views, partition(gm.graph, fusible, _rows)) if not _only_views(g, stats)]
        lowering = ctx.config.lowering
        dump_dir = self.options.dump_dir or ctx.config.dump_kernels
        changed = False
        while worklist:
            nodes = worklist.pop(0)
            decision = self._price(nodes, ctx, lowering)
            if not (self.options.force or decision.get("fused")):
                stats["kept: no predicted gain"] = stats.get("kept: no predicted gain", 0) + 1
                decisions.append(decision)
                continue
            try:
                kernel = codegen.compile_group(nodes, name_hint=_name_hint(nodes), dump_dir=dump_dir)
            except codegen.CodegenError as e:
                culprit = _culprit(nodes, str(e))
                if culprit is not None and len(nodes) > 1:
                    # Leave out the node the generator names and partition the rest again.
                    stats["groups split"] = stats.get("groups split", 0) + 1
                    rest = set(nodes) - {culprit}
                    worklist[:0] = [g for g in map(_trim_views, partition(gm.graph, rest.__contains__, _rows))
                                    if not _only_views(g, stats)]
                    continue
                stats["kept: generator refused"] = stats.get("kept: generator refused", 0) + 1
                decisions.append({**decision, "fused": False, "reason": str(e)})
                continue
            if not kernel.inputs:  # e.g. a lone scalar_tensor: nothing to read, and no device to launch on
                stats["kept: no tensor input"] = stats.get("kept: no tensor input", 0) + 1
                decisions.append({**decision, "fused": False, "reason": "no tensor input"})
                continue
            insert_call(gm, kernel)
            decisions.append({**decision, "fused": True, "kernel": kernel.key, "source": str(kernel.source_path),
                              "inputs": len(kernel.inputs), "outputs": len(kernel.outputs)})
            stats["groups fused"] = stats.get("groups fused", 0) + 1
            stats["nodes fused"] = stats.get("nodes fused", 0) + len(nodes)
            changed = True
        if changed:
            finish_rewrite(gm)
        return PassResult(changed, stats, decisions)

    def _price(self, nodes: list[torch.fx.Node], ctx: PassContext, lowering: str) -> dict[str, Any]:
        """Predicted seconds of the group as the lowering runs it and as one generated kernel, with what fusing
        saves against running each node as its own kernel (the report's "bytes and launches saved")."""
        decision: dict[str, Any] = {"nodes": [n.name for n in nodes], "ops": _name_hint(nodes)}
        model = ctx.cost_model
        if model is None:
            return {**decision, "fused": False, "reason": "no cost model"}
        try:
            separate = model.estimate(nodes, ctx.sizes)
            fused = model.group_cost(nodes, ctx.sizes)
            # A fusing lowering runs such a chain as one kernel of its own: ours then costs what that one costs.
            before = model.lowered_cost(nodes, lowering, ctx.sizes).total("time_s")
            after = float(fused.time_s)
        except Exception as e:  # noqa: BLE001 - a pricing gap keeps the group as it is
            return {**decision, "fused": False, "reason": f"cost model: {type(e).__name__}: {e}"}
        return {**decision, "before_s": before, "after_s": after, "fused": after < before,
                "bytes_saved": separate.total("bytes") - float(fused.bytes),
                "launches_saved": max(_kernels(separate) - 1, 0)}
