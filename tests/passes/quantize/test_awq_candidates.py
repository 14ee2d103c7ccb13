"""The range search's candidate scoring in llmcompress/passes/quantize/awq.py (`_best_candidate`), in batches small
enough to split the candidates, against a float64 oracle: the errors and the best candidate, the quadratic terms it
keeps, and the sweeps' re-scoring from those terms (no matmul), which must pick what a full scoring picks; and
`awq_from_stats` on streamed statistics against `awq_search` on the rows."""

from __future__ import annotations

import pytest
import torch

from llmcompress.calibration.stats import statistics_of
from llmcompress.formats import quantized as formats
from llmcompress.passes.quantize import awq


def _problem(seed: int = 0):
    """A (37, 32) group column, 13 candidate ranges per row, a PSD block and two coupling terms."""
    g = torch.Generator().manual_seed(seed)
    wj = torch.randn(37, 32, generator=g) * 0.1
    lo, hi = awq._range(wj)
    shrink = torch.linspace(1.0, 0.5, 13)[:, None, None]
    scales, zeros = awq._params(shrink * lo, shrink.flip(0) * hi)
    x = torch.randn(200, 32, generator=g) * (1 + 3 * torch.rand(32, generator=g))
    hjj = x.T @ x / 200
    cross1 = torch.randn(37, 32, generator=g) * 0.01
    cross2 = torch.randn(37, 32, generator=g) * 0.01
    return wj, scales, zeros, hjj, cross1, cross2


def _oracle(wj, scales, zeros, hjj, cross):
    """(quadratic terms (C, n), errors (C, n)) in float64 from `_deq`'s dequantization errors."""
    d = (awq._deq(wj, scales, zeros) - wj).double()  # (C, n, g)
    quad = torch.einsum("cng,gh,cnh->cn", d, hjj.double(), d)
    return quad, quad + 2 * (d * cross.double()).sum(dim=2)


def test_candidates_in_batches_match_a_float64_oracle(monkeypatch):
    monkeypatch.setattr(awq, "_CPU_CANDIDATE_ELEMS", 3 * 37 * 32)  # 3 candidates per batch: 5 batches
    wj, scales, zeros, hjj, cross1, cross2 = _problem()
    quad_ref, e_ref = _oracle(wj, scales, zeros, hjj, cross1)
    best_e, best_i, quad = awq._best_candidate(wj, scales, zeros, hjj, cross1, keep_quad=True)
    assert torch.equal(best_i, e_ref.argmin(dim=0))
    assert len(set(best_i.tolist())) > 3  # the rows do not all agree: the batches' indices are really merged
    torch.testing.assert_close(best_e.double(), e_ref.min(dim=0).values, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(quad.double(), quad_ref, rtol=1e-4, atol=1e-9)
    # A sweep re-scores the same candidates against other couplings from the kept quadratic terms.
    _, e2_ref = _oracle(wj, scales, zeros, hjj, cross2)
    for _ in range(2):  # twice: the kept terms must not change under it
        e2, i2, _ = awq._best_candidate(wj, scales, zeros, None, cross2, quad)
        assert torch.equal(i2, e2_ref.argmin(dim=0))
        torch.testing.assert_close(e2.double(), e2_ref.min(dim=0).values, rtol=1e-4, atol=1e-9)
    full_e, full_i, _ = awq._best_candidate(wj, scales, zeros, hjj, cross2)
    assert torch.equal(i2, full_i) and torch.equal(e2, full_e)


def test_awq_from_streamed_statistics_is_awq_on_the_rows():
    from llmcompress.testing.numerics import outlier_layer

    w, x = outlier_layer(n=64, k=256, t=1000, seed=5)
    xf = x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    whole = awq.awq_search(w, x, group_size=64, x_float=xf)
    chunks = [x[:300], x[300:301], x[301:]]
    st = statistics_of(chunks, ("absmean", "gram", "cross"), 256, [xf[:300], xf[300:301], xf[301:]])
    streamed = awq.awq_from_stats(w, st.absmean, st.gram, st.cross, group_size=64)
    assert streamed.alpha == whole.alpha and streamed.clipped == whole.clipped
    assert streamed.loss_awq == pytest.approx(whole.loss_awq, rel=1e-4, abs=1e-8)
    # Float rounding of the statistics may move a code at a rounding boundary, never more (measured: none moves,
    # act_scale within 2e-7).
    assert (whole.qweight != streamed.qweight).float().mean() < 1e-3
    torch.testing.assert_close(streamed.act_scale, whole.act_scale, rtol=1e-5, atol=0)
    wq = [formats.dequantize_int4(r.qweight, r.scales, r.zeros, 64) * r.act_scale for r in (whole, streamed)]
    assert (wq[0] - wq[1]).norm() < 1e-4 * wq[0].norm()
