"""The optimal-brain-surgeon machinery GPTQ and SparseGPT (Frantar et al. 2022, 2023) share: the Hessian of a linear
layer's inputs, its damped inverse Cholesky factor, and the column sweep that feeds each column's error into the
columns not yet processed, with lazy block updates.

Entry points: `HessianAccumulator` (fed a layer's calibration inputs in chunks), `prepare` (float32 copies, dead
inputs), `inverse_hessian_cholesky` (damping with retries), `damped_cholesky` (the factor of H itself, for SVD-LLM's
whitening), `error_feedback_sweep` (the sweep; the caller says what
each column becomes: rounded for GPTQ, masked for SparseGPT, both for the joint 2:4 + int4 mode). Follows the
reference implementations (github.com/IST-DASLab/gptq `GPTQ.fasterquant`, github.com/IST-DASLab/sparsegpt
`SparseGPT.fasterprune`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from llmcompress.errors import LLMCompressError, OptionError

# Damping multipliers tried in turn when H + damp * mean(diag H) * I is not numerically positive definite.
DAMP_RETRIES = (1.0, 10.0, 100.0, 1000.0)
# Rows converted to float32 at a time in `HessianAccumulator.add`, so a (50k, 4096) bf16 chunk never becomes a
# second, float32 copy of itself.
_ADD_CHUNK_ROWS = 8192


class HessianError(LLMCompressError):
    """The damped Hessian stayed singular (or non-finite), so the layer cannot be processed."""


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


def check_args(w: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int, who: str) -> None:
    """Raises on a weight that is not (N, K), a Hessian that is not (K, K), damp <= 0 or block_size < 1."""
    if w.dim() != 2:
        raise ValueError(f"{who}: weight must be (N, K), got {tuple(w.shape)}")
    k = w.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{who}: Hessian must be ({k}, {k}) for a weight {tuple(w.shape)}, got {tuple(hessian.shape)}")
    if not damp > 0:
        raise OptionError(f"{who}: damp must be > 0, got {damp!r}")
    if block_size < 1:
        raise OptionError(f"{who}: block_size must be >= 1, got {block_size!r}")


def prepare(w: torch.Tensor, hessian: torch.Tensor, who: str = "GPTQ") -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of W (N, K) and H (K, K) with dead inputs handled as in the reference.

    A dead input (H_jj == 0: the column of X is all zeros) gets H_jj = 1 so H can be inverted, and its weights are
    set to 0: they never reach the output, and 0 then quantizes exactly (and is the first weight pruned).
    """
    w = w.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(w.device, torch.float32, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise HessianError(f"{who}: the Hessian has NaN or inf entries (non-finite calibration activations?)")
    diag = h.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[None, :], 0.0)
    return w, h


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, who: str = "GPTQ") -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, H (K, K) float32 -> U (K, K).

    Row j of U, divided by U_jj, is how the error of column j spreads over the later columns (the reference's
    `Hinv`). When the damped H is still not positive definite in float32 (collinear inputs, very few rows), the
    damping grows tenfold a few times, with a warning.
    """
    mean_diag = h.diagonal().mean()
    for mult in DAMP_RETRIES:
        hd = h.clone()
        hd.diagonal().add_(damp * mult * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if mult != 1.0:
                    warnings.warn(f"{who}: Hessian not positive definite with damp={damp:g}; used damp={damp * mult:g}",
                                  RuntimeWarning, stacklevel=3)
                return u
    raise HessianError(f"{who}: Hessian not positive definite even with damp={damp * DAMP_RETRIES[-1]:g} "
                       f"(relative to mean(diag H)); check the calibration activations of this layer")


def damped_cholesky(h: torch.Tensor, damp: float, who: str = "SVD-LLM") -> torch.Tensor:
    """Lower Cholesky factor L of H + damp * mean(diag H) * I (H (K, K) float32 or float64), L L^T = H_damped.

    Low-rank whitening (SVD-LLM) needs the factor of H itself, not of its inverse. As `inverse_hessian_cholesky`,
    the damping grows tenfold a few times (with a warning naming the damping used) while H stays singular.
    """
    mean_diag = h.diagonal().mean()
    if not bool(torch.isfinite(h).all()):
        raise HessianError(f"{who}: XᵀX has NaN or inf entries (non-finite calibration activations?)")
    if not mean_diag > 0:
        raise HessianError(f"{who}: XᵀX is zero (the layer's calibration inputs are all zeros)")
    for mult in DAMP_RETRIES:
        hd = h.clone()
        hd.diagonal().add_(damp * mult * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            if mult != 1.0:
                warnings.warn(f"{who}: XᵀX not positive definite with damp={damp:g}; damped with damp={damp * mult:g}",
                              RuntimeWarning, stacklevel=3)
            return lower
    raise HessianError(f"{who}: XᵀX not positive definite even with damp={damp * DAMP_RETRIES[-1]:g} "
                       f"(relative to mean(diag XᵀX)); check the calibration activations of this layer")


# (column index in processing order, the block's working copy of W (N, B), the column's index in that block)
#   -> (what to store for the column (N,), the column's new value (N,) float32 whose error is fed back)
ColumnFn = Callable[[int, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# (first column of the block, the block's working copy of W, U's diagonal block) -> None: called once per block
# before its columns (SparseGPT chooses an unstructured block's mask there).
BlockFn = Callable[[int, torch.Tensor, torch.Tensor], None]


def error_feedback_sweep(w: torch.Tensor, u: torch.Tensor, block_size: int, column: ColumnFn,
                         block: BlockFn | None = None) -> torch.Tensor:
    """The OBS sweep over the columns of w (N, K) float32 in processing order, with U (K, K) from
    `inverse_hessian_cholesky` in the same order. Returns (N, K) float32: what `column` stored for each column.

    Lazy batch updates: the error of each column updates only the rest of its block at once; the block's errors
    then update every later column with one matmul. `w` is updated in place past each block.
    """
    k = w.shape[1]
    out = torch.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        if block is not None:
            block(i1, w1, u1)
        for i in range(i2 - i1):
            col = w1[:, i]
            stored, value = column(i1 + i, w1, i)
            out[:, i1 + i] = stored
            e = (col - value) / u1[i, i]
            w1[:, i + 1:].addr_(e, u1[i, i + 1:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)
    return out
