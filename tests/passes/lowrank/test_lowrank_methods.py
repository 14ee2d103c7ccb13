"""The low-rank methods on their own: exact at full rank, the error curve equals the measured output error, whitened
truncation (SVD-LLM) beats plain SVD on correlated inputs, ASVD on inputs with outlier channels, the closed-form refit
lowers the error, a singular XᵀX is damped with a warning, and the rank allocation meets its budget exactly."""

from __future__ import annotations

import pytest
import torch

from llmcompress.calibration.hessian import HessianError, damped_cholesky
from llmcompress.calibration.stats import statistics_of
from llmcompress.passes.lowrank.allocate import LayerCurve, allocate_ranks, kept_params
from llmcompress.passes.lowrank.asvd import asvd
from llmcompress.passes.lowrank.factors import refit_u
from llmcompress.passes.lowrank.svd import svd
from llmcompress.passes.lowrank.svdllm import svd_llm


def _data(n=48, k=40, rows=600, seed=0):
    """W (n, k) and inputs (rows, k) with correlated channels and a few outlier channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1, k, dtype=torch.float64)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= 8  # outlier channels
    return w, x


def _stats(x):
    return statistics_of([x.float()], ("gram", "absmean"), x.shape[1])


def _out_err(w, u, v, x):
    """Mean squared output error over the rows: mean ||(W - U V) x||²."""
    return float((x @ (w - u @ v).T).square().sum(1).mean())


def _decompositions(w, st):
    return {"svd": svd(w), "asvd": asvd(w, st.absmean), "svd-llm": svd_llm(w, st.gram, damp=1e-9)}


def test_every_method_is_exact_at_full_rank():
    w, x = _data()
    for name, d in _decompositions(w, _stats(x)).items():
        u, v = d.factors(min(w.shape))
        torch.testing.assert_close(u @ v, w, atol=1e-8, rtol=1e-8, msg=name)


def test_the_error_curve_is_the_measured_output_error():
    w, x = _data()
    st = _stats(x)
    gram = (x.T @ x) / x.shape[0]
    for name, d in _decompositions(w, st).items():
        curve = d.error_curve(gram)
        for r in (1, 7, 20, 33):
            u, v = d.factors(r)
            assert abs(float(curve[r]) - _out_err(w, u, v, x)) < 1e-6 * float(curve[0]), (name, r)


def test_whitened_truncation_beats_plain_svd_and_asvd_beats_it_on_outlier_channels():
    w, x = _data()
    st = _stats(x)
    d = _decompositions(w, st)
    for r in (5, 12, 20):
        errs = {name: _out_err(w, *dec.factors(r), x) for name, dec in d.items()}
        assert errs["svd-llm"] < 0.8 * errs["svd"], (r, errs)
        assert errs["asvd"] < errs["svd"], (r, errs)
        assert errs["svd-llm"] <= errs["asvd"] * (1 + 1e-9), (r, errs)  # the optimum over rank-r weights


def test_refit_lowers_the_error_and_pulls_towards_the_float_models_outputs():
    w, x = _data()
    st = _stats(x)
    u, v = svd(w).factors(10)
    refit = refit_u(w, v, st.gram)
    assert _out_err(w, refit, v, x) < 0.9 * _out_err(w, u, v, x)
    # Inputs shifted by the layers split before (x) against the float model's (xf): refit with `cross` is the least
    # squares fit of W xf from V x (solved here by lstsq), not of W x.
    g = torch.Generator().manual_seed(9)
    xf = x @ (torch.eye(x.shape[1], dtype=torch.float64) + 0.2 * torch.randn(x.shape[1], x.shape[1], generator=g,
                                                                             dtype=torch.float64))
    s = statistics_of([x.float()], ("gram", "cross"), x.shape[1], float_rows=[xf.float()])
    towards_float = refit_u(w, v, s.gram, s.cross)
    lstsq = torch.linalg.lstsq(x @ v.T, xf @ w.T).solution.T
    torch.testing.assert_close(towards_float, lstsq, atol=1e-4 * float(lstsq.abs().max()), rtol=1e-4)

    def err_to_float(uu):
        return float((xf @ w.T - x @ v.T @ uu.T).square().sum(1).mean())

    assert err_to_float(towards_float) < 0.95 * err_to_float(refit_u(w, v, s.gram))


def test_a_singular_gram_is_damped_with_a_warning():
    w, _ = _data()
    x = torch.randn(600, 5, dtype=torch.float64) @ torch.randn(5, 40, dtype=torch.float64)  # rank 5 of 40
    gram = (x.T @ x / 600).float()
    with pytest.warns(RuntimeWarning, match="damped with damp="):
        d = svd_llm(w, gram.double() - 1e-3 * torch.eye(40, dtype=torch.float64), damp=1e-6)
    assert torch.isfinite(d.right).all()
    with pytest.raises(HessianError, match="zero"):
        damped_cholesky(torch.zeros(4, 4), 0.01)


def _curves(seed=0, count=7):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(count):
        n, k = int(torch.randint(20, 90, (1,), generator=g)), int(torch.randint(20, 90, (1,), generator=g))
        s = torch.rand(min(n, k), generator=g, dtype=torch.float64).sort(descending=True).values ** (1 + i)
        tail = s.square().flip(0).cumsum(0).flip(0)
        layers.append(LayerCurve(n, k, torch.cat([tail, tail.new_zeros(1)])))
    return layers


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocated_ranks_meet_the_budget_exactly(ratio, seed):
    layers = _curves(seed)
    total = sum(x.n * x.k for x in layers)
    budget = int(ratio * total)
    ranks = allocate_ranks(layers, budget)
    kept = kept_params(layers, ranks)
    assert kept <= budget
    # No step fits in what is left: another rank of any split layer, or a layer at its last rank going dense.
    for x, r in zip(layers, ranks):
        if r is None:
            continue
        step = x.n + x.k if r < x.max_split_rank else x.n * x.k - r * (x.n + x.k)
        assert budget - kept < step, (x, r, budget - kept)
        assert 1 <= r <= x.max_split_rank


def test_allocation_gives_ranks_where_the_error_falls_slowest():
    flat = torch.linspace(1, 0, 65, dtype=torch.float64)  # every rank removes the same error
    steep = torch.cat([torch.tensor([1.0, 0.01], dtype=torch.float64), torch.zeros(63, dtype=torch.float64)])
    layers = [LayerCurve(64, 64, steep), LayerCurve(64, 64, flat)]  # the steep one first: ties would favour it
    ranks = allocate_ranks(layers, int(0.5 * 2 * 64 * 64))
    assert ranks[0] is not None and ranks[0] <= 2 and (ranks[1] is None or ranks[1] > 20), ranks
    with pytest.raises(ValueError, match="below rank 1"):
        allocate_ranks(layers, 100)
