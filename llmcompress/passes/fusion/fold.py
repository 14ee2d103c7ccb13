"""`fold-into-weights`: fold constant scales into the frozen weights of the linears they feed, removing kernels.

Entry point: `FoldIntoWeightsPass` ("fold-into-weights"). Each fold is exact in real arithmetic; what changes is
the rounding: the product is rounded once into the weight's dtype (computed in float32) instead of into the
activation on every call.

* norm scale: ``mul(γ, h)`` (the last step of RMSNorm; γ a frozen (K,) vector, or a Python number / 1-element
  constant) whose every user is a linear on a frozen weight, directly or through reshapes that keep the last dim
  and slices of whole rows:
  ``W' = W·diag(γ)`` and the linears read h. The mul disappears.
* layer-norm affine: ``native_layer_norm(x, [K], γ, β, eps)`` whose output feeds only such linears:
  ``W' = W·diag(γ)``, ``b' = b + W·β``, and the layer norm keeps no affine.
* scale after a linear: ``linear(x, W, b) * s`` -> ``linear(x, s·W, s·b)`` (OPT's query scaling).
* identity: ``x * 1`` -> x (Llama's rotary ``attention_scaling`` of 1.0).
* round-trip cast: ``x.to(wider).to(x.dtype)`` -> x (exact: the widening cast loses nothing).

A fold never fires when the mul would promote (``mul(γ fp32, h bf16)`` is fp32: the linear would see another
dtype), when a user is not such a linear (the residual path, an output), or when the scaled weight would overflow or
flush a nonzero entry to zero. Every fold is priced with the cost model (the removed kernels' predicted seconds and
bytes as the lowering runs them, `CostModel.lowered_cost`) and recorded in the decisions; a fold that only removes
work always wins.
"""

from __future__ import annotations

import collections
import math
import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.fx

from llmcompress.fx_utils import (
    MULTI_VIEW_OPS,
    RESHAPE_OPS,
    VIEW_OPS,
    call,
    fake_mode_of,
    finish_rewrite,
    reaches_output,
    refresh_meta,
    same_shape,
    same_size,
    val,
)
from llmcompress.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten
_MULS = (aten.mul.Tensor, aten.mul.Scalar)
# Ops whose result may share its input's memory: replacing such a node by its input is no fresh tensor.
_VIEWS = VIEW_OPS | MULTI_VIEW_OPS | {operator.getitem}
# Casts that represent every value of the source dtype exactly.
_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
             (torch.float16, torch.float64), (torch.float32, torch.float64)}


def _is_number(c: Any) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)


def _scaled(w: torch.Tensor, scale: Any) -> torch.Tensor | None:
    """`w * scale` (scale broadcast along w's last dim) rounded once to w's dtype, computed in at least float32;
    None when a finite entry overflows or a nonzero entry times a nonzero scale flushes to zero."""
    acc = torch.promote_types(w.dtype, torch.float32)
    s = scale.to(acc) if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=acc, device=w.device)
    out = (w.to(acc) * s).to(w.dtype)
    if out.is_meta:
        return out.contiguous()  # a cost report's trace on the meta device: no values to check
    overflowed = torch.isfinite(w) & ~torch.isfinite(out)
    flushed = (w != 0) & (s != 0) & (out == 0)
    return None if bool((overflowed | flushed).any()) else out.contiguous()


def _bias_through(w: torch.Tensor, b: torch.Tensor | None, beta: torch.Tensor) -> torch.Tensor | None:
    """b + W·β (the layer norm's shift pushed through the linear), in at least float32, rounded once."""
    acc = torch.promote_types(w.dtype, torch.float32)
    out = w.to(acc) @ beta.to(acc)
    if b is not None:
        out = out + b.to(acc)
    out = out.to(w.dtype)
    return out if out.is_meta or bool(torch.isfinite(out).all()) else None


