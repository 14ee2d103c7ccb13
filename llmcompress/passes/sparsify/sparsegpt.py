"""SparseGPT (Frantar & Alistarh 2023): prune one linear layer's weight column by column, feeding each pruned
weight's error back into the columns not yet processed through the inverse Hessian of the layer's inputs (the OBS
sweep GPTQ uses, shared in `calibration/hessian.py`: damping, the inverse Cholesky factor, lazy blocks).

Entry point: `sparsegpt_prune`. As in the reference (github.com/IST-DASLab/sparsegpt, `fasterprune`): an
unstructured mask is chosen per lazy block, the `sparsity` fraction of the block's weights with the lowest
w^2 / [H^-1]_jj^2; an N:M mask per group of M columns when the sweep reaches the group, on the weights as error
feedback has left them. The joint mode (`group_size`) also rounds the kept weights to int4 in `formats/quantized.py`'s
asymmetric group convention (w = (q - zero) * scale, groups along K), the paper's 2:4 + 4-bit sweep.
"""

from __future__ import annotations

import dataclasses

import torch

from llmcompress.calibration.hessian import check_args, error_feedback_sweep, inverse_hessian_cholesky, prepare
from llmcompress.errors import OptionError
from llmcompress.formats import quantized as formats
from llmcompress.passes.sparsify.masks import Pattern, check_nm_shape


@dataclasses.dataclass
class SparseGPTResult:
    weight: torch.Tensor
    """(N, K) float32: the pruned weight (kept values updated by error feedback, pruned ones exactly 0); in the
    joint mode the kept values are the int4 codes dequantized."""
    mask: torch.Tensor
    """(N, K) bool, True where kept."""
    codes: torch.Tensor | None = None
    """Joint mode: (N, K) uint8 int4 codes in [0, 15] (a pruned position holds its group's zero code)."""
    scales: torch.Tensor | None = None
    """Joint mode: (N, K // group_size) float16."""
    zeros: torch.Tensor | None = None
    """Joint mode: (N, K // group_size) float16, integer-valued."""


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, sparsity: float = 0.5,
                    damp: float = 0.01, block_size: int = 128, group_size: int | None = None) -> SparseGPTResult:
    """w: (N, K) weight of y = x @ w.T; hessian: (K, K), 2/n sum x x^T (`HessianAccumulator`, or 2 * `gram`).

    pattern: N:M, or unstructured with `sparsity` in (0, 1). block_size: columns per lazy block (a multiple of M,
    and of group_size in the joint mode, so no group straddles two blocks). group_size: int4 group along K for the
    joint mode (None: prune only).
    """
    check_args(w, hessian, damp, block_size, "SparseGPT")
    n, k = w.shape
    check_nm_shape(k, pattern, "SparseGPT")
    if pattern.structured and block_size % pattern.m:
        raise OptionError(f"SparseGPT: block_size {block_size} must be a multiple of M={pattern.m} (pattern {pattern})")
    if not pattern.structured and not 0 < sparsity < 1:
        raise OptionError(f"SparseGPT: sparsity {sparsity!r}; expected a fraction in (0, 1)")
    if group_size is not None:
        formats.check_group_size(k, group_size)
        if block_size % group_size:
            raise OptionError(f"SparseGPT: block_size {block_size} must be a multiple of group_size {group_size} in "
                              "the joint int4 mode")
    wf, h = prepare(w, hessian, "SparseGPT")
    u = inverse_hessian_cholesky(h, damp, "SparseGPT")
    keep = torch.ones(n, k, dtype=torch.bool, device=wf.device)
    codes = scales16 = zeros = None
    if group_size is not None:
        codes = torch.empty(n, k, dtype=torch.uint8, device=wf.device)
        scales16 = torch.empty(n, k // group_size, dtype=torch.float16, device=wf.device)
        zeros = torch.empty(n, k // group_size, dtype=torch.float32, device=wf.device)
    current: list[torch.Tensor] = []

    def block(i1: int, w1: torch.Tensor, u1: torch.Tensor) -> None:
        if pattern.structured:
            return
        score = w1.square() / u1.diagonal()[None, :].square()
        count = int(score.numel() * sparsity)
        if count:
            drop = torch.topk(score.flatten(), count, largest=False).indices
            mask = torch.ones(score.numel(), dtype=torch.bool, device=w1.device)
            mask[drop] = False
            keep[:, i1:i1 + w1.shape[1]] = mask.view_as(w1)

    def column(j: int, w1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if pattern.structured and j % pattern.m == 0:
            d = u[j:j + pattern.m, j:j + pattern.m].diagonal()
            score = w1[:, i:i + pattern.m].square() / d[None, :].square()
            drop = torch.topk(score, pattern.m - pattern.n, dim=1, largest=False).indices
            keep[:, j:j + pattern.m].scatter_(1, drop, False)
        col, kept = w1[:, i], keep[:, j]
        if group_size is None:
            value = torch.where(kept, col, 0.0)
            return value, value
        if j % group_size == 0:  # the group's range from its weights as error feedback has left them
            scale, zero = formats.int4_scales_zeros(w1[:, i:i + group_size], group_size)
            g = j // group_size
            scales16[:, g] = scale[:, 0].to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
            zeros[:, g] = zero[:, 0]
            current[:] = [scales16[:, g].float(), zeros[:, g].clone()]
        scale, zero = current
        q = torch.round(col / scale + zero).clamp_(0, 15)
        q = torch.where(kept, q, zero)
        codes[:, j] = q.to(torch.uint8)
        value = (q - zero) * scale  # 0 where pruned: q == zero there
        return value, value

    pruned = error_feedback_sweep(wf, u, block_size, column, block)
    if group_size is None:
        return SparseGPTResult(pruned, keep)
    return SparseGPTResult(pruned, keep, codes, scales16, zeros.to(torch.float16))
