"""Plain truncated SVD: the best rank-r approximation of the weight itself (Eckart-Young), blind to the inputs."""

from __future__ import annotations

import torch

from llmcompress.passes.lowrank.factors import Decomposition, decompose


def svd(w: torch.Tensor) -> Decomposition:
    """W (N, K) -> its SVD as a `Decomposition` (float64)."""
    return decompose(w)
