"""SmoothQuant (Xiao et al. 2023, github.com/mit-han-lab/smoothquant): migrate activation outliers into the weights
before w8a8, so per-token int8 activations lose less precision.

Entry points: `ActivationAbsMax` (fed the layer's calibration inputs, in chunks), then `smoothquant_quantize`, which
returns the int8 per-channel weight of `formats.py` and the per-input-channel `smooth` (K,) = 1/s that the kernel
multiplies x by before quantizing it per token: y ~= q8(x * smooth) @ dequantize_int8(qweight, wscale).T.
"""

from __future__ import annotations

import torch

from llmcompress.errors import OptionError
from llmcompress.formats import quantized as formats

# The reference clamps max|W_j| and s at 1e-5; we clamp max|X_j| too and cap s at 1e5, so a dead input channel
# (max|X_j| = 0) or an all-zero weight column never gives s = 0 or 1/s = inf.
_MIN = 1e-5
_MAX = 1e5


class ActivationAbsMax:
    """Running max_t |x_tk| (K,) float32 over the rows seen so far."""

    def __init__(self, k: int, device: torch.device | str | None = None):
        self.absmax = torch.zeros(k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., K), any float dtype and device (moved to the accumulator's)."""
        k = self.absmax.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"ActivationAbsMax: expected inputs (..., {k}), got {tuple(x.shape)}")
        x = x.reshape(-1, k)
        if x.shape[0] == 0:
            return
        torch.maximum(self.absmax, x.abs().amax(dim=0).to(self.absmax.device, torch.float32), out=self.absmax)
        self.rows += x.shape[0]


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"SmoothQuant: alpha (migration strength) must be in [0, 1], got {alpha!r}")


def smoothquant_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha), (K,) float32 in [1e-5, 1e5].

    act_absmax: (K,) from `ActivationAbsMax`; w: (N, K). alpha = 0.5 balances the two ranges; larger alpha moves more
    of the activation outliers into the weights.
    """
    _check_alpha(alpha)
    if w.dim() != 2 or act_absmax.shape != (w.shape[1],):
        raise ValueError(f"SmoothQuant: act_absmax (K,) and w (N, K) expected, got {tuple(act_absmax.shape)} and "
                         f"{tuple(w.shape)}")
    a = act_absmax.detach().to(w.device, torch.float32).clamp_min(_MIN)
    wmax = w.detach().abs().amax(dim=0).float().clamp_min(_MIN)
    return (a.pow(alpha) / wmax.pow(1.0 - alpha)).clamp_(_MIN, _MAX)


def smoothquant_quantize(w: torch.Tensor, act_absmax: torch.Tensor, alpha: float = 0.5
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth then quantize w (N, K): W' = W diag(s), int8 per output channel.

    Returns (qweight int8 (N, K), wscale float32 (N,), smooth float32 (K,) = 1/s).
    """
    s = smoothquant_scales(act_absmax, w, alpha)
    qweight, wscale = formats.quantize_int8_per_channel(w.detach().float() * s)
    return qweight, wscale, 1.0 / s
