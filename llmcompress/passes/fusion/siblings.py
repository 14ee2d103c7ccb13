"""`fuse-sibling-linears`: linears that read the same input (q/k/v, gate/up projections) become one linear on their
concatenated weights, followed by slices of its output along the last dim.

Entry point: `FuseSiblingLinearsPass` ("fuse-sibling-linears"). One GEMM reads the input once and launches once
instead of once per sibling; at M = 1 (decode) the launches are most of the saving. The cost model decides each
group: predicted time of the separate linears against the fused one (priced as a candidate node before anything is
derived).

Siblings: two or more canonical linears on the same input node, frozen 2-D weights of the same dtype, K and device,
biases all frozen or absent (a missing one is zero-filled). A member whose output reaches the graph output through
views only stays apart (the slices would make two outputs alias one tensor).

Because this runs before `quantize-linear`, a quantizing recipe quantizes the fused linear as one layer (per-channel
and per-group quantization do not mix rows, so the result equals quantizing the members one by one). The fused
weight is named from its members, ``model.layers.0.self_attn.q_proj+k_proj+v_proj.weight`` (`fused_name`);
`quantize-linear` matches a skip or override pattern against each member (`member_names`): a pattern that matches
any member applies to the whole fused layer.
"""

from __future__ import annotations

import collections
from typing import Any, ClassVar

import torch
import torch.fx

from llmcompress.fx_utils import call, fake_mode_of, finish_rewrite, fused_name, reaches_output, refresh_meta
from llmcompress.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten


