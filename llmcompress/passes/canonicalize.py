"""`canonicalize`: bring every linear layer into one node form, and a few other spellings into the form later
passes match on.

Canonical linear: ``aten.linear.default(x, w, bias)`` where ``w`` is a frozen weight of shape (N, K) (a get_attr,
or ``aten.t`` of a (K, N) weight stored transposed as in GPT-2's Conv1D), ``bias`` is None or a 1-D (N,) tensor, and
``x`` has any rank (the leading dims are not flattened). The node's ``meta["llmcompress.linear"]`` names the weight.

Spellings recognised (after Dynamo and AOT autograd turned them into aten ops):
``F.linear`` (2-D and N-D input, with and without bias), ``x @ w.T (+ b)``, ``torch.matmul(x, w.t())``,
``torch.addmm(b, x, w.t())``, ``torch.mm``, ``x @ w_kn`` and ``addmm(b, x, w_kn)`` on a transposed-stored weight.
Also ``x * sigmoid(x)`` -> ``aten.silu``.

Lowering turns ``aten.linear`` back into the mm/addmm Inductor expects (`backend/lowering.py`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar

import torch
import torch.fx

from llmcompress.fx_utils import RESHAPE_OPS, call, fake_mode_of, finish_rewrite, only_user, same_shape, same_size, val
from llmcompress.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)
LINEAR_META = "llmcompress.linear"


def _is_2d_transpose(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return False
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1] and val(node).dim() == 2
    return True


class CanonicalizePass(Pass):
    """See the module docstring."""

    name: ClassVar[str] = "canonicalize"
    description: ClassVar[str] = "Rewrite every linear layer spelling into aten.linear(x, W, b) on a frozen weight."

    @dataclasses.dataclass(frozen=True)
    class Options:
        version: ClassVar[int] = 1
        linear: bool = True
        """Canonicalize mm/addmm on frozen weights into aten.linear."""
        activations: bool = True
        """Canonicalize x * sigmoid(x) into aten.silu."""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: collections.Counter[str] = collections.Counter()
        decisions = []
        fake_mode = fake_mode_of(gm) or ctx.fake_mode
        if self.options.linear:
            for node in list(gm.graph.nodes):
                if node.op == "call_function" and node.target in (aten.mm.default, aten.addmm.default):
                    linear = self._linear_from_mm(gm, node, ctx, fake_mode, stats)
                    if linear is not None:
                        decisions.append({"node": linear.name, "weight": linear.meta[LINEAR_META], "kind": "linear"})
            for node in list(gm.graph.nodes):
                if node.op == "call_function" and node.target is aten.add.Tensor:
                    if self._fold_bias(gm, node, ctx, fake_mode):
                        stats["bias folded"] += 1
        if self.options.activations:
            for node in list(gm.graph.nodes):
                if node.op == "call_function" and node.target is aten.mul.Tensor and self._silu(gm, node, fake_mode):
                    stats["silu"] += 1
        finish_rewrite(gm)
        changed = sum(v for k, v in stats.items() if not k.startswith("skipped")) > 0
        return PassResult(changed, dict(stats), decisions)

    def _linear_from_mm(self, gm, node, ctx, fake_mode, stats) -> torch.fx.Node | None:
        if node.target is aten.addmm.default:
            bias, a, b = node.args[:3]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                stats["skipped: addmm with alpha/beta"] += 1
                return None
        else:
            bias, (a, b) = None, node.args[:2]
        if not ctx.weights.is_constant(b):
            return None  # an activation-by-activation product (attention), not a layer
        if bias is not None and (val(bias) is None or val(bias).dim() != 1):
            stats["skipped: addmm bias not 1-D"] += 1
            return None
        n_out = val(b).shape[1]
        graph = gm.graph
        with graph.inserting_before(node):
            if _is_2d_transpose(b) and ctx.weights.is_constant(b.args[0]):
                weight = b.args[0]
            else:
                weight = call(graph, fake_mode, aten.t.default, (b,))
                stats["transposed-stored weight"] += 1
        # Un-flatten: view(x, [M, K]) -> mm -> view(., [*lead, N]) becomes linear(x) on x's own shape.
        x, out_view = a, None
        user = only_user(node)
        if (
            a.op == "call_function" and a.target in RESHAPE_OPS and isinstance(a.args[0], torch.fx.Node)
            and user is not None and user.op == "call_function" and user.target in RESHAPE_OPS
        ):
            src = val(a.args[0])
            if src is not None and src.dim() > 2 and same_shape(val(user).shape, (*src.shape[:-1], n_out)):
                x, out_view = a.args[0], user
        replaced = out_view or node
        with graph.inserting_before(replaced):
            linear = call(graph, fake_mode, aten.linear.default, (x, weight, bias))
        linear.meta[LINEAR_META] = ctx.weights.name(weight)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in node.meta:
                linear.meta[key] = node.meta[key]
        replaced.replace_all_uses_with(linear)
        if out_view is not None:
            graph.erase_node(out_view)
        graph.erase_node(node)
        stats["linear"] += 1
        return linear

    def _fold_bias(self, gm, node, ctx, fake_mode) -> bool:
        """linear(x, w) + b, with b a constant (N,), -> linear(x, w, b)."""
        lin, bias = node.args[:2] if len(node.args) >= 2 else (None, None)
        if node.kwargs.get("alpha", 1) != 1 or not isinstance(lin, torch.fx.Node) or not isinstance(bias, torch.fx.Node):
            return False
        if lin.target is not aten.linear.default and bias.target is aten.linear.default:
            lin, bias = bias, lin
        if lin.target is not aten.linear.default or len(lin.users) != 1 or (len(lin.args) > 2 and lin.args[2] is not None):
            return False
        b = val(bias)
        if not ctx.weights.is_constant(bias) or b.dim() != 1 or not same_size(b.shape[0], val(lin).shape[-1]):
            return False
        if b.dtype != val(lin).dtype or val(node).dtype != val(lin).dtype:
            return False  # the add would promote: keep it as written
        with gm.graph.inserting_before(node):
            folded = call(gm.graph, fake_mode, aten.linear.default, (lin.args[0], lin.args[1], bias))
        folded.meta.update({k: v for k, v in lin.meta.items() if k != "val"})
        node.replace_all_uses_with(folded)
        gm.graph.erase_node(node)
        gm.graph.erase_node(lin)
        return True

    def _silu(self, gm, node, fake_mode) -> bool:
        a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
        for x, s in ((a, b), (b, a)):
            if isinstance(s, torch.fx.Node) and s.target is aten.sigmoid.default and s.args[0] is x:
                with gm.graph.inserting_before(node):
                    silu = call(gm.graph, fake_mode, aten.silu.default, (x,))
                node.replace_all_uses_with(silu)
                gm.graph.erase_node(node)
                return True
        return False
