"""SVD-LLM (Wang et al. 2024): whiten by the Cholesky factor L of the inputs' XᵀX (L Lᵀ = XᵀX / n), so that
truncating the SVD of W L drops exactly the components that least change the layer's outputs: the mean output
error of W_r = (W L)_r L^-1 is the sum of the dropped singular values squared (the optimum over rank-r weights)."""

from __future__ import annotations

import torch

from llmcompress.calibration.hessian import damped_cholesky
from llmcompress.passes.lowrank.factors import Decomposition, decompose


def svd_llm(w: torch.Tensor, gram: torch.Tensor, damp: float = 0.01) -> Decomposition:
    """W (N, K) and gram = mean x xᵀ (K, K) -> the decomposition of W (float64). A singular gram is damped
    (`damp` times its mean diagonal, more with a warning when that is not enough: `calibration.hessian`)."""
    lower = damped_cholesky(gram.detach().to(torch.float64), damp, "svd-llm")
    d = decompose(w, transform=lower)
    # right = Vh L^-1: solve X L = Vh (triangular) instead of inverting L.
    d.right = torch.linalg.solve_triangular(lower, d.right, upper=False, left=False)
    return d
