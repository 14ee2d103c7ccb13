"""Rank allocation under a parameter budget: each layer's measured output-error curve against rank (relative to
its output energy, so layers of different scales compare) decides where the next rank buys the most, greedily on
error removed per parameter spent, until no further step fits the budget. MoE experts stored as one 3-D weight
(E, N, K) are one layer: every expert shares its rank (the factors stay 3-D), so a rank costs E (N + K)."""

from __future__ import annotations

import dataclasses
import heapq

import torch


@dataclasses.dataclass(frozen=True)
class LayerCurve:
    n: int
    k: int
    curve: torch.Tensor
    """(m + 1,) error at rank 0 .. m (`Decomposition.error_curve`; for experts summed over them), non-increasing in
    expectation."""
    experts: int = 1
    """E of a 3-D expert weight (E, N, K): its parameters are E N K, a rank costs E (N + K)."""

    @property
    def params(self) -> int:
        return self.experts * self.n * self.k

    @property
    def rank_cost(self) -> int:
        return self.experts * (self.n + self.k)

    @property
    def max_split_rank(self) -> int:
        """The largest rank that stores fewer parameters than the dense weight: r (N + K) < N K."""
        return (self.n * self.k - 1) // (self.n + self.k)


def allocate_ranks(layers: list[LayerCurve], budget: int) -> list[int | None]:
    """Ranks (None: left dense) whose parameters, E r (N + K) per split layer and E N K per dense one, sum to at most
    `budget`, with no step left that fits: what is unspent is less than the cheapest remaining step.

    Every layer starts at rank 1; a step is one more rank (E (N + K) parameters) or, from the largest rank that saves
    parameters, keeping the layer dense (the rest of E N K). Greedy on relative error removed per parameter.
    """
    ranks: list[int | None] = [1] * len(layers)
    spent = sum(x.rank_cost for x in layers)
    if spent > budget:
        raise ValueError(f"a budget of {budget} parameters is below rank 1 everywhere ({spent})")
    rel = [x.curve.double() / x.curve[0].double().clamp_min(1e-300) for x in layers]
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        r, x = ranks[i], layers[i]
        if r is None:
            return
        if r < x.max_split_rank and r < len(rel[i]) - 1:
            gain, cost = float(rel[i][r] - rel[i][r + 1]), x.rank_cost
        else:
            gain, cost = float(rel[i][min(r, len(rel[i]) - 1)]), x.params - r * x.rank_cost
        heapq.heappush(heap, (-gain / cost, i))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        x, r = layers[i], ranks[i]
        to_dense = not (r < x.max_split_rank and r < len(rel[i]) - 1)
        cost = x.params - r * x.rank_cost if to_dense else x.rank_cost
        if spent + cost > budget:
            continue  # this layer's next step does not fit (its later ones cost at least as much per step)
        spent += cost
        ranks[i] = None if to_dense else r + 1
        push(i)
    return ranks


def kept_params(layers: list[LayerCurve], ranks: list[int | None]) -> int:
    return sum(x.params if r is None else r * x.rank_cost for x, r in zip(layers, ranks))
