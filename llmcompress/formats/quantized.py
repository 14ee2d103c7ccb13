"""The stored formats of quantized weights and activations, as plain torch: quantize, pack, dequantize.

These functions are the single definition of each format: the kernels in `llmcompress/kernels/*_linear.py` read
exactly these layouts, their references dequantize with these functions, and the calibrated methods (`awq.py`,
`gptq.py`, `smoothquant.py`) end by producing them.

* int8 per output channel (w8a16, w8a8 weights): `qweight` int8 (N, K) in [-127, 127], `scale` float32 (N,);
  w = qweight * scale.
* int4 asymmetric, groups of `group_size` along K (w4a16): `qweight` uint8 (N, K // 2), two values per byte, the
  even k in the low nibble and the odd k in the high one; `scales`, `zeros` float16 (N, K // group_size), zeros
  integer-valued in [0, 15]; w = (q - zero) * scale.
* fp8 e4m3 per output channel (fp8): `qweight` float8_e4m3fn (N, K), `scale` float32 (N,); w = qweight * scale.
* int8 per token (w8a8 activations, dynamic): `q` int8 (M, K), `scale` float32 (M, 1); x = q * scale.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128)
INT8_MAX = 127
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1e-8  # all-zero rows/groups get this scale instead of 0, so dequantization never divides by zero


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, K) float -> (qweight int8 (N, K), scale float32 (N,)), symmetric, round to nearest."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(MIN_SCALE)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) int8, (N,) scale -> (N, K) `dtype` (products in float32, rounded once)."""
    return (qweight.float() * scale.float()[:, None]).to(dtype)


def check_group_size(k: int, group_size: int) -> None:
    """ValueError unless `group_size` is supported and divides the layer's input size K."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the layer's input size K={k}")


def int4_scales_zeros(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (round-to-nearest) asymmetric scales and zeros of w: (N, K) -> two float32 (N, K // group_size)."""
    n, k = w.shape
    check_group_size(k, group_size)
    g = w.float().reshape(n, k // group_size, group_size)
    lo = g.amin(dim=2).clamp(max=0.0)  # the range always holds 0, so a 0 weight stays exactly 0
    hi = g.amax(dim=2).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).clamp_min(MIN_SCALE)
    zero = torch.round(-lo / scale).clamp_(0, 15)
    return scale, zero


def int4_scales_zeros_mse(w: torch.Tensor, group_size: int, grid: int = 40, max_shrink: float = 0.2,
                          norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `int4_scales_zeros`, with each group's range shrunk (by up to `max_shrink`) to minimise the group's
    sum |w - dequant(quant(w))|^norm (the GPTQ reference's `mse` quantizer: outliers clipped when that lowers the
    error of the rest). Returns float32 (N, K // group_size) scales and zeros."""
    n, k = w.shape
    check_group_size(k, group_size)
    g = w.float().reshape(n, k // group_size, group_size)
    lo0 = g.amin(dim=2).clamp(max=0.0)
    hi0 = g.amax(dim=2).clamp(min=0.0)
    best_scale, best_zero = int4_scales_zeros(w, group_size)
    best_err = torch.full_like(lo0, float("inf"))
    for i in range(int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        lo, hi = p * lo0, p * hi0
        scale = ((hi - lo) / 15.0).clamp_min(MIN_SCALE)
        scale = scale.to(torch.float16).float().clamp_min(torch.finfo(torch.float16).tiny)
        zero = torch.round(-lo / scale).clamp_(0, 15)
        q = torch.round(g / scale[..., None] + zero[..., None]).clamp_(0, 15)
        err = ((q - zero[..., None]) * scale[..., None] - g).abs_().pow_(norm).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_int4(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round w (N, K) to int4 codes (uint8 (N, K) in [0, 15]) with given per-group scales and zeros."""
    n, k = w.shape
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return torch.round(w.float() / s + z).clamp_(0, 15).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15], K even -> (N, K // 2) uint8: low nibble k = 2i, high nibble k = 2i + 1."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: K must be even, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes; inverse of `pack_int4`."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_int4_rtn(w: torch.Tensor, group_size: int = 128
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4: w (N, K) -> (qweight uint8 (N, K // 2), scales f16, zeros f16 (N, K // group_size))."""
    scale, zero = int4_scales_zeros(w, group_size)
    scale16 = scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    # Quantize with the scale as stored (float16), so codes and dequantization agree exactly.
    q = quantize_int4(w, scale16, zero, group_size)
    return pack_int4(q), scale16, zero.to(torch.float16)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K // 2) packed codes + (N, K // group_size) scales/zeros -> (N, K) `dtype` ((q - z) * s in float32)."""
    q = unpack_int4(qweight).float()
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return ((q - z) * s).to(dtype)


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, K) -> (qweight float8_e4m3fn (N, K), scale float32 (N,)); per-row absmax maps to 448."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qweight.float() * scale.float()[:, None]).to(dtype)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) float -> (q int8 (M, K), scale float32 (M, 1)); dynamic symmetric per-row quantization."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(MIN_SCALE)
    q = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) float -> (q float8_e4m3fn (M, K), scale float32 (M, 1)); dynamic per-row scaling to 448."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
