"""Compensation for `fuse-moe`'s dynamic expert skipping (`skip_compensate`): a skipped slot adds its routing weight
× its expert's mean output on the calibration tokens it would be skipped on, instead of nothing.

`compensation_means` measures, per β, each expert's least-squares constant for its skipped contribution
(Σ w² y / Σ w² over the calibration slots the rule skips at that β: the μ minimising Σ ||w·y − w·μ||²);
`add_compensation` puts `llmcompress::moe_skip_compensate` (`kernels/moe_skip_compensation.py`) after the block's
experts output, reading the block's own routing (the weights before skipping, the model's ids), so the fused block
(skipped in `moe_route`) and the declined one (skipped on the routing weights) compute the same model.

On tiny-mixtral (32 validation windows, β 0.3 everywhere) it turns +1.46 % into +1.08 % at the same 19.6 % skipped
(benchmarks/results/moe_quality.json); in a prototype on the same windows the plain mean over all the tokens routed
to an expert gave +1.17 %, over its non-top slots +1.15 %, and this conditional least-squares mean about +1.12 %.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F

from llmcompress.fx_utils import call
from llmcompress.kernels import moe_skip_compensation as _compensation_op  # noqa: F401  (registers the op)
from llmcompress.passes.base import PassContext
from llmcompress.passes.moe.blocks import MoEBlock
from llmcompress.passes.moe.routing import route

# Calibration tokens per expert evaluated at once (the expert's (rows, 2I) float32 activation: 16 MiB at I = 14336).
_ROWS = 2**14


def expert_output(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(T, H) float32: one expert's SwiGLU output. x (T, H); gate_up (2I, H); down (H, I)."""
    gate, up = F.linear(x.float(), gate_up.float()).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down.float())


def compensation_means(xs: Sequence[torch.Tensor], router_weight: torch.Tensor, router_bias: torch.Tensor | None,
                       gate_up: torch.Tensor, down: torch.Tensor, k: int, renormalize: bool,
                       betas: Sequence[float]) -> torch.Tensor:
    """(len(betas), E, H) float32: for each β, each expert's Σ w² y / Σ w² over the calibration slots (token, j)
    routed to it that the rule skips at β (w < β × the token's top weight); a zero row where none is.

    xs: the block's input (router input) per calibration chunk, (..., H)."""
    e, h = gate_up.shape[0], gate_up.shape[2]
    num = torch.zeros(len(betas), e, h, dtype=torch.float64)
    den = torch.zeros(len(betas), e, dtype=torch.float64)
    top = max(betas, default=0.0)
    for chunk in xs:
        x = chunk.reshape(-1, h)
        logits = F.linear(x.float(), router_weight.float(), None if router_bias is None else router_bias.float())
        w, ids = route(logits, k, renormalize)
        ratio = w / w.amax(dim=-1, keepdim=True)
        for ex in range(e):
            tok, slot = torch.nonzero((ids == ex) & (ratio < top), as_tuple=True)
            if tok.numel() == 0:
                continue
            r, ws = ratio[tok, slot], w[tok, slot].double()
            for start in range(0, tok.numel(), _ROWS):
                part = slice(start, start + _ROWS)
                y = expert_output(x[tok[part]], gate_up[ex], down[ex]).double()
                for b, beta in enumerate(betas):
                    sel = r[part] < beta
                    w2 = ws[part] * ws[part] * sel
                    num[b, ex] += w2 @ y
                    den[b, ex] += w2.sum()
    return (num / den.clamp_min(1e-30).unsqueeze(-1)).float()


def add_compensation(gm: torch.fx.GraphModule, ctx: PassContext, block: MoEBlock, output: torch.fx.Node,
                     beta: float, means: torch.Tensor,
                     routing: tuple[torch.fx.Node, torch.fx.Node] | None = None) -> torch.fx.Node:
    """`moe_skip_compensate(output, routing weights and ids, means, β)` after `output` (the experts' output as the
    graph now computes it), which every former reader of `output` reads instead; returns the node. routing: a fused
    block's `moe_route` weights and ids (so the block's own routing is left dead); None: the block's own weights and
    ids. Call after any rewrite of the routing weights' readers (the compensation reads the weights before
    skipping)."""
    g, fm = gm.graph, ctx.fake_mode
    device = output.meta["val"].device
    users = list(output.users)
    with g.inserting_after(output):
        table = ctx.weights.add(gm, means.to(device), f"{block.name}.experts.skip_means")
    with g.inserting_after(table):
        comp = call(g, fm, torch.ops.llmcompress.moe_skip_compensate.default,
                    (output, *(routing or (block.weights, block.indices)), table, float(beta)), {})
    for n in (table, comp):
        n.meta.update({key: v for key, v in output.meta.items() if key in ("nn_module_stack", "stack_trace")})
    for u in users:
        u.replace_input_with(output, comp)
    return comp
