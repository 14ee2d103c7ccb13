"""The routing and expert arithmetic of a softmax top-k MoE block in plain torch, on calibration activations: what
`moe-prune` and the skip calibration measure candidate routings with (`route`, `expert_outputs`, `combine`).

It mirrors the graph `blocks.find_blocks` matched: logits -> softmax (float32) -> top-k -> renormalise (when the
block does) -> sum of routing weight × expert(x), experts SwiGLU: down(silu(gate(x)) · up(x)) with gate_up (E, 2I, H)
and down (E, H, I), transformers' 3-D layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per slice when every expert runs on every token: (slice, E, 2I) float32 stays near 64 MiB for E = 8,
# I = 14336 at 128 tokens and near 16 MiB for tiny-mixtral (E = 8, I = 256) at 2048.
_SLICE_ELEMENTS = 2**24


def route(logits: torch.Tensor, k: int, renormalize: bool, allowed: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing weights (T, k) float32 and expert ids (T, k) of logits (T, E); experts outside `allowed` (E,)
    bool are never chosen, and the others are renormalised exactly as if the router's rows had been sliced."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    values, indices = torch.topk(probs, k, dim=-1)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values, indices


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(T, E, H) float32: every expert's output on every token. x (T, H); gate_up (E, 2I, H); down (E, H, I)."""
    e, two_i, _ = gate_up.shape
    gate_up, down = gate_up.float(), down.float()
    step = max(1, _SLICE_ELEMENTS // (e * two_i))
    out = []
    for xs in x.float().split(step):
        gate, up = torch.einsum("th,eih->tei", xs, gate_up).chunk(2, dim=-1)
        out.append(torch.einsum("tei,ehi->teh", F.silu(gate) * up, down))
    return torch.cat(out)


def combine(y: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(T, H): the block's output, sum over the k slots of weight × the chosen expert's output. y (T, E, H)."""
    chosen = torch.gather(y, 1, indices.unsqueeze(-1).expand(-1, -1, y.shape[-1]))  # (T, k, H)
    return (weights.unsqueeze(-1) * chosen).sum(dim=1)
