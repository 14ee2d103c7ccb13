"""Tests for llmcompress/passes/quantize/gptq.py: the Hessian accumulator, GPTQ int4/int8 against round-to-nearest and
against a direct float64 implementation of the OBQ update, dead inputs and singular Hessians."""

from __future__ import annotations

import pytest
import torch

from llmcompress.formats import quantized as formats
from llmcompress.passes.quantize.gptq import GPTQError, HessianAccumulator, gptq_quantize_int4, gptq_quantize_int8
from llmcompress.testing.numerics import outlier_layer, sqnr_db


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return (2.0 / x.shape[0]) * x.T.double() @ x.double()


def _out_mse(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return (x @ (wq - w).T).pow(2).mean().item()


def test_hessian_accumulator_chunks_equal_one_shot():
    _, x = outlier_layer(k=256, t=1000)
    acc = HessianAccumulator(256)
    acc.add(x[:1].reshape(1, 1, 256))
    acc.add(x[1:301].reshape(3, 100, 256).to(torch.bfloat16).float())  # (..., K) inputs
    acc.add(x[301:])
    h = acc.hessian
    assert acc.rows == 1000 and h.dtype == torch.float32 and h.shape == (256, 256)
    ref = _hessian(torch.cat((x[:1], x[1:301].to(torch.bfloat16).float(), x[301:])))
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_hessian_accumulator_rejects_wrong_width():
    with pytest.raises(ValueError, match="256"):
        HessianAccumulator(256).add(torch.randn(4, 128))


@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_int4_beats_rtn(group_size, act_order, outliers):
    w, x = outlier_layer(outliers=outliers)
    qweight, scales, zeros = gptq_quantize_int4(w, _hessian(x).float(), group_size=group_size, act_order=act_order)

    assert qweight.shape == (128, 256) and qweight.dtype == torch.uint8
    assert scales.shape == zeros.shape == (128, 512 // group_size)
    assert scales.dtype == zeros.dtype == torch.float16
    assert bool((scales > 0).all()) and bool(torch.isfinite(scales).all())
    assert bool((zeros == zeros.round()).all()) and 0 <= zeros.min() and zeros.max() <= 15

    wq = formats.dequantize_int4(qweight, scales, zeros, group_size)
    w_rtn = formats.dequantize_int4(*formats.quantize_int4_rtn(w, group_size), group_size)
    # Measured: output MSE 51-55 % below RTN's; 76-78 % with act_order on the outlier inputs.
    assert _out_mse(x, w, wq) < 0.6 * _out_mse(x, w, w_rtn)
    # GPTQ trades weight error for output error. Without outliers the weights stay within ~4 dB of RTN's SQNR
    # (17-20 dB); 50x outlier channels make H so anisotropic that the other columns move much more (5.6-10.5 dB).
    assert sqnr_db(w, wq) > (4.0 if outliers else sqnr_db(w, w_rtn) - 5.0)


def _obq_reference(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float) -> torch.Tensor:
    """GPTQ without Cholesky or lazy batches, in float64: after each column, its error spreads through the inverse
    Hessian of the remaining columns, which is then updated by eliminating that column (the OBQ formula).
    Returns the codes (N, K)."""
    w = w.double().clone()
    h = h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            scale, zero = formats.int4_scales_zeros(w[:, j:j + group_size], group_size)
            scale, zero = scale[:, 0].to(torch.float16).double(), zero[:, 0].double()
        q = torch.round(w[:, j] / scale + zero).clamp(0, 15)
        codes[:, j] = q
        err = (w[:, j] - (q - zero) * scale) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv -= hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


def test_gptq_int4_matches_direct_obq_update():
    w, x = outlier_layer(n=64, k=128, t=512, seed=1)
    h = _hessian(x)
    ref = _obq_reference(w, h, group_size=32, damp=0.01)
    qweight, _, _ = gptq_quantize_int4(w, h.float(), group_size=32, block_size=32)
    # A float32 rounding can flip one code near a .5 boundary, and the error feedback then shifts a few more in
    # that row; measured agreement 100 %.
    assert (formats.unpack_int4(qweight).double() == ref).double().mean() > 0.99


def test_gptq_int4_lazy_blocks_do_not_change_the_result():
    w, x = outlier_layer(k=256, t=512, seed=2)
    h = _hessian(x).float()
    q_ref = formats.unpack_int4(gptq_quantize_int4(w, h, group_size=32, block_size=256)[0])
    for block_size in (1, 32, 96):  # 96: groups straddle block ends
        q = formats.unpack_int4(gptq_quantize_int4(w, h, group_size=32, block_size=block_size)[0])
        assert (q == q_ref).float().mean() > 0.995


def test_gptq_int4_dead_inputs():
    w, x = outlier_layer(k=256, t=512, seed=3)
    dead = torch.tensor([0, 5, 100, 255])
    x[:, dead] = 0.0
    qweight, scales, zeros = gptq_quantize_int4(w, _hessian(x).float(), group_size=64)
    wq = formats.dequantize_int4(qweight, scales, zeros, 64)
    assert bool(torch.isfinite(wq).all())
    assert bool((wq[:, dead] == 0).all())  # as in the reference: weights that never reach the output become 0
    w_rtn = formats.dequantize_int4(*formats.quantize_int4_rtn(w, 64), 64)
    assert _out_mse(x, w, wq) < 0.7 * _out_mse(x, w, w_rtn)  # measured 0.58


def test_gptq_int4_singular_hessian_retries_damping():
    # 64 rows for 256 inputs, and 32 duplicated columns: H has rank < 64. With damp=1e-7 the float32 Cholesky
    # fails (measured: up to 1e-6) and the damping grows until it succeeds.
    w, x = outlier_layer(k=256, t=64, seed=4)
    x[:, 32:64] = x[:, :32]
    h = _hessian(x).float()
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        qweight, scales, zeros = gptq_quantize_int4(w, h, group_size=64, damp=1e-7)
    wq = formats.dequantize_int4(qweight, scales, zeros, 64)
    assert bool(torch.isfinite(wq).all())
    w_rtn = formats.dequantize_int4(*formats.quantize_int4_rtn(w, 64), 64)
    # 64 rows leave most of the 256 weights per output free, so GPTQ fits those rows closely (measured 0.13 of
    # RTN's error; the weights themselves drift far, which is why the default damping is 1e-2).
    assert _out_mse(x, w, wq) < 0.5 * _out_mse(x, w, w_rtn)


def test_gptq_rejects_unusable_hessians_and_bad_arguments():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(GPTQError, match="not positive definite"):
        gptq_quantize_int4(w, -torch.eye(64), group_size=32)
    h_nan = torch.eye(64)
    h_nan[3, 3] = float("nan")
    with pytest.raises(GPTQError, match="NaN"):
        gptq_quantize_int4(w, h_nan, group_size=32)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_int4(w, torch.eye(32), group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize_int4(w, torch.eye(64), group_size=48)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize_int4(w, torch.eye(64), group_size=32, damp=0.0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_int8_beats_rtn(act_order):
    w, x = outlier_layer(k=256, t=512, seed=6)
    qweight, scale = gptq_quantize_int8(w, _hessian(x).float(), act_order=act_order)
    assert qweight.shape == (128, 256) and qweight.dtype == torch.int8
    assert scale.shape == (128,) and scale.dtype == torch.float32
    assert qweight.min() >= -127
    wq = formats.dequantize_int8(qweight, scale)
    w_rtn = formats.dequantize_int8(*formats.quantize_int8_per_channel(w))
    # Measured: output MSE 54 % (72 % with act_order) below per-channel RTN's.
    assert _out_mse(x, w, wq) < 0.6 * _out_mse(x, w, w_rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_mse_group_ranges_lower_the_error(act_order):
    w, x = outlier_layer(seed=4)
    h = _hessian(x)
    plain = formats.dequantize_int4(*gptq_quantize_int4(w, h, group_size=128, act_order=act_order), 128)
    mse = formats.dequantize_int4(*gptq_quantize_int4(w, h, group_size=128, act_order=act_order, mse=True), 128)
    assert _out_mse(x, w, mse) < 0.97 * _out_mse(x, w, plain)


def test_mse_ranges_beat_min_max_per_group():
    w, _ = outlier_layer(seed=5)
    for params in (formats.int4_scales_zeros, formats.int4_scales_zeros_mse):
        s, z = params(w, 64)
        s16 = s.to(torch.float16)
        q = formats.quantize_int4(w, s16, z, 64)
        err = ((formats.dequantize_int4(formats.pack_int4(q), s16, z.to(torch.float16), 64) - w).abs() ** 2.4)
        if params is formats.int4_scales_zeros:
            base = err.reshape(w.shape[0], -1, 64).sum(-1)
        else:
            # Never clearly worse (the zero is rounded with the float16 scale, min/max's with the float32 one).
            assert (err.reshape(w.shape[0], -1, 64).sum(-1) <= base * 1.02).all()
            assert err.sum() < 0.95 * base.sum()
