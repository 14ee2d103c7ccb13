"""Tests for llmcompress/calibration/stats.py: every statistic against a float64 oracle over all rows at once, fed in
uneven chunks that also cross the converter's row blocks; GPTQ's Hessian is `gram` doubled, bit for bit."""

from __future__ import annotations

import pytest
import torch

from llmcompress.calibration import stats as stats_mod
from llmcompress.calibration.stats import Statistics, statistics_of


def _activations(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Chunks of (..., 24) activations with a few large channels, and the same rows 'in the float model'."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(24)
    scale[[3, 17]] = 20.0
    shapes = [(2, 7, 24), (13, 24), (1, 29, 24)]
    xs = [torch.randn(s, generator=g) * scale + 0.3 for s in shapes]
    floats = [x + 0.05 * torch.randn(x.shape, generator=g) for x in xs]
    return xs, floats


def test_every_kind_matches_a_float64_oracle(monkeypatch):
    monkeypatch.setattr(stats_mod, "_CHUNK_ROWS", 5)  # 5-row blocks: chunks of 14, 13 and 29 rows split unevenly
    xs, floats = _activations()
    st = statistics_of(xs, ("gram", "cross", "absmax", "absmean", "sqnorm"), 24, floats)
    x = torch.cat([t.reshape(-1, 24) for t in xs]).double()
    xf = torch.cat([t.reshape(-1, 24) for t in floats]).double()
    t = x.shape[0]
    assert st.rows == t == 56
    torch.testing.assert_close(st.gram.double(), x.T @ x / t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.cross.double(), x.T @ (x - xf) / t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.absmax.double(), x.abs().amax(dim=0), rtol=0, atol=0)
    torch.testing.assert_close(st.absmean.double(), x.abs().mean(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.sqnorm.double(), x.square().sum(dim=0), rtol=1e-6, atol=1e-6)


def test_cross_without_float_rows_adds_nothing_but_counts_the_rows():
    xs, floats = _activations(1)
    # The first chunk equals the float model's (nothing quantized before it): its rows dilute the mean.
    st = statistics_of(xs, ("cross",), 24, [None, *floats[1:]])
    x = torch.cat([t.reshape(-1, 24) for t in xs]).double()
    xf = torch.cat([xs[0].reshape(-1, 24), *(t.reshape(-1, 24) for t in floats[1:])]).double()
    torch.testing.assert_close(st.cross.double(), x.T @ (x - xf) / x.shape[0], rtol=1e-5, atol=1e-6)


def test_gram_doubled_is_gptqs_hessian_bit_for_bit():
    from llmcompress.calibration.hessian import HessianAccumulator

    xs, _ = _activations(2)
    acc = HessianAccumulator(24)
    st = Statistics(24, ("gram",))
    for x in xs:
        acc.add(x)
        st.add(x)
    assert torch.equal(2 * st.gram, acc.hessian)


def test_bad_requests_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown kind 'xtx'.*gram"):
        Statistics(4, ("xtx",))
    st = Statistics(4, ("gram",))
    with pytest.raises(ValueError, match=r"expected inputs \(\.\.\., 4\)"):
        st.add(torch.randn(3, 5))
    with pytest.raises(AttributeError, match="no 'absmax'.*gram"):
        st.absmax  # noqa: B018
