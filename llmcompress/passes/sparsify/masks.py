"""Which weights a pruning score keeps: `Pattern` (parsed `unstructured` / `N:M`), `nm_mask` (the N highest scores of
every M consecutive inputs of a row) and `unstructured_mask` (the highest scores of a row, or of the whole matrix).
Masks are bool (N, K), True where the weight is kept."""

from __future__ import annotations

import dataclasses
import re

import torch

from llmcompress.errors import OptionError

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """`unstructured` (n = m = 0) or N:M: N weights kept in every M consecutive inputs of a row."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The fraction pruned, for N:M."""
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def parse_pattern(text: str, where: str) -> Pattern:
    """`unstructured` or `N:M` (0 < N < M, e.g. `2:4`, `4:8`) -> Pattern; anything else raises `OptionError`."""
    if text == "unstructured":
        return Pattern()
    match = _NM.match(str(text))
    if match is None:
        raise OptionError(f"{where}: pattern {text!r}; expected 'unstructured' or N:M such as '2:4' or '4:8'")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise OptionError(f"{where}: pattern {text!r}; N:M needs 0 < N < M (N kept of every M), e.g. '2:4'")
    return Pattern(n, m)


def check_nm_shape(k: int, pattern: Pattern, where: str) -> None:
    """Raises `OptionError` when the inputs K do not split into groups of M."""
    if pattern.structured and k % pattern.m:
        raise OptionError(f"{where}: pattern {pattern} needs K (in features) a multiple of {pattern.m}, got K={k}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """scores (R, K), K % m == 0 -> keep mask (R, K): the n highest of every m consecutive columns of each row
    (ties: the first)."""
    r, k = scores.shape
    groups = scores.reshape(r, k // m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, drop, False)
    return keep.reshape(r, k)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """scores (R, K) -> keep mask (R, K) pruning round(sparsity * K) lowest of each row (`per_row`, Wanda's
    comparison group) or round(sparsity * R * K) lowest of the whole matrix (magnitude pruning per layer)."""
    flat = scores if per_row else scores.reshape(1, -1)
    count = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count:
        drop = torch.topk(flat, count, dim=1, largest=False).indices
        keep.scatter_(1, drop, False)
    return keep.reshape(scores.shape)


def score_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float, per_row: bool) -> torch.Tensor:
    """The keep mask of `scores` (R, K) under `pattern` (N:M, or `sparsity` unstructured)."""
    if pattern.structured:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, sparsity, per_row)
