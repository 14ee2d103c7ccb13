"""GPTQ (Frantar et al. 2022): quantize one linear layer's weight column by column, feeding each column's rounding
error back into the columns not yet quantized through the inverse Hessian of the layer's inputs.

Entry points: `HessianAccumulator` (fed the layer's calibration inputs, in chunks), then `gptq_quantize_int4` (the
int4 group format of `formats.py`) or `gptq_quantize_int8` (int8 per output channel). Follows the reference
implementation (github.com/IST-DASLab/gptq, `GPTQ.fasterquant`): dead inputs, relative damping, the upper Cholesky
factor of H^-1, lazy batch updates, and static groups under act_order.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from llmcompress.errors import LLMCompressError, OptionError
from llmcompress.formats import quantized as formats

# Damping multipliers tried in turn when H + damp * mean(diag H) * I is not numerically positive definite.
_DAMP_RETRIES = (1.0, 10.0, 100.0, 1000.0)
# Rows converted to float32 at a time in `HessianAccumulator.add`, so a (50k, 4096) bf16 chunk never becomes a
# second, float32 copy of itself.
_ADD_CHUNK_ROWS = 8192


class GPTQError(LLMCompressError):
    """The damped Hessian stayed singular (or non-finite), so GPTQ cannot run on this layer."""


class HessianAccumulator:
    """Running H = 2/n * sum_t x_t x_t^T (K, K) float32 over the n rows seen so far.

    The mean, not the sum, as in the reference: H's scale then does not grow with the calibration set, and the
    relative damping `damp * mean(diag H)` means the same thing for any number of rows.
    """

    def __init__(self, k: int, device: torch.device | str | None = None):
        self.hessian = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., K), any float dtype and device (moved to the accumulator's)."""
        k = self.hessian.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"HessianAccumulator: expected inputs (..., {k}), got {tuple(x.shape)}")
        x = x.reshape(-1, k)
        for start in range(0, x.shape[0], _ADD_CHUNK_ROWS):
            chunk = x[start:start + _ADD_CHUNK_ROWS].to(self.hessian.device, torch.float32)
            n = chunk.shape[0]
            self.hessian.mul_(self.rows / (self.rows + n))
            self.rows += n
            self.hessian.addmm_(chunk.T, chunk, alpha=2.0 / self.rows)


def _check_args(w: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"GPTQ: weight must be (N, K), got {tuple(w.shape)}")
    k = w.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"GPTQ: Hessian must be ({k}, {k}) for a weight {tuple(w.shape)}, got {tuple(hessian.shape)}")
    if not damp > 0:
        raise OptionError(f"GPTQ: damp must be > 0, got {damp!r}")
    if block_size < 1:
        raise OptionError(f"GPTQ: block_size must be >= 1, got {block_size!r}")


def _prepare(w: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of W (N, K) and H (K, K) with dead inputs handled as in the reference.

    A dead input (H_jj == 0: the column of X is all zeros) gets H_jj = 1 so H can be inverted, and its weights are
    set to 0: they never reach the output, and 0 then quantizes exactly.
    """
    w = w.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(w.device, torch.float32, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise GPTQError("GPTQ: the Hessian has NaN or inf entries (non-finite calibration activations?)")
    diag = h.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[None, :], 0.0)
    return w, h


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, H (K, K) float32 -> U (K, K).

    Row j of U, divided by U_jj, is how the error of column j spreads over the later columns (the reference's
    `Hinv`). When the damped H is still not positive definite in float32 (collinear inputs, very few rows), the
    damping grows tenfold a few times, with a warning.
    """
    mean_diag = h.diagonal().mean()
    for mult in _DAMP_RETRIES:
        hd = h.clone()
        hd.diagonal().add_(damp * mult * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if mult != 1.0:
                    warnings.warn(f"GPTQ: Hessian not positive definite with damp={damp:g}; used damp={damp * mult:g}",
                                  RuntimeWarning, stacklevel=3)
                return u
    raise GPTQError(f"GPTQ: Hessian not positive definite even with damp={damp * _DAMP_RETRIES[-1]:g} "
                    f"(relative to mean(diag H)); check the calibration activations of this layer")


# (column index in processing order, the block's working copy of W, the column's index in that block)
#   -> (scale (N,), zero (N,)) float32 with which that column is rounded
ParamsFn = Callable[[int, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _gptq_loop(w: torch.Tensor, u: torch.Tensor, block_size: int, params_at: ParamsFn,
               qmin: int, qmax: int) -> torch.Tensor:
    """The GPTQ sweep over the columns of w (N, K) float32 in processing order, with U (K, K) from
    `_inverse_hessian_cholesky` in the same order. Returns the codes (N, K) float32 (integers in [qmin, qmax]).

    Lazy batch updates: the error of each column updates only the rest of its block at once; the block's errors
    then update every later column with one matmul. `w` is updated in place past each block.
    """
    n, k = w.shape
    codes = torch.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            scale, zero = params_at(i1 + i, w1, i)
            col = w1[:, i]
            q = torch.round(col / scale + zero).clamp_(qmin, qmax)
            codes[:, i1 + i] = q
            e = (col - (q - zero) * scale) / u1[i, i]
            w1[:, i + 1:].addr_(e, u1[i, i + 1:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
    return codes


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
