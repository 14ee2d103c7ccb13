"""`llmcompress.exit_ceiling.skip_ceiling` against exhaustive search: on instances small enough to try every assignment
of tokens to exits, its feasible assignment meets both budgets and skips no more than the true optimum, and its upper
bound is at least the optimum (and within the relaxation's gap of it)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llmcompress.errors import OptionError
from llmcompress.exit_ceiling import skip_ceiling

LAYERS = 5
EXITS = (1, 2, 4)


def _instance(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    # later exits cost less and err less, as trained exits do
    kl = {e: torch.rand(n, generator=g, dtype=torch.float64) * (LAYERS - e) * 0.3 for e in EXITS}
    agree = {e: torch.rand(n, generator=g) < 0.35 + 0.12 * e for e in EXITS}
    return kl, agree


def _optimum(kl, agree, allowed_errors, allowed_nll) -> float:
    """Most layers skipped over every assignment of the n tokens to {no exit, *EXITS}."""
    n = next(iter(kl.values())).numel()
    best = 0.0
    for choice in itertools.product((0, *EXITS), repeat=n):
        added = sum(kl[e][i].item() for i, e in enumerate(choice) if e)
        errors = sum(int(not agree[e][i]) for i, e in enumerate(choice) if e)
        if added <= allowed_nll and errors <= allowed_errors:
            best = max(best, sum(LAYERS - e for e in choice if e))
    return best / (n * LAYERS)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budgets", [(1.0, 0.5), (3.0, 1.5), (0.0, math.inf), (math.inf, 0.8)])
def test_skip_ceiling_brackets_the_exhaustive_optimum(seed, budgets):
    allowed_errors, allowed_nll = budgets
    kl, agree = _instance(seed)
    n = kl[EXITS[0]].numel()
    got = skip_ceiling(kl, agree, LAYERS, allowed_errors=allowed_errors, allowed_nll=allowed_nll)
    best = _optimum(kl, agree, allowed_errors, allowed_nll)
    assert got.feasible <= best + 1e-12 <= got.upper + 2e-12
    # the feasible assignment's own accounting holds its budgets
    assert (1 - got.agreement) * n <= allowed_errors + 1e-9
    assert got.nll_per_token * n <= allowed_nll + 1e-9
    skipped = sum(share * n * (LAYERS - e) for e, share in got.exit_share.items())
    assert skipped / (n * LAYERS) == pytest.approx(got.feasible)
    # the relaxation is tight up to about one token's choice on instances this small
    assert got.upper - best <= (LAYERS - 1) / (n * LAYERS) * 2 + 1e-12
    assert best - got.feasible <= (LAYERS - 1) / (n * LAYERS) * 2 + 1e-12


def test_skip_ceiling_without_budgets_exits_every_token_first():
    kl, agree = _instance(0)
    got = skip_ceiling(kl, agree, LAYERS, allowed_errors=math.inf, allowed_nll=math.inf)
    assert got.feasible == got.upper == pytest.approx((LAYERS - EXITS[0]) / LAYERS)
    assert got.exit_share[EXITS[0]] == 1.0


def test_skip_ceiling_refuses_mismatched_exits():
    kl, agree = _instance(0)
    with pytest.raises(OptionError, match="same non-empty exits"):
        skip_ceiling(kl, {1: agree[1]}, LAYERS, allowed_errors=1.0, allowed_nll=1.0)
    with pytest.raises(OptionError, match="outside"):
        skip_ceiling({7: kl[1]}, {7: agree[1]}, LAYERS, allowed_errors=1.0, allowed_nll=1.0)


@pytest.mark.parametrize("budgets", [(40.0, math.inf), (40.0, 30.0), (0.0, 12.0)])
def test_skip_ceiling_closes_on_many_tokens(budgets):
    """Where exhaustive search is out of reach the two bounds meet: the feasible assignment spends the budgets the
    multipliers leave (with the error budget alone every agreeing token of an exit ties at one multiplier)."""
    allowed_errors, allowed_nll = budgets
    kl, agree = _instance(7, n=2000)
    got = skip_ceiling(kl, agree, LAYERS, allowed_errors=allowed_errors, allowed_nll=allowed_nll)
    assert 0 < got.feasible <= got.upper
    assert got.upper - got.feasible < 0.003
