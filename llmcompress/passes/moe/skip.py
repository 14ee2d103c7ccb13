"""Dynamic expert skipping: skip slot j of a token when its routing weight < β × the token's top weight.

`skip_slots` / `apply_skip` are the rule (what `fuse-moe` will apply in its kernel, and what the interim `moe-skip`
pass applies to the routing weights today); `skip_curve` measures one layer's skipped fraction and output error
over a grid of β on calibration tokens; `calibrate_betas` spends a quality budget across layers (a per-layer β
maximising the expert evaluations skipped while the layers' mean relative output error stays within the budget).
"""

from __future__ import annotations

import dataclasses

import torch

BETAS = tuple(round(0.01 * i, 2) for i in range(100))
"""The β grid calibration searches, [0, 0.99] by 0.01."""


def skip_slots(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """(T, k) bool: the slots skipped, weight < β × the token's largest weight (never the largest itself)."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"skip: beta must be in [0, 1), got {beta}")
    return weights < beta * weights.max(dim=-1, keepdim=True).values


def apply_skip(weights: torch.Tensor, beta: float, renormalize: bool = False) -> torch.Tensor:
    """The routing weights (T, k) with the skipped slots' set to 0; `renormalize` scales the kept ones so each token's
    weights keep their sum."""
    kept = weights.masked_fill(skip_slots(weights, beta), 0)
    if renormalize:
        kept = kept * (weights.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True))
    return kept


@dataclasses.dataclass
class SkipCurve:
    """One layer's response to β on the calibration tokens."""

    betas: tuple[float, ...]
    skipped: list[float]
    """Fraction of the layer's expert evaluations (token × slot) skipped at each β."""
    error: list[float]
    """Relative squared error of the block's output at each β, ||O_β - O||² / ||O||²."""

    def at(self, beta: float) -> tuple[float, float]:
        """(skipped, error) at the grid point nearest `beta`."""
        j = min(range(len(self.betas)), key=lambda i: abs(self.betas[i] - beta))
        return self.skipped[j], self.error[j]


def skip_curve(weights: torch.Tensor, chosen: torch.Tensor, renormalize: bool = False,
               betas: tuple[float, ...] = BETAS) -> SkipCurve:
    """weights: (T, k) routing weights; chosen: (T, k, H) the output of the expert in each slot."""
    weights, chosen = weights.float(), chosen.float()
    dense = (weights.unsqueeze(-1) * chosen).sum(dim=1)
    energy = float((dense**2).sum().clamp_min(1e-30))
    skipped, error = [], []
    for beta in betas:
        mask = skip_slots(weights, beta)
        w = apply_skip(weights, beta, renormalize)
        out = (w.unsqueeze(-1) * chosen).sum(dim=1)
        skipped.append(float(mask.float().mean()))
        error.append(float(((out - dense) ** 2).sum()) / energy)
    return SkipCurve(tuple(betas), skipped, error)


def calibrate_betas(curves: list[SkipCurve], budget: float) -> list[float]:
    """A β per layer: the most expert evaluations skipped with the layers' mean relative output error ≤ `budget`.

    Lagrangian: for a price λ each layer takes the β maximising skipped - λ·error; λ is bisected to the smallest
    price whose choice fits the budget (skipping more never lowers a layer's error on the grid, so the largest
    feasible total is found up to the grid's steps).
    """
    if budget < 0:
        raise ValueError(f"calibrate_betas: budget must be ≥ 0, got {budget}")
    if not curves:
        return []

    def pick(lam: float) -> list[int]:
        return [max(range(len(c.betas)), key=lambda j: (c.skipped[j] - lam * c.error[j], -j)) for c in curves]

    def mean_error(choice: list[int]) -> float:
        return sum(c.error[j] for c, j in zip(curves, choice)) / len(curves)

    lo, hi = 0.0, 1.0
    while mean_error(pick(hi)) > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_error(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    if mean_error(choice) > budget:  # even the highest price skips too much: skip nothing
        choice = [0] * len(curves)
    return [c.betas[j] for c, j in zip(curves, choice)]
