"""ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition"): scale the input channels by
S = diag(mean|x|^alpha) before the SVD, so that channels with large activations (whose weights matter more to the
output) are approximated better; W ≈ (W S)_r S^-1."""

from __future__ import annotations

import torch

from llmcompress.passes.lowrank.factors import Decomposition, decompose

# Channels whose mean |x| is below this fraction of the largest are floored to it: a dead channel would make S
# singular (and its weights never reach the output, so any finite scale is as good).
_FLOOR = 1e-6


def asvd(w: torch.Tensor, absmean: torch.Tensor, alpha: float = 0.5) -> Decomposition:
    """W (N, K) and the mean |x| of its K input channels -> the decomposition of W (float64)."""
    a = absmean.detach().to(torch.float64)
    a = a.clamp_min(float(a.max()) * _FLOOR if float(a.max()) > 0 else 1.0)
    scale = a.pow(alpha)
    d = decompose(w.to(torch.float64) * scale.to(w.device)[None, :])
    d.right = d.right / scale[None, :]
    return d