class FoldIntoWeightsPass(Pass):
    """See the module docstring."""

    name: ClassVar[str] = "fold-into-weights"
    description: ClassVar[str] = ("Fold norm scales, layer-norm affines and scalar multiplications into the weights "
                                  "of the linears they feed; drop x*1 and lossless cast round trips")
    after: ClassVar[tuple[str, ...]] = ("canonicalize",)
    before: ClassVar[tuple[str, ...]] = ("fuse-sibling-linears", "quantize-linear")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self._gm, self._ctx = gm, ctx
        self._fake_mode = fake_mode_of(gm) or ctx.fake_mode
        self._stats: collections.Counter[str] = collections.Counter()
        self._decisions: list[dict[str, Any]] = []
        self._refresh: set[torch.fx.Node] = set()
        erased: set[torch.fx.Node] = set()
        # Cleanups first, so that a scale hidden behind `* 1` or a cast round trip is seen by the folds after.
        for rule in (self._identity, self._scale_after_linear, self._scale_before_linears, self._layer_norm):
            for node in list(gm.graph.nodes):
                if node not in erased and node.op == "call_function":
                    erased |= rule(node)
        changed = any(v for k, v in self._stats.items() if not k.startswith("skipped"))
        if changed:
            gm.graph.eliminate_dead_code()  # before the refresh: nodes left dead need no new fake value
            reshaped = refresh_meta(gm, self._fake_mode, self._refresh)
            if reshaped:
                self._stats["view -> reshape"] += reshaped
            finish_rewrite(gm)
        return PassResult(changed, dict(self._stats), self._decisions)

    def _price(self, items: Sequence[Any]) -> tuple[float, float] | None:
        """(seconds, bytes) of graph nodes and candidate kernels as the lowering runs them; None without a cost
        model."""
        cm, ctx = self._ctx.cost_model, self._ctx
        if cm is None:
            return None
        cost = cm.lowered_cost(items, ctx.config.lowering, ctx.sizes)
        return cost.total("time_s"), cost.total("bytes")

    def _record(self, kind: str, node: torch.fx.Node, removed: Sequence[Any], added: Sequence[Any] = (),
                **extra: Any) -> bool:
        """Price the removed kernels against the added ones; count and record the fold. Returns whether it pays."""
        decision: dict[str, Any] = {"node": node.name, "kind": kind, **extra}
        try:
            before, after = self._price(removed), self._price(added)
        except Exception as e:  # noqa: BLE001 - a gap in the cost model must not block an exact fold
            before = after = None
            decision["cost_error"] = f"{type(e).__name__}: {e}"
        if before is not None and after is not None:
            decision.update(saved_s=before[0] - after[0], saved_bytes=before[1] - after[1])
            if after[0] > before[0]:
                self._stats["skipped: cost model: slower"] += 1
                self._decisions.append({**decision, "skipped": "cost model: slower"})
                return False
        self._stats[kind] += 1
        self._decisions.append(decision)
        return True

    def _skip(self, kind: str, node: torch.fx.Node, reason: str, **extra: Any) -> set:
        self._stats[f"skipped: {reason}"] += 1
        self._decisions.append({"node": node.name, "kind": kind, **extra, "skipped": reason})
        return set()

    def _replace(self, node: torch.fx.Node, by: torch.fx.Node) -> set:
        self._refresh.update(node.users)
        node.replace_all_uses_with(by)
        self._gm.graph.erase_node(node)
        return {node}

    # --- identity: x * 1, x.to(wider).to(x.dtype) ---------------------------------------------------------------

    def _identity(self, node: torch.fx.Node) -> set:
        if node.target in _MULS and len(node.args) == 2:
            a, b = node.args
            x, one = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
            kind = "identity mul"
            if not (isinstance(x, torch.fx.Node) and _is_number(one) and one == 1):
                return set()
        elif node.target is aten._to_copy.default and self._round_trip(node):
            x, kind = node.args[0].args[0], "round-trip cast"
        else:
            return set()
        out, xv = val(node), val(x)
        if not (isinstance(xv, torch.Tensor) and out.dtype == xv.dtype and same_shape(out.shape, xv.shape)):
            return set()
        # Safe to return x itself only if x is a fresh tensor that nothing else reads (else two outputs, or an
        # output and an input, would share memory).
        fresh = x.op == "call_function" and x.target not in _VIEWS and len(x.users) == 1
        if not fresh and reaches_output(node):
            return self._skip(kind, node, "would alias an output")
        removed = [node] if kind == "identity mul" or len(node.args[0].users) > 1 else [node.args[0], node]
        if not self._record(kind, node, removed):
            return set()
        return self._replace(node, x)

    @staticmethod
    def _round_trip(node: torch.fx.Node) -> bool:
        inner = node.args[0]
        if not (isinstance(inner, torch.fx.Node) and inner.target is aten._to_copy.default):
            return False
        x = inner.args[0]
        xv, mid, out = val(x), val(inner), val(node)
        if not all(isinstance(t, torch.Tensor) for t in (xv, mid, out)):
            return False
        for cast in (inner, node):
            extra = set(cast.kwargs) - {"dtype", "device", "layout", "memory_format"}
            if extra or len(cast.args) != 1 or cast.kwargs.get("layout", torch.strided) != torch.strided or \
                    cast.kwargs.get("memory_format", torch.preserve_format) != torch.preserve_format:
                return False
        return (xv.dtype, mid.dtype) in _WIDENING and out.dtype == xv.dtype and \
            xv.device == mid.device == out.device

    # --- a scale after a linear ---------------------------------------------------------------------------------

    def _scale_of(self, c: Any, k: Any = None) -> tuple[str, Any] | None:
        """('number', c) for a Python number, ('tensor', node) for a frozen 1-element constant or, when `k` is
        given, a frozen (K,) vector; else None."""
        if _is_number(c):
            return "number", c
        v = val(c)
        if not (isinstance(v, torch.Tensor) and v.is_floating_point() and self._ctx.weights.is_constant(c)):
            return None
        if v.numel() == 1 and v.dim() <= 1:
            return "tensor", c
        if k is not None and v.dim() == 1 and same_size(v.shape[0], k):
            return "tensor", c
        return None

    def _scaled_weight(self, w: torch.fx.Node, scale: tuple[str, Any], what: str) -> torch.Tensor | None:
        kind, c = scale
        weights = self._ctx.weights
        if kind == "number":
            return weights.derive(w, self.cache_key(what, float(c)), lambda t: _scaled(t, c))
        return weights.derive([w, c], self.cache_key(what), lambda ts: _scaled(ts[0], ts[1]))

    def _scale_after_linear(self, node: torch.fx.Node) -> set:
        if node.target not in _MULS or len(node.args) != 2:
            return set()
        a, b = node.args
        lin, c = (a, b) if getattr(a, "target", None) is aten.linear.default else (b, a)
        if not (isinstance(lin, torch.fx.Node) and lin.target is aten.linear.default and not lin.kwargs):
            return set()
        scale = self._scale_of(c)
        kind = "scale after linear"
        if scale is None:
            return set()  # linear * activation is a gate, not a scale
        w, bias = lin.args[1], (lin.args[2] if len(lin.args) > 2 else None)
        out, lv = val(node), val(lin)
        if not self._ctx.weights.is_constant(w) or (bias is not None and not self._ctx.weights.is_constant(bias)):
            return self._skip(kind, node, "weight not frozen")
        if len(lin.users) != 1:
            return self._skip(kind, node, "linear output used elsewhere")
        if out.dtype != lv.dtype or not same_shape(out.shape, lv.shape):
            return self._skip(kind, node, "dtype promotion")
        new_w = self._scaled_weight(w, scale, "scale")
        new_b = None if bias is None else self._scaled_weight(bias, scale, "scale")
        if new_w is None or (bias is not None and new_b is None):
            return self._skip(kind, node, "scaled weight overflows or underflows")
        if not self._record(kind, node, [node], layers=[self._ctx.weights.name(w)]):
            return set()
        with self._gm.graph.inserting_before(lin):
            w_node = self._ctx.weights.add(self._gm, new_w, self._ctx.weights.name(w))
            b_node = None if bias is None else self._ctx.weights.add(self._gm, new_b, self._ctx.weights.name(bias))
        lin.args = (lin.args[0], w_node, b_node)
        return self._replace(node, lin)

    # --- a scale before linears (RMSNorm's γ) -------------------------------------------------------------------

    def _linear_users(self, node: torch.fx.Node, k: Any, keep_last_dim: bool) -> list[torch.fx.Node] | str:
        """The linears `node` feeds as input (through reshapes), or why it feeds something else."""
        linears, stack = [], [node]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u.op == "call_function" and u.target in RESHAPE_OPS and u.args[0] is n:
                    if keep_last_dim and not same_size(val(u).shape[-1], k):
                        return "a reshape that splits rows"
                    stack.append(u)
                elif u.op == "call_function" and u.target in (aten.slice.Tensor, aten.select.int) and \
                        u.args[0] is n and (u.args[1] if len(u.args) > 1 else 0) % val(n).dim() != val(n).dim() - 1:
                    stack.append(u)  # rows picked whole (the last token's hidden state before lm_head)
                elif u.op == "call_function" and u.target is aten.linear.default and u.args[0] is n and \
                        n not in u.args[1:] and not u.kwargs:
                    if not self._ctx.weights.is_constant(u.args[1]) or val(u.args[1]).dim() != 2:
                        return "a linear on a weight that is not frozen"
                    bias = u.args[2] if len(u.args) > 2 else None
                    if bias is not None and not self._ctx.weights.is_constant(bias):
                        return "a linear on a bias that is not frozen"
                    linears.append(u)
                else:
                    return "a user that is not a linear"
        return linears or "no linear user"

    def _scale_before_linears(self, node: torch.fx.Node) -> set:
        if node.target not in _MULS or len(node.args) != 2:
            return set()
        a, b = node.args
        out = val(node)
        for h, c in ((b, a), (a, b)):
            hv = val(h)
            if not (isinstance(hv, torch.Tensor) and hv.dim() >= 1 and hv.is_floating_point()) or \
                    self._ctx.weights.is_constant(h):
                continue
            scale = self._scale_of(c, hv.shape[-1])
            if scale is not None:
                break
        else:
            return set()
        vector = scale[0] == "tensor" and val(c).numel() > 1
        kind = "norm scale" if vector else "scale before linear"
        users = self._linear_users(node, hv.shape[-1], keep_last_dim=vector)
        if isinstance(users, str):
            # Counted only where a linear is in reach: a scalar mul elsewhere (GELU's 0.5) is not a candidate.
            if vector or users.startswith("a linear"):
                return self._skip(kind, node, users)
            return set()
        if out.dtype != hv.dtype or not same_shape(out.shape, hv.shape):
            return self._skip(kind, node, "dtype promotion")
        new_weights = [self._scaled_weight(lin.args[1], scale, "scale in") for lin in users]
        if any(w is None for w in new_weights):
            return self._skip(kind, node, "scaled weight overflows or underflows")
        layers = [self._ctx.weights.name(lin.args[1]) for lin in users]
        if not self._record(kind, node, [node], layers=layers):
            return set()
        for lin, new_w in zip(users, new_weights):
            with self._gm.graph.inserting_before(lin):
                w_node = self._ctx.weights.add(self._gm, new_w, self._ctx.weights.name(lin.args[1]))
            lin.args = (lin.args[0], w_node, *lin.args[2:])
        return self._replace(node, h)

    # --- LayerNorm's affine -------------------------------------------------------------------------------------

    def _layer_norm(self, node: torch.fx.Node) -> set:
        if node.target is not aten.native_layer_norm.default or len(node.args) != 5:
            return set()
        x, shape, gamma, beta, eps = node.args
        kind = "layer-norm affine"
        if gamma is None and beta is None:
            return set()
        if len(shape) != 1:
            return self._skip(kind, node, "normalized over more than the last dim")
        if any(p is not None and self._scale_of(p, shape[0]) is None for p in (gamma, beta)):
            return self._skip(kind, node, "affine not frozen")
        if any(u.target is not operator.getitem for u in node.users):
            return self._skip(kind, node, "a user that is not a linear")
        users: list[torch.fx.Node] = []
        for out in (u for u in node.users if u.args[1] == 0):  # mean and rstd (1, 2) do not depend on the affine
            found = self._linear_users(out, shape[0], keep_last_dim=True)
            if isinstance(found, str):
                return self._skip(kind, node, found)
            users += found
        if not users:
            return set()
        weights, ok = self._ctx.weights, True
        plans = []
        for lin in users:
            w, bias = lin.args[1], (lin.args[2] if len(lin.args) > 2 else None)
            new_w = None if gamma is None else self._scaled_weight(w, ("tensor", gamma), "scale in")
            new_b = None
            if beta is not None:
                nodes = [w, beta] + ([bias] if bias is not None else [])
                new_b = weights.derive(nodes, self.cache_key("shift in", bias is not None),
                                       lambda ts: _bias_through(ts[0], ts[2] if len(ts) > 2 else None, ts[1]))
            ok = ok and (gamma is None or new_w is not None) and (beta is None or new_b is not None)
            plans.append((lin, w, bias, new_w, new_b))
        if not ok:
            return self._skip(kind, node, "scaled weight overflows or underflows")
        # Price: the layer norm with and without its affine, and the linears that gain a bias.
        cm, sizes, note = self._ctx.cost_model, self._ctx.sizes, {}
        added: list[Any] | None = None
        try:
            if cm is not None:
                added = [cm.candidate_cost(aten.native_layer_norm.default, (x, shape, None, None, eps),
                                           self._fake_mode, sizes)]
                for lin, w, bias, _, new_b in plans:
                    if bias is None and new_b is not None:
                        b_fake = self._fake_mode.from_tensor(new_b, static_shapes=True)
                        added.append(cm.candidate_cost(aten.linear.default, (lin.args[0], w, b_fake),
                                                       self._fake_mode, sizes))
                    else:
                        added.append(lin)
        except Exception as e:  # noqa: BLE001 - a gap in the cost model must not block an exact fold
            added, note = None, {"cost_error": f"{type(e).__name__}: {e}"}
        removed = [node, *(lin for lin, *_ in plans)] if added is not None else []
        if not self._record(kind, node, removed, added or [], layers=[weights.name(w) for _, w, *_ in plans], **note):
            return set()
        for lin, w, bias, new_w, new_b in plans:
            name = weights.name(w) or w.name
            with self._gm.graph.inserting_before(lin):
                w_node = w if new_w is None else weights.add(self._gm, new_w, name)
                b_node = bias if new_b is None else weights.add(
                    self._gm, new_b, weights.name(bias) if bias is not None else name.removesuffix("weight") + "bias")
            lin.args = (lin.args[0], w_node, b_node)
        with self._gm.graph.inserting_before(node):
            plain_ln = call(self._gm.graph, self._fake_mode, aten.native_layer_norm.default,
                            (x, shape, None, None, eps))
        plain_ln.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        return self._replace(node, plain_ln)


__all__ = ["FoldIntoWeightsPass"]
