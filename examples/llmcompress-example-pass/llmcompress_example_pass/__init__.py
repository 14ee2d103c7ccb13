"""`fold-scalar-mul`: an example third-party llmcompress pass, meant to be read top to bottom.

    y = linear(x, W, b) * c        # c a Python number: a logit scale, a residual scale, muP's output multiplier
 -> y = linear(x, W * c, b * c)    # one elementwise op fewer per call; W * c is computed once per weight and scale

Entry point: `FoldScalarMulPass`, registered as "fold-scalar-mul" when llmcompress imports this module through the
`llmcompress.passes` entry point in this package's pyproject.toml. Nothing needs to import it by hand::

    torch.compile(model, backend="llmcompress", options={"passes": ["canonicalize", "fold-scalar-mul"]})
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.fx

from llmcompress import Pass, PassContext, PassResult, register_pass
from llmcompress.errors import OptionError

__all__ = ["FoldScalarMulPass"]

aten = torch.ops.aten
# AOT autograd spells `t * 0.5` as mul.Tensor(t, 0.5); mul.Scalar is the same product under another overload.
_MULS = (aten.mul.Tensor, aten.mul.Scalar)


def _is_number(c: Any) -> bool:
    """A plain Python int or float (not a bool, not a SymFloat whose value is only known at run time)."""
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def scaled(t: torch.Tensor, c: float) -> torch.Tensor | None:
    """`t * c` rounded once to `t`'s dtype, or None when that overflows or flushes a nonzero entry to zero.

    t: a frozen weight (N, K) or bias (N,). fp16/bf16 multiply in fp32 so that the fold rounds once, as the eager
    `linear(...) * c` does. In fp32, `t * c` is what eager computes too: both round c to fp32 first.
    """
    out = (t.to(torch.promote_types(t.dtype, torch.float32)) * c).to(t.dtype)
    overflowed = torch.isfinite(t) & ~torch.isfinite(out)
    flushed = (t != 0) & (out == 0)
    return None if bool((overflowed | flushed).any()) else out


@register_pass
class FoldScalarMulPass(Pass):
    """See the module docstring."""

    name: ClassVar[str] = "fold-scalar-mul"
    description: ClassVar[str] = "Fold linear(x, W, b) * c, with c a Python number, into linear(x, W*c, b*c)."
    after: ClassVar[tuple[str, ...]] = ("canonicalize",)  # it matches only the canonical aten.linear

    @dataclasses.dataclass(frozen=True)
    class Options:
        version: ClassVar[int] = 1
        max_abs_scale: float = 1e4
        """Leave `* c` as written when |c| is larger. Folding moves the weights toward their dtype's limits (fp16
        ends at 65504: a weight of 7 times 1e4 overflows). Within the bound, a fold whose scaled weight would
        overflow or flush a nonzero entry to zero is still skipped."""

        def __post_init__(self) -> None:
            if not (math.isfinite(self.max_abs_scale) and self.max_abs_scale > 0):
                raise OptionError(
                    f"pass 'fold-scalar-mul': key 'max_abs_scale' got {self.max_abs_scale!r}; expected a finite number > 0"
                )

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: collections.Counter[str] = collections.Counter()
        decisions: list[dict[str, Any]] = []
        # The key of the derived-weight cache must cover everything the scaled weight depends on: cache_key holds
        # this pass's source and options (its uuid), and we add the scale itself.
        for mul in list(gm.graph.nodes):
            if mul.op != "call_function" or mul.target not in _MULS:
                continue
            lin, c = mul.args[0], mul.args[1]
            if not (isinstance(lin, torch.fx.Node) and lin.target is aten.linear.default and not lin.kwargs
                    and _is_number(c)):
                continue  # not the pattern (linear * tensor is a gate, not a scale): nothing to count
            x, w = lin.args[:2]
            b = lin.args[2] if len(lin.args) > 2 else None
            decision = {"node": mul.name, "weight": ctx.weights.name(w), "scale": c}
            reason = None
            if len(lin.users) != 1:
                reason = "linear output used elsewhere"  # folding would change what the other users read
            elif not ctx.weights.is_constant(w):
                reason = "weight not frozen"
            elif b is not None and not ctx.weights.is_constant(b):
                reason = "bias not frozen"
            elif not math.isfinite(c):
                reason = "scale not finite"
            elif abs(c) > self.options.max_abs_scale:
                reason = "scale above max_abs_scale"
            else:
                key = self.cache_key("scaled", float(c))
                new_w = ctx.weights.derive(w, key, lambda t: scaled(t, c))
                new_b = None if b is None else ctx.weights.derive(b, key, lambda t: scaled(t, c))
                if new_w is None or (b is not None and new_b is None):
                    reason = "scaled weight overflows or underflows"
            if reason is not None:
                stats[f"skipped: {reason}"] += 1
                decisions.append({**decision, "decision": f"skipped: {reason}"})
                continue

            with gm.graph.inserting_before(lin):
                w_node = ctx.weights.add(gm, new_w, f"{ctx.weights.name(w)}_scaled")
                b_node = None if b is None else ctx.weights.add(gm, new_b, f"{ctx.weights.name(b)}_scaled")
            # The linear keeps its node (and meta: same shape and dtype as the product) and takes the product's place.
            lin.args = (x, w_node, b_node)
            mul.replace_all_uses_with(lin)
            gm.graph.erase_node(mul)
            stats["folded"] += 1
            decisions.append({**decision, "decision": "folded"})
        if stats["folded"]:
            gm.graph.eliminate_dead_code()  # the original weight's get_attr (and its view) if nothing else reads it
        return PassResult(stats["folded"] > 0, dict(stats), decisions)
