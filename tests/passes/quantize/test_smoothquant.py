"""Tests for llmcompress/passes/quantize/smoothquant.py: the smoothing factors, w8a8 accuracy against unsmoothed w8a8 on
outlier activations, and the activation absmax accumulator."""

from __future__ import annotations

import math

import pytest
import torch

from llmcompress.formats import quantized as formats
from llmcompress.passes.quantize.smoothquant import ActivationAbsMax, smoothquant_quantize, smoothquant_scales
from llmcompress.testing.numerics import outlier_layer, sqnr_db


def _w8a8(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """What the w8a8 kernel computes: per-token int8 of x * smooth, times the per-channel int8 weight."""
    qx, xscale = formats.quantize_int8_per_token(x * smooth)
    return (qx.float() * xscale) @ formats.dequantize_int8(qweight, wscale).T


def _absmax(x: torch.Tensor) -> torch.Tensor:
    acc = ActivationAbsMax(x.shape[1])
    acc.add(x)
    return acc.absmax


def test_smoothquant_beats_unsmoothed_w8a8_on_outliers():
    w, x = outlier_layer()
    y = x @ w.T
    plain = sqnr_db(y, _w8a8(x, *formats.quantize_int8_per_channel(w), torch.ones(512)))
    qweight, wscale, smooth = smoothquant_quantize(w, _absmax(x), alpha=0.5)
    smoothed = sqnr_db(y, _w8a8(x, qweight, wscale, smooth))
    # Measured: 29.6 dB unsmoothed, 40.5 dB with alpha=0.5 (36.7 at 0.25, 35.6 at 0.75).
    assert smoothed > plain + 6.0


def test_smoothquant_format_and_round_trip():
    w, x = outlier_layer(n=96, k=256, t=256, seed=1)
    qweight, wscale, smooth = smoothquant_quantize(w, _absmax(x), alpha=0.5)
    assert qweight.shape == (96, 256) and qweight.dtype == torch.int8 and qweight.min() >= -127
    assert wscale.shape == (96,) and wscale.dtype == torch.float32
    assert smooth.shape == (256,) and smooth.dtype == torch.float32
    assert bool((smooth > 0).all()) and bool(torch.isfinite(smooth).all())
    # W' = W diag(s) and smooth = 1/s: the dequantized W' times smooth is W up to int8 rounding.
    assert sqnr_db(w, formats.dequantize_int8(qweight, wscale) * smooth) > 30.0  # measured 33.6 dB


def test_smoothquant_scales_formula_and_clamps():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([[1.0, -4.0, 2.0, 0.0],
                      [-0.5, 2.0, 1.0, 0.0]])
    s = smoothquant_scales(act, w, alpha=0.5)
    assert s.dtype == torch.float32
    # s_j = sqrt(max|X_j|) / sqrt(max|W_j|); a dead channel or an all-zero weight column is clamped at 1e-5.
    expected = torch.tensor([2.0, 0.5, math.sqrt(1e-5) / math.sqrt(2.0), 3.0 / math.sqrt(1e-5)])
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(smoothquant_scales(act, w, alpha=1.0), act.clamp_min(1e-5))
    torch.testing.assert_close(smoothquant_scales(act, w, alpha=0.0), 1 / w.abs().amax(dim=0).clamp_min(1e-5))
    assert bool(torch.isfinite(1 / smoothquant_scales(torch.zeros(4), torch.zeros(2, 4))).all())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_smoothquant_rejects_bad_alpha(alpha):
    w, x = outlier_layer(n=8, k=16, t=8, seed=2)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_quantize(w, _absmax(x), alpha=alpha)


def test_activation_absmax_chunks_equal_one_shot():
    _, x = outlier_layer(k=64, t=300, seed=3)
    acc = ActivationAbsMax(64)
    acc.add(x[:100].reshape(4, 25, 64).to(torch.bfloat16))
    acc.add(x[100:100])  # empty chunks are fine
    acc.add(x[100:])
    expected = torch.cat((x[:100].to(torch.bfloat16).float(), x[100:])).abs().amax(dim=0)
    assert acc.rows == 300 and acc.absmax.dtype == torch.float32
    torch.testing.assert_close(acc.absmax, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="64"):
        acc.add(torch.randn(2, 32))
