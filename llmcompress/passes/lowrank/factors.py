"""`Decomposition`: what every low-rank method produces, W (N, K) = left · diag(s) · right with `left`'s columns
orthonormal, so that truncating to rank r, the error curve over r, and the closed-form refit of U are one code for
`svd`, `asvd` and `svd-llm` (they differ only in the transform `right` carries: I, diag(|x|^alpha)^-1, L^-1)."""

from __future__ import annotations

import dataclasses

import torch

from llmcompress.calibration.hessian import damped_cholesky


@dataclasses.dataclass
class Decomposition:
    left: torch.Tensor
    """(N, m) float64, orthonormal columns."""
    s: torch.Tensor
    """(m,) float64, non-increasing."""
    right: torch.Tensor
    """(m, K) float64: W = left @ diag(s) @ right."""

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (N, r), V (r, K)) float64 with W ≈ U @ V; sqrt(s) on each side keeps both in the same range (what
        fp16 factors and int8 per-channel scales want)."""
        root = self.s[:r].sqrt()
        return self.left[:, :r] * root, root[:, None] * self.right[:r]

    def error_curve(self, gram: torch.Tensor | None) -> torch.Tensor:
        """(m + 1,) float64: E(r) = mean_x ||(W - W_r) x||² for r = 0 .. m, x with second moment `gram` (K, K)
        (None: the identity, i.e. the weight error). `left` orthonormal makes the components' errors add up:
        E(r) = sum_{i >= r} s_i² · right_i G right_iᵀ."""
        if gram is None:
            weight = self.right.square().sum(1)
        else:
            weight = ((self.right @ gram.to(self.right)) * self.right).sum(1)
        parts = self.s.square() * weight
        tail = parts.flip(0).cumsum(0).flip(0)
        return torch.cat([tail, tail.new_zeros(1)])


def decompose(w: torch.Tensor, transform: torch.Tensor | None = None) -> Decomposition:
    """SVD of W T (N, K) in float64, with `right` = Vh: the caller maps it back to W's inputs (right = Vh T^-1)."""
    w64 = w.detach().to(torch.float64)
    m = w64 if transform is None else w64 @ transform.to(w64)
    left, s, vh = torch.linalg.svd(m, full_matrices=False)
    return Decomposition(left, s, vh)


def refit_u(w: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None = None,
            damp: float = 1e-6) -> torch.Tensor:
    """U (N, r) float64 minimising mean ||W x_f - U V x||² over the calibration rows (least squares, closed form):
    U = W E[x_f xᵀ] Vᵀ (V E[x xᵀ] Vᵀ)^-1 with E[x xᵀ] = `gram` and E[x x_fᵀ] = gram - `cross` (`cross` =
    E[x (x - x_f)ᵀ] from the float model's inputs x_f; None: x_f = x). `damp` (relative to the mean diagonal) only
    keeps the (r, r) solve defined when V X is rank-deficient."""
    w64, v64, g = w.to(torch.float64), v.to(torch.float64), gram.to(torch.float64)
    target = g if cross is None else g - cross.to(torch.float64)
    rhs = w64 @ target.T @ v64.T  # (N, r)
    a = v64 @ g @ v64.T  # (r, r)
    lower = damped_cholesky(a, damp, "low-rank refit")
    return torch.cholesky_solve(rhs.T, lower).T
