"""Per-channel statistics of a layer's input activations, accumulated chunk by chunk so that the calibration rows
never have to be held (or concatenated) at once.

`Statistics(k, kinds)` keeps the kinds asked for, each a float32 tensor over the input channels K:
* `gram`: mean_t x_t x_t^T (K, K): GPTQ's Hessian is 2 * gram, AWQ's output-error metric is gram itself.
* `cross`: mean_t x_t (x_t - xf_t)^T (K, K), xf the same rows in the float model (AWQ's pull towards the float
  model's outputs); needs `add(x, x_float)`.
* `absmax`: max_t |x_tk| (K,) (SmoothQuant); `absmean`: mean_t |x_tk| (K,) (AWQ's salience);
  `sqnorm`: sum_t x_tk^2 (K,) (the squared per-channel L2 norms, e.g. Wanda-style pruning).
Means are running means (rescaled as rows arrive), so their scale does not grow with the number of rows: the same
arithmetic as GPTQ's reference accumulator, bit for bit (`gram` * 2 equals `gptq.HessianAccumulator.hessian`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

KINDS = ("gram", "cross", "absmax", "absmean", "sqnorm")
# Rows converted to float32 at a time, so a (50k, 4096) bf16 chunk never becomes a second, float32 copy of itself.
_CHUNK_ROWS = 8192


class Statistics:
    """Running statistics of (rows, K) activations; read the results as attributes named by their kind."""

    def __init__(self, k: int, kinds: Iterable[str], device: torch.device | str | None = None) -> None:
        kinds = tuple(dict.fromkeys(kinds))
        bad = [x for x in kinds if x not in KINDS]
        if bad:
            raise ValueError(f"Statistics: unknown kind {bad[0]!r}; known: {', '.join(KINDS)}")
        self.k = k
        self.kinds = kinds
        self.rows = 0
        square = (k, k)
        self._acc = {kind: torch.zeros(square if kind in ("gram", "cross") else (k,), dtype=torch.float32,
                                       device=device) for kind in kinds}

    def __getattr__(self, kind: str) -> torch.Tensor:
        acc = self.__dict__.get("_acc", {})
        if kind in acc:
            return acc[kind]
        raise AttributeError(f"Statistics has no {kind!r} (kinds accumulated: {', '.join(acc) or 'none'})")

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._acc)

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """x: (..., K) any float dtype and device (moved to the accumulators'); x_float: the same rows in the float
        model (`cross` needs it; None means x itself, cross then gains nothing)."""
        k = self.k
        if x.shape[-1] != k:
            raise ValueError(f"Statistics: expected inputs (..., {k}), got {tuple(x.shape)}")
        x = x.reshape(-1, k)
        if x_float is not None:
            x_float = x_float.reshape(-1, k)
            if x_float.shape != x.shape:
                raise ValueError(f"Statistics: float inputs {tuple(x_float.shape)} must match {tuple(x.shape)}")
        device = next(iter(self._acc.values())).device if self._acc else x.device
        for start in range(0, x.shape[0], _CHUNK_ROWS):
            xc = x[start:start + _CHUNK_ROWS].to(device, torch.float32)
            n = xc.shape[0]
            if n == 0:
                continue
            old = self.rows
            self.rows += n
            keep = old / self.rows  # running means: rescale what is there, add the new rows at 1 / rows
            for kind, acc in self._acc.items():
                if kind == "gram":
                    acc.mul_(keep)
                    acc.addmm_(xc.T, xc, alpha=1.0 / self.rows)
                elif kind == "cross":
                    acc.mul_(keep)
                    if x_float is not None:  # else x is the float model's too: these rows add nothing
                        diff = xc - x_float[start:start + _CHUNK_ROWS].to(device, torch.float32)
                        acc.addmm_(xc.T, diff, alpha=1.0 / self.rows)
                elif kind == "absmax":
                    torch.maximum(acc, xc.abs().amax(dim=0), out=acc)
                elif kind == "absmean":
                    acc.mul_(keep)
                    acc.add_(xc.abs().sum(dim=0), alpha=1.0 / self.rows)
                else:  # sqnorm: a sum, not a mean (norms grow with the data by definition)
                    acc.add_(xc.square().sum(dim=0))


def statistics_of(rows: Iterable[torch.Tensor], kinds: Iterable[str], k: int,
                  float_rows: Iterable[torch.Tensor | None] | None = None,
                  device: torch.device | str | None = None) -> Statistics:
    """`Statistics` of every tensor of `rows` (each (..., K)), with the matching float rows for `cross`."""
    stats = Statistics(k, kinds, device)
    rows = list(rows)
    floats = [None] * len(rows) if float_rows is None else list(float_rows)
    for x, xf in zip(rows, floats):
        stats.add(x, xf)
    return stats
