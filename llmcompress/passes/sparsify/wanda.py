"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, the weight times the L2 norm of its input channel over the
calibration rows, compared within each output row (unstructured) or each group of M inputs of a row (N:M). No
weight update. Entry point: `wanda_mask`."""

from __future__ import annotations

import torch

from llmcompress.passes.sparsify.masks import Pattern, score_mask


def wanda_mask(w: torch.Tensor, sqnorm: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """w (N, K); sqnorm (K,): sum over the calibration rows of x_j^2 (`calibration/stats.py` kind `sqnorm`)
    -> keep mask (N, K) bool."""
    scores = w.detach().abs().float() * sqnorm.to(w.device, torch.float32).clamp_min(0).sqrt()[None, :]
    return score_mask(scores, pattern, sparsity, per_row=True)
