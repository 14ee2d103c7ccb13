"""`moe-skip` (interim, kept for comparison): dynamic expert skipping applied to the routing weights. Skipping is
now an option of `fuse-moe` (`skip_beta`, `skip_budget` calibrated on the loss: `skip_option.py`), whose
`moe_route` drops a skipped (token, expert) slot; for a block fuse-moe does not fuse it applies this pass's rewrite
(`mask_routing_weights`: the skipped slots' routing weights zeroed, the experts still run, the same outputs).

Rule (`skip.py`): slot j of a token is skipped when its routing weight < β × the token's top weight.
Options:
* `beta`: one β in [0, 1) for every layer; or None (default) to calibrate a β per layer:
* `budget` (default 0.01): the layers' mean relative squared error of the block output, ||O_β - O||² / ||O||², on
  the calibration tokens, that calibration may spend (`skip.calibrate_betas`: most evaluations skipped within it).
* `renormalize` (default false): scale the kept slots so each token's weights keep their sum.
On tiny-mixtral (32 windows) one β for all layers does better than the budget's per-layer β: β 0.3 skips 19.6 % at
+1.46 %, budget 0.01 (β 0.66 / 0.26 / 0.29 / 0.29) 22.1 % at +2.36 %: the per-layer error is a poor proxy for a
layer's effect on the loss (layer 0 is far more sensitive than its relative error says).
Each MoE layer's decision gives its β and, with calibration data, the fraction of expert evaluations (token × slot)
skipped on it and the output error; stats `expert evaluations skipped` the fraction over all layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.errors import OptionError
from llmcompress.fx_utils import call, finish_rewrite
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.moe.blocks import MoEBlock, find_blocks
from llmcompress.passes.moe.routing import expert_outputs, route
from llmcompress.passes.moe.skip import SkipCurve, calibrate_betas, skip_curve

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class MoESkipOptions:
    beta: float | None = None
    """One β in [0, 1) for every layer; None calibrates a β per layer to `budget`."""
    budget: float = 0.01
    renormalize: bool = False
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.beta is not None and not 0.0 <= self.beta < 1.0:
            raise OptionError(f"pass 'moe-skip': beta must be in [0, 1) (a slot is skipped when its weight < beta × "
                              f"the top weight), got {self.beta}")
        if not self.budget >= 0:
            raise OptionError(f"pass 'moe-skip': budget must be ≥ 0 (mean relative output error), got {self.budget}")


class MoESkipPass(Pass):
    name = "moe-skip"
    description = "Interim dynamic expert skipping: zero the routing weight of slots below β × the top weight"
    Options = MoESkipOptions
    after = ("canonicalize", "moe-prune")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, Any] = {}
        decisions: list[dict[str, Any]] = []
        blocks = []
        for b in find_blocks(gm, ctx.weights):
            if b.why is not None:
                decisions.append({"node": b.router.name, "layer": b.name, "left as is": b.why})
                stats["left as is"] = stats.get("left as is", 0) + 1
            else:
                blocks.append(b)
        if not blocks:
            return PassResult(False, stats, decisions)
        o = self.options
        have_data = ctx.calibration is not None and ctx.calibration.available
        if o.beta is None and not have_data:
            raise OptionError("moe-skip: calibrating β needs calibration data (options['calibration']); or give a "
                              "fixed beta in [0, 1)")
        curves: list[SkipCurve] | None = None
        with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
            feeds = ctx.calibration.feeds() if have_data else "no calibration data"
            if not isinstance(feeds, str):
                curves = self._curves(gm, ctx, blocks)
            elif o.beta is None:
                raise OptionError(f"moe-skip: calibration cannot feed this graph ({feeds}); give a fixed beta")
        betas = [o.beta] * len(blocks) if o.beta is not None else calibrate_betas(curves, o.budget)
        skipped = 0.0
        for i, (b, beta) in enumerate(zip(blocks, betas)):
            decision: dict[str, Any] = {"node": b.weights.name, "layer": b.name, "beta": beta,
                                        "renormalize": o.renormalize}
            if curves is not None:
                s, e = curves[i].at(beta)
                decision.update({"skipped_fraction": round(s, 6), "relative_error": round(e, 6)})
                skipped += s
            decisions.append(decision)
            if beta > 0:
                mask_routing_weights(gm, ctx, b, beta, o.renormalize)
        stats["skipping layers"] = sum(1 for beta in betas if beta > 0)
        if curves is not None:
            stats["expert evaluations skipped"] = round(skipped / len(blocks), 6)
        changed = any(beta > 0 for beta in betas)
        if changed:
            finish_rewrite(gm)
        return PassResult(changed, stats, decisions)

    def _curves(self, gm: torch.fx.GraphModule, ctx: PassContext, blocks: list[MoEBlock]) -> list[SkipCurve]:
        """Each layer's skip curve on the dense model's calibration activations."""
        seen = ctx.calibration.hidden_states(gm, [b.router.args[0] for b in blocks])
        curves = []
        for b in blocks:
            x = torch.cat([v.reshape(-1, v.shape[-1]) for v in seen[b.router.args[0]]])
            w = ctx.weights.value(b.router.args[1])
            bias = b.router.args[2] if len(b.router.args) > 2 else None
            bias = ctx.weights.value(bias) if isinstance(bias, torch.fx.Node) else None
            logits = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            weights, indices = route(logits, b.k, b.renormalize)
            y = expert_outputs(x, ctx.weights.value(b.gate_up), ctx.weights.value(b.down))
            chosen = torch.gather(y, 1, indices.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
            curves.append(skip_curve(weights, chosen, self.options.renormalize))
        return curves


def mask_routing_weights(gm: torch.fx.GraphModule, ctx: PassContext, b: MoEBlock, beta: float,
                         renormalize: bool = False) -> None:
    """Skipping applied to the routing weights, for every reader of them: w -> masked_fill(w, w < β·max(w), 0)
    (× sum(w) / sum(kept) with renormalize). The experts still run (no speed-up); also `fuse-moe`'s fallback for a
    block it does not fuse."""
    g, fm, w = gm.graph, ctx.fake_mode, b.weights
    users = list(w.users)
    order = {n: i for i, n in enumerate(g.nodes)}
    with g.inserting_before(min(users, key=order.__getitem__)):
        top = call(g, fm, aten.amax.default, (w, [-1], True))
        threshold = call(g, fm, aten.mul.Tensor, (top, beta))
        skip = call(g, fm, aten.lt.Tensor, (w, threshold))
        kept = call(g, fm, aten.masked_fill.Scalar, (w, skip, 0.0))
        out = kept
        if renormalize:
            total = call(g, fm, aten.sum.dim_IntList, (w, [-1], True))
            kept_total = call(g, fm, aten.sum.dim_IntList, (kept, [-1], True))
            out = call(g, fm, aten.mul.Tensor, (kept, call(g, fm, aten.div.Tensor, (total, kept_total))))
    for n in (top, threshold, skip, kept, out):
        n.meta.update({k: v for k, v in w.meta.items() if k in ("nn_module_stack", "stack_trace")})
    for u in users:
        u.replace_input_with(w, out)
