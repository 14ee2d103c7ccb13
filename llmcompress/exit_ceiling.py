"""How many decoder-layer evaluations an early-exit cascade could skip with a perfect gate (issue 16): the ceiling
that any gate's result is measured against. Entry point: `skip_ceiling`.

Given, per token and per exit E, what exiting there costs (its KL to the full model, whether its top-1 differs), the
best gate sends each token to the exit that skips most within the two budgets (errors, added NLL). That is a
knapsack with a choice per token; its Lagrangian relaxation gives both a feasible assignment (a lower bound on the
best) and, by weak duality, an upper bound no assignment of tokens to exits can beat, whatever the gate sees.
On tiny-llama the gates reach a third of it: the gap is what the gates cannot tell from their features, not what
the exit heads lack.
"""

from __future__ import annotations

import dataclasses

import torch

from llmcompress.errors import OptionError

_LAMBDAS = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, 5, 161, dtype=torch.float64)])
"""Multipliers of the added NLL (layers per nat) tried: 12 % apart, wide enough for budgets of 1e-4 … 10 nats/token;
0 for when the NLL budget does not bind."""
_MUS = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, 3, 61, dtype=torch.float64)])
"""Multipliers of an error (layers per wrong top-1) tried; 0 for when the error budget does not bind."""


@dataclasses.dataclass(frozen=True)
class SkipCeiling:
    """Shares of layer evaluations (of tokens × layers). feasible: a perfect-information assignment that meets both
    budgets (exit_share {E: share of tokens}, agreement, nll_per_token: its added nats per token); upper: no
    assignment within the budgets skips more (Lagrangian dual bound)."""

    feasible: float
    upper: float
    agreement: float
    nll_per_token: float
    exit_share: dict[int, float]


def skip_ceiling(kl: dict[int, torch.Tensor], agree: dict[int, torch.Tensor], num_layers: int, *,
                 allowed_errors: float, allowed_nll: float) -> SkipCeiling:
    """kl, agree: {exit E: (n,) tensors over the same n tokens} (KL(full ‖ exit) in nats, exit top-1 == full top-1);
    exiting at E skips num_layers − E layers. allowed_errors / allowed_nll: the budgets summed over the n tokens
    (`exit_gates.allowed_errors` / `allowed_nll`; math.inf for none)."""
    exits = sorted(kl)
    if not exits or sorted(agree) != exits:
        raise OptionError(f"skip_ceiling: kl and agree must name the same non-empty exits, got {sorted(kl)} and "
                          f"{sorted(agree)}")
    if any(not 1 <= e < num_layers for e in exits):
        raise OptionError(f"skip_ceiling: exits {exits} outside [1, {num_layers - 1}]")
    # column 0: no exit (nothing skipped, nothing added)
    cost = torch.stack([torch.zeros_like(kl[exits[0]].flatten(), dtype=torch.float64),
                        *(kl[e].flatten().double() for e in exits)], 1)
    wrong = torch.stack([torch.zeros(cost.shape[0], dtype=torch.float64),
                         *((~agree[e].flatten().bool()).double() for e in exits)], 1)
    gain = torch.tensor([0.0, *(num_layers - e for e in exits)], dtype=torch.float64)
    n = cost.shape[0]
    best, upper = None, float(n * gain.max())  # every token at the first exit bounds any assignment
    for mu in _MUS.tolist():
        if mu and allowed_errors == float("inf"):
            break
        value = gain - mu * wrong
        for lam in _LAMBDAS.tolist():
            if lam and allowed_nll == float("inf"):
                break
            v = value - lam * cost
            top, choice = v.max(1)
            dual = float(top.sum()) + (lam * allowed_nll if lam else 0.0) + (mu * allowed_errors if mu else 0.0)
            upper = min(upper, dual)
            rows = torch.arange(n)
            added, errors = float(cost[rows, choice].sum()), float(wrong[rows, choice].sum())
            if added <= allowed_nll and errors <= allowed_errors:
                skipped = float(gain[choice].sum())
                if best is None or skipped > best[0]:
                    best = (skipped, errors, added, choice)
    if best is None:  # nobody exits: always feasible
        best = (0.0, 0.0, 0.0, torch.zeros(n, dtype=torch.long))
    skipped, errors, added, choice = _fill(best, gain, cost, wrong, allowed_errors, allowed_nll)
    return SkipCeiling(skipped / (n * num_layers), max(upper, skipped) / (n * num_layers), 1 - errors / n, added / n,
                       {e: (choice == i + 1).double().mean().item() for i, e in enumerate(exits)})


def _fill(best, gain, cost, wrong, allowed_errors: float, allowed_nll: float):
    """Spend what the Lagrangian assignment left of the budgets: it moves all tokens that tie at a multiplier or none
    (with the error budget alone, every agreeing token of an exit ties), so take the moves to an earlier exit in order
    of layers gained per share of the budgets used, while they fit."""
    skipped, errors, added, choice = best
    choice = choice.clone()
    rows = torch.arange(choice.numel())
    d_gain = gain[None, :] - gain[choice][:, None]
    d_cost = cost - cost[rows, choice][:, None]
    d_wrong = wrong - wrong[rows, choice][:, None]
    used = _share(d_cost, allowed_nll) + _share(d_wrong, allowed_errors)
    ratio = torch.where(d_gain > 0, d_gain / (used + 1e-12), -1.0)
    order = ratio.flatten().argsort(descending=True)
    order = order[ratio.flatten()[order] > 0]
    moved = torch.zeros(choice.numel(), dtype=torch.bool)
    for flat in order.tolist():
        i, e = divmod(flat, gain.numel())
        if moved[i]:
            continue
        new_added, new_errors = added + float(d_cost[i, e]), errors + float(d_wrong[i, e])
        if new_added <= allowed_nll and new_errors <= allowed_errors:
            choice[i], moved[i] = e, True
            skipped, added, errors = skipped + float(d_gain[i, e]), new_added, new_errors
    return skipped, errors, added, choice


def _share(delta: torch.Tensor, budget: float) -> torch.Tensor:
    """The share of a summed budget an increase takes (none of an unbounded one; all of an empty one)."""
    if budget == float("inf"):
        return torch.zeros_like(delta)
    return delta.clamp_min(0) / max(budget, 1e-12)
