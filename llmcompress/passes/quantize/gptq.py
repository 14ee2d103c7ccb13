"""GPTQ (Frantar et al. 2022): quantize one linear layer's weight column by column, feeding each column's rounding
error back into the columns not yet quantized through the inverse Hessian of the layer's inputs.

Entry points: `HessianAccumulator` (fed the layer's calibration inputs, in chunks), then `gptq_quantize_int4` (the
int4 group format of `formats.py`) or `gptq_quantize_int8` (int8 per output channel). Follows the reference
implementation (github.com/IST-DASLab/gptq, `GPTQ.fasterquant`): dead inputs, relative damping, the upper Cholesky
factor of H^-1, lazy batch updates (all of it shared with SparseGPT in `calibration/hessian.py`), and static groups
under act_order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmcompress.calibration.hessian import HessianAccumulator, HessianError, check_args, error_feedback_sweep
from llmcompress.calibration.hessian import inverse_hessian_cholesky as _inverse_hessian_cholesky
from llmcompress.calibration.hessian import prepare as _prepare
from llmcompress.formats import quantized as formats

GPTQError = HessianError  # the name GPTQ's callers and tests know
__all__ = ["GPTQError", "HessianAccumulator", "gptq_quantize_int4", "gptq_quantize_int8"]

# (column index in processing order, the block's working copy of W, the column's index in that block)
#   -> (scale (N,), zero (N,)) float32 with which that column is rounded
ParamsFn = Callable[[int, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _check_args(w: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int) -> None:
    check_args(w, hessian, damp, block_size, "GPTQ")


def _gptq_loop(w: torch.Tensor, u: torch.Tensor, block_size: int, params_at: ParamsFn,
               qmin: int, qmax: int) -> torch.Tensor:
    """The GPTQ sweep (`hessian.error_feedback_sweep`) over the columns of w (N, K) float32 in processing order,
    each column rounded with `params_at`'s scale and zero. Returns the codes (N, K) float32 (integers in
    [qmin, qmax]); `w` is updated in place past each block."""

    def column(j: int, w1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = params_at(j, w1, i)
        q = torch.round(w1[:, i] / scale + zero).clamp_(qmin, qmax)
        return q, (q - zero) * scale

    return error_feedback_sweep(w, u, block_size, column)


def _f16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored (float16, never 0), so the codes are rounded with the scale the kernel dequantizes with."""
    return scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)


def gptq_quantize_int4(w: torch.Tensor, hessian: torch.Tensor, *, group_size: int = 128, damp: float = 0.01,
                       block_size: int = 128, act_order: bool = False, mse: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ into the int4 group format of `formats.py`.

    w: (N, K) weight of y = x @ w.T; hessian: (K, K) from `HessianAccumulator` (any device: moved to w's).
    Returns (qweight uint8 (N, K // 2), scales float16 (N, K // group_size), zeros float16 (N, K // group_size)).

    Without act_order, each group's min/max scale and zero come from the group's weights as error feedback has
    left them when its first column is reached (as the reference does). With act_order (columns in decreasing
    diag(H)), groups must still be contiguous in the original column order for the format, so every group's
    parameters come from the original w up front ("static groups") and each column uses its own group's.
    mse: each group's range is searched for the lowest quantization error (`formats.int4_scales_zeros_mse`)
    instead of taken from its min and max.
    """
    group_params = formats.int4_scales_zeros_mse if mse else formats.int4_scales_zeros
    _check_args(w, hessian, damp, block_size)
    n, k = w.shape
    formats.check_group_size(k, group_size)
    wf, h = _prepare(w, hessian)
    n_groups = k // group_size

    if act_order:
        scale, zero = group_params(wf, group_size)
        scales16 = _f16_scale(scale)
        zeros = zero
        perm = torch.argsort(h.diagonal(), descending=True)
        wf, h = wf[:, perm], h[perm][:, perm]
        group_of = (perm // group_size).tolist()
        col_scale = scales16.float().T.contiguous()  # (G, N): one contiguous row per group
        col_zero = zeros.T.contiguous()

        def params_at(j: int, w1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = group_of[j]
            return col_scale[g], col_zero[g]
    else:
        perm = None
        scales16 = torch.empty(n, n_groups, dtype=torch.float16, device=wf.device)
        zeros = torch.empty(n, n_groups, dtype=torch.float32, device=wf.device)
        current: list[torch.Tensor] = []

        def params_at(j: int, w1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            if j % group_size == 0:
                # The group's current weights: the rest of this block (w1 has the in-block updates), then, if the
                # group runs past the block, the following columns of wf (which, as in the reference, lack this
                # block's updates until its end; never the case when block_size is a multiple of group_size).
                cols = w1[:, i:i + group_size]
                if cols.shape[1] < group_size:
                    i2 = j - i + w1.shape[1]
                    cols = torch.cat((cols, wf[:, i2:j + group_size]), dim=1)
                scale, zero = group_params(cols, group_size)
                g = j // group_size
                scales16[:, g] = _f16_scale(scale[:, 0])
                zeros[:, g] = zero[:, 0]
                current[:] = [scales16[:, g].float(), zeros[:, g].clone()]
            return current[0], current[1]

    u = _inverse_hessian_cholesky(h, damp)
    codes = _gptq_loop(wf, u, block_size, params_at, 0, 15)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return formats.pack_int4(codes.to(torch.uint8)), scales16, zeros.to(torch.float16)


def gptq_quantize_int8(w: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01, block_size: int = 128,
                       act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ into int8 per output channel (`formats.quantize_int8_per_channel`'s scale, from the original w).

    w: (N, K); hessian: (K, K). Returns (qweight int8 (N, K), scale float32 (N,)).
    """
    _check_args(w, hessian, damp, block_size)
    wf, h = _prepare(w, hessian)
    _, scale = formats.quantize_int8_per_channel(wf)
    zero = torch.zeros_like(scale)
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        wf, h = wf[:, perm], h[perm][:, perm]
    u = _inverse_hessian_cholesky(h, damp)
    codes = _gptq_loop(wf, u, block_size, lambda j, w1, i: (scale, zero), -formats.INT8_MAX, formats.INT8_MAX)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8), scale
