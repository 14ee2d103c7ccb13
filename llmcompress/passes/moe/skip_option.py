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
from llmcompress.passes.moe.skip_calibration import GRID, Compensation, calibrate_betas_by_loss
from llmcompress.passes.moe.skip_compensation import add_compensation, compensation_means


@dataclasses.dataclass
class SkipChoice:
    beta: float
    skipped: float | None
    """Fraction of the layer's expert evaluations (token × slot) skipped on the calibration tokens (None: no
    calibration data)."""
    means: torch.Tensor | None = None
    """(E, H) float32 compensation (`skip_compensation.py`), None without `skip_compensate`."""


def skip_choices(gm: torch.fx.GraphModule, ctx: PassContext, blocks: Sequence[MoEBlock], beta: float | None,
                 budget: float | None, compensate: bool, outputs: dict[torch.fx.Node, torch.fx.Node | None],
                 stats: dict[str, Any], cache_key: Callable[..., Any]) -> dict[torch.fx.Node, SkipChoice]:
    """{router: its layer's skipping} for the blocks that can be rewritten; {} when neither option is given.
    `outputs`: {router: the block's experts output node, or None where there is no single one}; `compensate`: the
    skipped slots add their compensation (calibrated: needs calibration data). `cache_key` is the pass's
    `cache_key`: what is calibrated (the βs of a budget, about 30 runs of the graph on the calibration data; the
    compensation means) is a derived result, computed once for generate's prefill and decode graphs and
    recompiles."""
    usable = [b for b in blocks if b.why is None]
    if (beta is None and budget is None) or not usable:
        return {}
    have_data = ctx.calibration is not None and ctx.calibration.available
    with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
        feeds = ctx.calibration.feeds() if have_data else "no calibration data"
    if compensate and beta is not None and beta > 0 and isinstance(feeds, str):
        raise OptionError(f"fuse-moe: skip_compensate calibrates each expert's mean output on calibration data "
                          f"({feeds}): give options['calibration'], or skip_compensate: false")
    weights = [b.weights for b in usable]
    compensated = [b for b in usable if compensate and outputs.get(b.router) is not None]
    stats_nodes = [n for b in usable for n in (b.router.args[1], b.gate_up, b.down)]
    with unset_fake_temporarily():  # passes run inside AOT's fake mode; calibration computes for real
        def means_at(betas: Sequence[float]) -> list[torch.Tensor]:
            """(len(betas), E, H) per compensated block, from the dense model's calibration activations."""
            seen = ctx.calibration.hidden_states(gm, [b.router.args[0] for b in compensated])
            out = []
            for b in compensated:
                bias = b.router.args[2] if len(b.router.args) > 2 else None
                out.append(compensation_means(
                    seen[b.router.args[0]], ctx.weights.value(b.router.args[1]),
                    ctx.weights.value(bias) if isinstance(bias, torch.fx.Node) else None,
                    ctx.weights.value(b.gate_up), ctx.weights.value(b.down), b.k, b.renormalize, betas))
            return out

        if budget is not None:
            if not have_data:
                raise OptionError("fuse-moe: skip_budget calibrates β on calibration data: give "
                                  "options['calibration'], or a fixed skip_beta in [0, 1)")
            if isinstance(feeds, str):
                raise OptionError(f"fuse-moe: skip_budget needs calibration that can feed this graph ({feeds}); "
                                  "give skip_beta instead")
            def calibrate(_: Any) -> dict[str, Any]:
                tables = {b.router: m for b, m in zip(compensated, means_at(GRID))}
                comp = [Compensation(outputs[b.router], b.indices, tables[b.router]) if b.router in tables else None
                        for b in usable]
                betas, info = calibrate_betas_by_loss(gm, ctx.calibration, weights, budget, comp)
                means = [tables[b.router][GRID.index(bt)] if b.router in tables else torch.zeros(0)
                         for b, bt in zip(usable, betas)]
                return {"betas": torch.tensor(betas, dtype=torch.float64),
                        "skipped": torch.tensor(info["skipped_fraction_per_layer"], dtype=torch.float64),
                        "perplexity": torch.tensor(info["calibration_perplexity"], dtype=torch.float64),
                        "runs": int(info["calibration_runs"]), "means": means}

            key = cache_key("skip_budget", float(budget), bool(compensate), tuple(b.name for b in usable),
                            ctx.calibration.fingerprint)
            got = ctx.weights.derive(stats_nodes, key, calibrate, persist=True)
            betas = got["betas"].tolist()
            skipped: list[float | None] = got["skipped"].tolist()
            kept = {b.router for b in compensated}
            means = [m if b.router in kept else None for b, m in zip(usable, got["means"])]
            stats["skip calibration perplexity (dense, skipped)"] = got["perplexity"].tolist()
            stats["skip calibration runs"] = got["runs"]
        else:
            betas = [float(beta)] * len(usable)
            skipped = [None] * len(usable)
            means = [None] * len(usable)
            if not isinstance(feeds, str):
                seen = ctx.calibration.hidden_states(gm, weights)
                skipped = [_fraction(seen[w], beta) for w in weights]
            if compensated and beta > 0:
                key = cache_key("skip_compensate", float(beta), tuple(b.name for b in compensated),
                                ctx.calibration.fingerprint)
                got = ctx.weights.derive(stats_nodes, key, lambda _: [m[0] for m in means_at([beta])], persist=True)
                tables = {b.router: m for b, m in zip(compensated, got)}
                means = [tables.get(b.router) for b in usable]
    if all(s is not None for s in skipped):
        stats["expert evaluations skipped"] = round(sum(skipped) / len(skipped), 6)
    if compensate:
        stats["skip compensated layers"] = sum(m is not None and bt > 0 for m, bt in zip(means, betas))
    return {b.router: SkipChoice(bt, s, m) for b, bt, s, m in zip(usable, betas, skipped, means)}


def _fraction(chunks: list[torch.Tensor], beta: float) -> float:
    hit = total = 0
    for w in chunks:
        mask = skip_slots(w.float(), beta)
        hit, total = hit + int(mask.sum()), total + mask.numel()
    return hit / max(1, total)


def apply_skip_fallback(gm: torch.fx.GraphModule, ctx: PassContext, block: MoEBlock, skip: SkipChoice,
                        fused: bool, output: torch.fx.Node | None) -> dict[str, Any]:
    """The block's skipping decision; a block left unfused gets the rule on its routing weights. With
    compensation, `moe_skip_compensate` goes after `output` (the node that now carries the experts' output: the
    fused op, or the block's own), fused or not."""
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
    if skip.beta > 0 and skip.means is not None and output is not None:
        # fused: moe_route's weights and ids (the experts op's 4th and 5th arguments), so the routing runs once
        routing = (output.args[3], output.args[4]) if fused else None
        add_compensation(gm, ctx, block, output, skip.beta, skip.means, routing)
        out["compensated"] = True
    return out
