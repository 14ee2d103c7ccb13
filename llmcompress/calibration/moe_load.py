"""Load statistics of a MoE layer's routing on calibration data: `expert_load(indices, weights, num_experts)`.

Generic over the family: it reads what the router chose (top-k expert ids and their weights per token), not how it
scored them, so every MoE pass (and the cost model, for the distinct experts a step hits) reads the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class ExpertLoad:
    """Per expert of one MoE layer, over the calibration tokens."""

    tokens: torch.Tensor
    """(E,) int64: tokens routed to the expert (one per token and top-k slot that chose it)."""
    weight_sum: torch.Tensor
    """(E,) float64: the routing weights those tokens gave it, summed."""
    total_tokens: int
    """Tokens routed (each counted once, whatever its top-k)."""

    @property
    def mean_weight(self) -> torch.Tensor:
        """(E,) mean routing weight of the tokens routed to the expert (0 where none)."""
        return self.weight_sum / self.tokens.clamp_min(1).to(torch.float64)

    @property
    def share(self) -> torch.Tensor:
        """(E,) fraction of the layer's expert evaluations the expert does (sums to 1)."""
        return self.tokens.to(torch.float64) / max(1, int(self.tokens.sum()))

    def as_dict(self) -> dict[str, list]:
        """Plain lists for the compile report."""
        return {"tokens": self.tokens.tolist(), "mean_weight": [round(float(w), 6) for w in self.mean_weight],
                "share": [round(float(s), 6) for s in self.share]}


def expert_load(indices: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], num_experts: int) -> ExpertLoad:
    """The load of one layer from its routing, chunk by chunk.

    indices: per chunk, (tokens, k) integer expert ids in [0, num_experts).
    weights: per chunk, (tokens, k) the routing weights of those slots (after the family's renormalisation).
    """
    if len(indices) != len(weights):
        raise ValueError(f"expert_load: {len(indices)} index chunks but {len(weights)} weight chunks")
    tokens = torch.zeros(num_experts, dtype=torch.int64)
    weight_sum = torch.zeros(num_experts, dtype=torch.float64)
    total = 0
    for idx, w in zip(indices, weights):
        if idx.shape != w.shape:
            raise ValueError(f"expert_load: indices {tuple(idx.shape)} and weights {tuple(w.shape)} differ")
        idx = idx.reshape(-1).to(torch.int64).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_experts):
            raise ValueError(f"expert_load: expert ids outside [0, {num_experts})")
        tokens += torch.bincount(idx, minlength=num_experts)
        weight_sum.index_add_(0, idx, w.reshape(-1).to(torch.float64).cpu())
        total += w.shape[0] if w.dim() > 1 else w.numel()
    return ExpertLoad(tokens, weight_sum, total)
