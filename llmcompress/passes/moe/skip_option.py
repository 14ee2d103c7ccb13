"""`fuse-moe`'s dynamic expert skipping options (`skip_beta`, `skip_budget`): the β of each MoE layer, and the
fallback for a block the pass does not fuse.

A fused block skips inside `llmcompress::moe_route` (the slot's id made out of range, so `moe_experts` reads
nothing for it: the speed-up). A block `fuse-moe` declines (the cost model on a CPU, an unknown shape) gets the same
rule on its routing weights (`moe_skip.mask_routing_weights`: the experts still run, the same outputs): the option
means the same model either way, and the decision says where it was applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llmcompress.errors import OptionError
from llmcompress.passes.base import PassContext
from llmcompress.passes.moe.blocks import MoEBlock
from llmcompress.passes.moe.moe_skip import mask_routing_weights
from llmcompress.passes.moe.skip import skip_slots
from llmcompress.passes.moe.skip_calibration import calibrate_betas_by_loss


@dataclasses.dataclass
class SkipChoice:
    beta: float
    skipped: float | None
    """Fraction of the layer's expert evaluations (token × slot) skipped on the calibration tokens (None: no
    calibration data)."""


def skip_choices(gm: torch.fx.GraphModule, ctx: PassContext, blocks: Sequence[MoEBlock], beta: float | None,
                 budget: float | None, stats: dict[str, Any], cache_key: Callable[..., Any]
                 ) -> dict[torch.fx.Node, SkipChoice]:
    """{router: its layer's skipping} for the blocks that can be rewritten; {} when neither option is given.
    `cache_key` is the pass's `cache_key`: the βs calibrated to a budget (about 30 runs of the graph on the
    calibration data) are a derived result, computed once for generate's prefill and decode graphs and recompiles."""
    usable = [b for b in blocks if b.why is None]
    if (beta is None and budget is None) or not usable:
        return {}
    have_data = ctx.calibration is not None and ctx.calibration.available
    weights = [b.weights for b in usable]
    with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
        if budget is not None:
            if not have_data:
                raise OptionError("fuse-moe: skip_budget calibrates β on calibration data: give "
                                  "options['calibration'], or a fixed skip_beta in [0, 1)")
            def calibrate(_: Any) -> dict[str, Any]:
                betas, info = calibrate_betas_by_loss(gm, ctx.calibration, weights, budget)
                return {"betas": torch.tensor(betas, dtype=torch.float64),
                        "skipped": torch.tensor(info["skipped_fraction_per_layer"], dtype=torch.float64),
                        "perplexity": torch.tensor(info["calibration_perplexity"], dtype=torch.float64),
                        "runs": int(info["calibration_runs"])}

            nodes = [n for b in usable for n in (b.router.args[1], b.gate_up, b.down)]
            key = cache_key("skip_budget", float(budget), tuple(b.name for b in usable), ctx.calibration.fingerprint)
            got = ctx.weights.derive(nodes, key, calibrate, persist=True)
            betas = got["betas"].tolist()
            skipped: list[float | None] = got["skipped"].tolist()
            stats["skip calibration perplexity (dense, skipped)"] = got["perplexity"].tolist()
            stats["skip calibration runs"] = got["runs"]
        else:
            betas = [float(beta)] * len(usable)
            skipped = [None] * len(usable)
            if have_data and not isinstance(ctx.calibration.feeds(), str):
                seen = ctx.calibration.hidden_states(gm, weights)
                skipped = [_fraction(seen[w], beta) for w in weights]
    if all(s is not None for s in skipped):
        stats["expert evaluations skipped"] = round(sum(skipped) / len(skipped), 6)
    return {b.router: SkipChoice(bt, s) for b, bt, s in zip(usable, betas, skipped)}


def _fraction(chunks: list[torch.Tensor], beta: float) -> float:
    hit = total = 0
    for w in chunks:
        mask = skip_slots(w.float(), beta)
        hit, total = hit + int(mask.sum()), total + mask.numel()
    return hit / max(1, total)


def apply_skip_fallback(gm: torch.fx.GraphModule, ctx: PassContext, block: MoEBlock, skip: SkipChoice,
                        fused: bool) -> dict[str, Any]:
    """The block's skipping decision; a block left unfused gets the rule on its routing weights."""
    out: dict[str, Any] = {"beta": skip.beta}
    if skip.skipped is not None:
        out["skipped_fraction"] = round(skip.skipped, 6)
    if skip.beta == 0:
        out["where"] = "nowhere (β 0)"
    elif fused:
        out["where"] = "moe_route (skipped slots read no expert weights)"
    else:
        mask_routing_weights(gm, ctx, block, skip.beta)
        out["where"] = "routing weights (block not fused: the experts still run, no speed-up)"
    return out
