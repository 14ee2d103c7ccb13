"""Weight-only formats in the layouts of torch's CPU kernels, converted from ours (`quantized.py`) at compile time.

* int8 for `aten._weight_int8pack_mm(x (M, K), qweight (N, K) int8, scale (N,))`: our codes as they are, the
  per-channel scale in x's dtype (the kernel refuses any other: measured, torch 2.13). A bfloat16 scale is our
  float32 one rounded once (relative error <= 2**-9 per output channel).
* int4 for `aten._weight_int4pack_mm_for_cpu(x (M, K), packed (N, K // 2) uint8, group_size, scales_and_zeros)`:
  `packed` is `aten._convert_weight_to_int4pack_for_cpu(codes int32 (N, K), inner_k_tiles)`, an opaque blocked
  layout (it interleaves rows by the CPU's vector width); `scales_and_zeros` (K // group_size, N, 2) in x's dtype
  holds [scale, zero_float] and torch dequantizes w = (q - 8) * scale + zero_float. Ours is w = (q - zero) * scale,
  so zero_float = (8 - zero) * scale, computed in float32 (exact: a 4-bit integer times a float16 scale) and
  rounded once to x's dtype.

Shapes torch's kernels take (measured on torch 2.13, AVX-512): int8 needs K % 16 == 0 (at M = 1 in bfloat16 the
kernel returns NaN/inf for K = 8, 24, 100, 200 and crashed once for K = 100: no error is raised); int4 needs
N % 16 == 0 (the packing raises otherwise) and K % (16 * inner_k_tiles) == 0, which every group size (>= 32)
guarantees with inner_k_tiles = 2. `int8_cpu_unsupported` / `int4_cpu_unsupported` say why a shape is refused.
"""

from __future__ import annotations

import torch

from llmcompress.formats.quantized import INT4_GROUP_SIZES, unpack_int4

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT8_K_MULTIPLE = 16
INT4_N_MULTIPLE = 16
# Any of 1..16 gives the same bytes on torch 2.13's CPU packing; 2 makes K % 32 the condition (our smallest group).
INNER_K_TILES = 2
# torch's int4 CPU kernel subtracts this constant code before adding zero_float.
INT4_TORCH_ZERO = 8


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in CPU_DTYPES:
        raise ValueError(f"CPU weight-only formats: activation dtype must be float32, bfloat16 or float16, got {dtype}")


def int8_cpu_unsupported(n: int, k: int) -> str | None:
    """Why `_weight_int8pack_mm` cannot take an (N, K) int8 weight, or None when it can."""
    if k % INT8_K_MULTIPLE:
        return f"K={k} is not a multiple of {INT8_K_MULTIPLE} (torch's int8 CPU kernel reads past K otherwise)"
    return None


def int4_cpu_unsupported(n: int, k: int, group_size: int) -> str | None:
    """Why `_weight_int4pack_mm_for_cpu` cannot take an (N, K) int4 weight in groups of `group_size`, or None."""
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        return f"group_size {group_size} must be one of {INT4_GROUP_SIZES} and divide K={k}"
    if n % INT4_N_MULTIPLE:
        return f"N={n} is not a multiple of {INT4_N_MULTIPLE} (torch's int4 CPU packing)"
    if k % (16 * INNER_K_TILES):
        return f"K={k} is not a multiple of {16 * INNER_K_TILES}"
    return None


def pack_int8_for_cpu(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 (N, K), scale float32 (N,)) -> (qweight contiguous, scale (N,) in `dtype`)."""
    _check_dtype(dtype)
    reason = int8_cpu_unsupported(*qweight.shape)
    if reason:
        raise ValueError(f"pack_int8_for_cpu: {reason}")
    return qweight.contiguous(), scale.to(dtype)


def pack_int4_for_cpu(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 (qweight uint8 (N, K // 2), scales/zeros float16 (N, K // group_size)) -> (packed uint8
    (N, K // 2) in torch's CPU layout, scales_and_zeros (K // group_size, N, 2) in `dtype`)."""
    _check_dtype(dtype)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    reason = int4_cpu_unsupported(n, k, group_size)
    if reason:
        raise ValueError(f"pack_int4_for_cpu: {reason}")
    codes = unpack_int4(qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INNER_K_TILES)
    return packed, int4_scales_and_zeros(scales, zeros, dtype)


def int4_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, G) scales and integer zeros -> (G, N, 2) [scale, (8 - zero) * scale] in `dtype`, from float32."""
    s = scales.float()
    zero_float = (INT4_TORCH_ZERO - zeros.float()) * s
    return torch.stack((s, zero_float), dim=-1).transpose(0, 1).contiguous().to(dtype)


def unpack_int4_for_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """torch's CPU int4 layout (N, K // 2) -> codes uint8 (N, K) in [0, 15]; the inverse of the packing.

    The layout depends on the CPU's vector width, so it is read off the packing itself: packing the base-16 digits
    of each element's index says where every element's nibble lands. For references and tests (it packs
    ceil(log16(N * K)) index patterns), not for the hot path.
    """
    total = n * k
    index = torch.arange(total, dtype=torch.int64).reshape(n, k)
    source = torch.zeros(n * k, dtype=torch.int64)  # flat nibble position -> flat (n, k) index
    shift = 0
    while (1 << shift) < total:
        digit = ((index >> shift) & 0xF).to(torch.int32)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, INNER_K_TILES)
        source |= _nibbles(p).to(torch.int64) << shift
        shift += 4
    codes = torch.empty(total, dtype=torch.uint8)
    codes[source] = _nibbles(packed)
    return codes.reshape(n, k)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> their nibbles, low nibble first, flat."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1)


def dequantize_int4_cpu(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """torch's CPU int4 format -> (N, K) float32: (q - 8) * scale + zero_float, in float32."""
    n, k = packed.shape[0], packed.shape[1] * 2
    q = unpack_int4_for_cpu(packed, n, k).float()
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
    s = sz[..., 0].repeat_interleave(group_size, dim=1)
    z = sz[..., 1].repeat_interleave(group_size, dim=1)
    return (q - INT4_TORCH_ZERO) * s + z


__all__ = ["CPU_DTYPES", "INNER_K_TILES", "INT4_N_MULTIPLE", "INT8_K_MULTIPLE", "dequantize_int4_cpu",
           "int4_cpu_unsupported", "int4_scales_and_zeros", "int8_cpu_unsupported", "pack_int4_for_cpu",
           "pack_int8_for_cpu", "unpack_int4_for_cpu"]
