"""Magnitude pruning: keep the largest |W|. Unstructured compares the whole matrix (the per-layer baseline of the
SparseGPT and Wanda papers); N:M compares each group of M inputs of a row. Entry point: `magnitude_mask`."""

from __future__ import annotations

import torch

from llmcompress.passes.sparsify.masks import Pattern, score_mask


def magnitude_mask(w: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """w (N, K) -> keep mask (N, K) bool."""
    return score_mask(w.detach().abs().float(), pattern, sparsity, per_row=False)