class FuseSiblingLinearsPass(Pass):
    """See the module docstring."""

    name: ClassVar[str] = "fuse-sibling-linears"
    description: ClassVar[str] = ("Linears reading the same input (q/k/v, gate/up) -> one linear on concatenated "
                                  "weights, sliced along the last dim")
    after: ClassVar[tuple[str, ...]] = ("canonicalize", "fold-into-weights")
    before: ClassVar[tuple[str, ...]] = ("quantize-linear",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: collections.Counter[str] = collections.Counter()
        decisions: list[dict[str, Any]] = []
        fake_mode = fake_mode_of(gm) or ctx.fake_mode
        refresh: set[torch.fx.Node] = set()
        for group in self._groups(gm, ctx, stats):
            layers = [ctx.weights.name(n.args[1]) for n in group]
            decision: dict[str, Any] = {"node": group[0].name, "layers": layers}
            try:
                fused = self._pays(ctx, fake_mode, group, decision)
            except Exception as e:  # noqa: BLE001 - a pricing gap: leave the group as it is, say why
                decision["cost_error"] = f"{type(e).__name__}: {e}"
                fused = False
            decision["fused"] = fused
            decisions.append(decision)
            if not fused:
                stats["skipped: cost model error" if "cost_error" in decision else "skipped: cost model: slower"] += 1
                continue
            refresh |= self._fuse(gm, ctx, fake_mode, group)
            stats["fused groups"] += 1
            stats["fused linears"] += len(group)
        changed = stats["fused groups"] > 0
        if changed:
            gm.graph.eliminate_dead_code()  # before the refresh: nodes left dead need no new fake value
            reshaped = refresh_meta(gm, fake_mode, refresh)
            if reshaped:
                stats["view -> reshape"] += reshaped
            finish_rewrite(gm)
        return PassResult(changed, dict(stats), decisions)

    def _groups(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: collections.Counter
                ) -> list[list[torch.fx.Node]]:
        by_input: dict[torch.fx.Node, list[torch.fx.Node]] = collections.defaultdict(list)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is aten.linear.default and not node.kwargs and \
                    isinstance(node.args[0], torch.fx.Node):
                by_input[node.args[0]].append(node)
        groups = []
        for linears in by_input.values():
            if len(linears) < 2:
                continue
            kinds: dict[tuple, list[torch.fx.Node]] = collections.defaultdict(list)
            for lin in linears:
                reason = self._unfusable(ctx, lin)
                if reason is not None:
                    stats[f"skipped: {reason}"] += 1
                    continue
                w = lin.args[1].meta["val"]
                kinds[(w.dtype, w.shape[1], w.device)].append(lin)
            for members in kinds.values():
                if len(members) >= 2:
                    groups.append(members)
                else:
                    stats["skipped: no sibling of the same dtype and K"] += 1
        return groups

    @staticmethod
    def _unfusable(ctx: PassContext, lin: torch.fx.Node) -> str | None:
        w, bias = lin.args[1], (lin.args[2] if len(lin.args) > 2 else None)
        if not ctx.weights.is_constant(w):
            return "weight not frozen"
        wv = w.meta["val"]
        if wv.dim() != 2:
            return "weight not 2-D"
        if bias is not None and (not ctx.weights.is_constant(bias) or bias.meta["val"].dim() != 1
                                 or bias.meta["val"].dtype != wv.dtype):
            return "bias not frozen"
        if reaches_output(lin):
            return "output is a graph output"
        return None

    @staticmethod
    def _pays(ctx: PassContext, fake_mode: Any, group: list[torch.fx.Node], decision: dict[str, Any]) -> bool:
        """Whether the cost model predicts the fused linear faster than the separate ones (True without one)."""
        if ctx.cost_model is None:
            decision["note"] = "no cost model"
            return True
        w = group[0].args[1].meta["val"]
        n = sum(m.args[1].meta["val"].shape[0] for m in group)
        has_bias = any(len(m.args) > 2 and m.args[2] is not None for m in group)
        with fake_mode:
            w_cat = torch.empty((n, w.shape[1]), dtype=w.dtype, device=w.device)
            b_cat = torch.empty((n,), dtype=w.dtype, device=w.device) if has_bias else None
        cm, lowering = ctx.cost_model, ctx.config.lowering
        after = cm.candidate_cost(aten.linear.default, (group[0].args[0], w_cat, b_cat), fake_mode, ctx.sizes)
        before_s = cm.lowered_cost(group, lowering, ctx.sizes).total("time_s")
        after_s = cm.lowered_cost([after], lowering, ctx.sizes).total("time_s")
        decision.update(before_s=before_s, after_s=after_s)
        return after_s < before_s

    def _fuse(self, gm: torch.fx.GraphModule, ctx: PassContext, fake_mode: Any, group: list[torch.fx.Node]
              ) -> set[torch.fx.Node]:
        """Rewrite the group; returns the nodes that now read a slice (their fake values need refreshing)."""
        weights = ctx.weights
        w_nodes = [m.args[1] for m in group]
        b_nodes = [m.args[2] if len(m.args) > 2 else None for m in group]
        sizes = [int(w.meta["val"].shape[0]) for w in w_nodes]
        names = [weights.name(w) or w.name for w in w_nodes]
        w_cat = weights.derive(w_nodes, self.cache_key("cat"), lambda ws: torch.cat(ws, dim=0))
        b_cat = None
        if any(b is not None for b in b_nodes):
            present = [b for b in b_nodes if b is not None]
            mask = tuple(b is not None for b in b_nodes)
            dtype = w_nodes[0].meta["val"].dtype

            def cat_bias(bs: list[torch.Tensor]) -> torch.Tensor:
                it = iter(bs)
                return torch.cat([next(it) if has else torch.zeros(n, dtype=dtype, device=bs[0].device)
                                  for has, n in zip(mask, sizes)])

            b_cat = weights.derive(present, self.cache_key("cat", mask, tuple(sizes)), cat_bias)
        name = fused_name(names)
        first = group[0]  # groups keep graph order: the first member comes after the input, before the others
        graph = gm.graph
        with graph.inserting_before(first):
            w_node = weights.add(gm, w_cat, name)
            b_node = None if b_cat is None else weights.add(gm, b_cat, name.removesuffix("weight") + "bias")
            fused = call(graph, fake_mode, aten.linear.default, (first.args[0], w_node, b_node))
            fused.meta.update({k: v for k, v in first.meta.items() if k not in ("val", "llmcompress.linear")})
            fused.meta["llmcompress.linear"] = name
            slices, start = [], 0
            for member, n in zip(group, sizes):
                s = call(graph, fake_mode, aten.slice.Tensor, (fused, -1, start, start + n))
                for key in ("stack_trace", "nn_module_stack"):
                    if key in member.meta:
                        s.meta[key] = member.meta[key]
                slices.append(s)
                start += n
        readers: set[torch.fx.Node] = set()
        for member, s in zip(group, slices):
            readers |= set(member.users)
            member.replace_all_uses_with(s)
            graph.erase_node(member)
        return readers


__all__ = ["FuseSiblingLinearsPass"]
