"""A β per MoE layer for dynamic expert skipping, calibrated on the model's loss: `calibrate_betas_by_loss`.

The budget is what the user cares about: the relative increase of the calibration tokens' perplexity. The
layer-local proxy (`skip.calibrate_betas`, mean relative output error) mis-ranks the layers on tiny-mixtral
(budget 0.01: 22.1 % skipped at +2.36 % validation perplexity, against 19.6 % at +1.46 % for one β everywhere), so
this runs the graph itself on the calibration feeds: once as it is, then with one layer's slots skipped at each β
of `GRID` (the others intact; a layer stops at the first β whose loss increase alone exceeds the budget), assumes
the layers' increases add, and spends the budget where it buys the most skipped evaluations (`choose_betas`); the
chosen βs then run together, and while the measured increase exceeds the budget the layer with the worst ratio of
loss to skipped evaluations steps one β down.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from llmcompress.calibration.feeds import token_ids_position
from llmcompress.errors import OptionError
from llmcompress.kernels.moe_skip_compensation import moe_skip_compensate_reference
from llmcompress.passes.moe.skip import skip_slots

GRID = (0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7)
"""The βs tried per layer (finer where tiny-mixtral's layers turn costly, 0.2 to 0.4)."""


@dataclasses.dataclass
class LayerCurve:
    """One layer alone: {β: (loss increase in nats per token, fraction of the layer's slots skipped)}."""

    points: dict[float, tuple[float, float]]


def choose_betas(curves: Sequence[LayerCurve], budget_nats: float) -> list[float]:
    """A β per layer maximising the slots skipped (summed over layers) with the summed loss increase ≤ budget:
    Lagrangian (each layer takes the β maximising skipped - λ·loss), λ bisected to the smallest feasible price,
    then greedy single steps into what is left."""
    if not curves:
        return []

    def pick(lam: float) -> list[float]:
        return [max(c.points, key=lambda b, c=c: (c.points[b][1] - lam * c.points[b][0], -b)) for c in curves]

    def cost(choice: list[float]) -> float:
        return sum(c.points[b][0] for c, b in zip(curves, choice))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget_nats and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(pick(mid)) > budget_nats else (lo, mid)
    choice = pick(hi)
    if cost(choice) > budget_nats:
        choice = [0.0] * len(curves)
    # The Lagrangian only reaches the curves' concave hulls: then raise, best gain per nat first, any layer's β
    # whose next step still fits in what is left of the budget.
    while True:
        steps = []
        for i, c in enumerate(curves):
            up = [b for b in c.points if b > choice[i]]
            if up:
                nxt = min(up)
                dl, ds = c.points[nxt][0] - c.points[choice[i]][0], c.points[nxt][1] - c.points[choice[i]][1]
                if ds > 0 and cost(choice) + dl <= budget_nats:
                    steps.append((ds / max(dl, 1e-12), i, nxt))
        if not steps:
            return choice
        _, i, nxt = max(steps)
        choice[i] = nxt


def _labels_and_logits(gm: torch.fx.GraphModule, calibration: Any) -> tuple[int, torch.fx.Node]:
    """(index of the token ids input, the graph's logits output (batch, seq, vocab))."""
    ids = token_ids_position(calibration.example_inputs, calibration.input_names)
    if ids is None:
        raise OptionError("fuse-moe: skip_budget prices β in next-token loss: the graph has no token ids input; "
                          "give skip_beta instead")
    shape = tuple(calibration.example_inputs[ids].shape)
    for n in _flat(gm.graph.output_node().args):
        val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dim() == 3 and tuple(val.shape[:2]) == shape:
            return ids, n
    raise OptionError("fuse-moe: skip_budget prices β in next-token loss: the graph does not output logits "
                      "(batch, seq, vocab); give skip_beta instead")


def _flat(a: Any) -> list[Any]:
    if isinstance(a, (list, tuple)):
        return [x for b in a for x in _flat(b)]
    if isinstance(a, dict):
        return [x for b in a.values() for x in _flat(b)]
    return [a]


@dataclasses.dataclass
class Compensation:
    """One layer's skip compensation during calibration (`skip_compensation.py`): the experts' output node, the
    routing's ids node, and the means (len(GRID), E, H) at each β of `GRID`."""

    output: torch.fx.Node
    indices: torch.fx.Node
    means: torch.Tensor


def calibrate_betas_by_loss(gm: torch.fx.GraphModule, calibration: Any, weights: Sequence[torch.fx.Node],
                            budget: float, compensation: Sequence[Compensation | None] | None = None
                            ) -> tuple[list[float], dict[str, Any]]:
    """(β per layer, what was measured) for the routing-weight nodes `weights` (T, k), one per MoE layer in graph
    order, so that the calibration perplexity rises by at most `budget` (0.01: +1 %). With `compensation` (one per
    layer, None where a layer has none) every run adds the skipped slots' compensation, as the compiled model will.

    The report dict: dense and final calibration perplexity, the layers' skipped fractions, the runs made."""
    ids_at, logits = _labels_and_logits(gm, calibration)
    feeds = calibration.feeds()
    if isinstance(feeds, str):
        raise OptionError(f"fuse-moe: skip_budget needs calibration that can feed this graph ({feeds}); give "
                          "skip_beta instead")
    runs = 0

    def run(betas: Sequence[float]) -> tuple[float, list[float]]:
        """(mean next-token loss over the calibration tokens, skipped fraction per layer) with these βs."""
        nonlocal runs
        runs += 1
        beta_of = dict(zip(weights, betas))
        counts = {n: [0, 0] for n in weights}
        total = [0.0, 0]
        # Per compensated layer: the chunks' routing weights (before skipping) and ids, in chunk order (the runner
        # evaluates a node for every chunk before the next node), consumed at the experts' output.
        seen: dict[torch.fx.Node, list[torch.Tensor]] = {}
        comp: dict[torch.fx.Node, tuple[torch.fx.Node, Compensation]] = {}
        for w_node, c in zip(weights, compensation or []):
            if c is not None:
                comp[c.output] = (w_node, c)
                seen[w_node], seen[c.indices] = [], []

        def on_target(inputs: Any) -> Any:
            node = inputs.node
            if node in comp:
                w_node, c = comp[node]
                beta = beta_of[w_node]
                if beta == 0:
                    return None

                def compensated(*args: Any, **kwargs: Any) -> torch.Tensor:
                    out = node.target(*args, **kwargs)
                    w, ids = seen[w_node].pop(0), seen[c.indices].pop(0)
                    return moe_skip_compensate_reference(out, w, ids, c.means[GRID.index(beta)], beta)
                return compensated
            if node not in beta_of:  # a compensated layer's ids, kept for its output
                def keep_ids(*args: Any, **kwargs: Any) -> torch.Tensor:
                    ids = node.target(*args, **kwargs)
                    seen[node].append(ids)
                    return ids
                return keep_ids
            beta = beta_of[node]

            def skipped(*args: Any, **kwargs: Any) -> torch.Tensor:
                w = node.target(*args, **kwargs)
                if node in seen:
                    seen[node].append(w)
                mask = skip_slots(w, beta)
                counts[node][0] += int(mask.sum())
                counts[node][1] += mask.numel()
                return w.masked_fill(mask, 0) if beta > 0 else w
            return skipped

        def on_value(_node: torch.fx.Node, values: list[Any]) -> None:
            for chunk, v in enumerate(values):
                ids = feeds.args[chunk][ids_at]
                mask = feeds.masks[chunk]
                loss = F.cross_entropy(v[:, :-1].float().reshape(-1, v.shape[-1]), ids[:, 1:].reshape(-1).long(),
                                       reduction="none")
                if mask is not None:
                    keep = (mask[:, 1:] & mask[:, :-1]).reshape(-1)
                    loss = loss[keep]
                total[0] += float(loss.sum())
                total[1] += loss.numel()

        extra = [n for c in (compensation or []) if c is not None for n in (c.indices, c.output)]
        calibration.run_sequential(gm, [*weights, *extra], on_target, watch=[logits], on_value=on_value)
        return total[0] / max(1, total[1]), [c[0] / max(1, c[1]) for c in counts.values()]

    with torch.no_grad():
        dense, _ = run([0.0] * len(weights))
        limit = math.log1p(budget)
        curves = []
        for i in range(len(weights)):
            points = {0.0: (0.0, 0.0)}
            for beta in GRID[1:]:
                betas = [0.0] * len(weights)
                betas[i] = beta
                loss, skipped = run(betas)
                points[beta] = (max(0.0, loss - dense), skipped[i])
                if loss - dense > limit:
                    break
            curves.append(LayerCurve(points))
        betas = choose_betas(curves, limit)
        while True:
            loss, skipped = run(betas)
            if loss - dense <= limit or not any(betas):
                break
            worst = max((i for i, b in enumerate(betas) if b > 0),
                        key=lambda i: curves[i].points[betas[i]][0] / max(1e-12, curves[i].points[betas[i]][1]))
            betas[worst] = max(b for b in curves[worst].points if b < betas[worst])
    return betas, {"calibration_perplexity": [round(math.exp(dense), 4), round(math.exp(loss), 4)],
                   "skipped_fraction_per_layer": [round(s, 6) for s in skipped], "calibration_runs": runs,
                   "curves": [{str(b): [round(v[0], 6), round(v[1], 6)] for b, v in c.points.items()}
                              for c in curves]}
