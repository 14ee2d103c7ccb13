"""The stored formats of 2:4 sparse weights, as plain torch: pack and unpack.

The single definition of each layout: the kernels in `llmcompress/kernels/sparse_linear.py` read exactly these,
and their references unpack with these functions.

* 2:4 (`pack_2of4` / `unpack_2of4`): in every group of 4 consecutive k (K % 4 == 0) at most two weights are
  non-zero. `values` (N, K // 2), the weight's dtype: the two kept values of group g at columns 2g and 2g + 1, in
  K order. `meta` uint8 (N, ceil(K / 8)): one nibble per group, group g in byte g // 2, even g in the low nibble
  and odd g in the high one (as `formats/quantized.pack_int4` packs codes); within a nibble, bits 0-1 hold the
  position (0..3) of the first kept value and bits 2-3 that of the second, first < second. A group with fewer
  than two non-zeros keeps a zero at its lowest free position. With K % 8 == 4 the last byte's high nibble is 0.
  At fp16 the format reads N·K/2·2 + N·K/8 bytes: 0.5625 of dense.
* int4 + 2:4 (`pack_2of4_int4` / `unpack_2of4_int4`): `qvalues` uint8 (N, K // 4): group g's two kept 4-bit codes
  in one byte, the first (lower k) in the low nibble; `meta` as above; `scales`, `zeros` float16
  (N, K // group_size) grouped along the ORIGINAL K, the int4 asymmetric convention of `formats/quantized.py`:
  a kept weight is (q - zero) * scale, a pruned one exactly 0. Reads 0.375 + 2·2/group_size bytes per weight
  element: 0.2 of fp16 dense at group 128.
"""

from __future__ import annotations

import torch

from llmcompress.formats.quantized import check_group_size

SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def meta_columns(k: int) -> int:
    """Bytes of metadata per row for an input size K: one nibble per group of 4, two groups per byte."""
    return (k // 4 + 1) // 2


def _check_k(name: str, k: int) -> None:
    if k % 4:
        raise ValueError(f"{name}: K must be a multiple of 4 for 2:4 sparsity (groups of 4 consecutive inputs), "
                         f"got K={k}")


def _pack_meta(idx: torch.Tensor) -> torch.Tensor:
    """idx (N, G, 2) int64 positions in 0..3 -> meta uint8 (N, ceil(G / 2))."""
    n, g, _ = idx.shape
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # (N, G)
    if g % 2:
        nib = torch.cat((nib, nib.new_zeros(n, 1)), dim=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _unpack_meta(meta: torch.Tensor, k: int) -> torch.Tensor:
    """meta uint8 (N, ceil(K / 8)) -> positions (N, K // 4, 2) int64."""
    nib = torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(meta.shape[0], -1)[:, : k // 4].long()
    return torch.stack((nib & 3, (nib >> 2) & 3), dim=-1)


def _check_meta(name: str, meta: torch.Tensor, n: int, k: int) -> None:
    want = (n, meta_columns(k))
    if meta.dtype != torch.uint8 or tuple(meta.shape) != want:
        raise ValueError(f"{name}: meta must be uint8 (N, ceil(K / 8)) = {want} for K={k}, "
                         f"got {meta.dtype} {tuple(meta.shape)}")


def _kept_positions(keep: torch.Tensor) -> torch.Tensor:
    """keep (N, G, 4) bool with at most two True per group -> the two positions kept (N, G, 2), ascending: the True
    ones first, then the lowest False ones."""
    pos = torch.arange(4, device=keep.device)
    score = keep.long() * 8 + (3 - pos)  # kept first, then lower positions
    idx = score.topk(2, dim=-1).indices
    return idx.sort(dim=-1).values


def pack_2of4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float with at most 2 non-zeros in every group of 4 consecutive k -> (values (N, K // 2) w.dtype,
    meta uint8 (N, ceil(K / 8))); layout in the module docstring. ValueError for K % 4 != 0, a non-float or
    non-2-D w, or a group with more than two non-zeros (naming the first such row and group)."""
    name = "pack_2of4"
    if w.dim() != 2 or w.dtype not in SPARSE_DTYPES:
        raise ValueError(f"{name}: w must be a 2-D (N, K) tensor of {[str(d) for d in SPARSE_DTYPES]}, "
                         f"got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    _check_k(name, k)
    groups = w.reshape(n, k // 4, 4)
    nonzero = groups != 0
    over = nonzero.sum(-1) > 2
    if over.any():
        row, g = (int(i) for i in over.nonzero()[0])
        raise ValueError(f"{name}: w is not 2:4 sparse: row {row}, group {g} (k = {4 * g}..{4 * g + 3}) has "
                         f"{int(nonzero[row, g].sum())} non-zeros; at most 2 per group of 4 are allowed")
    idx = _kept_positions(nonzero)
    values = groups.gather(-1, idx).reshape(n, k // 2)
    return values, _pack_meta(idx)


def unpack_2of4(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """(values (N, K // 2), meta uint8 (N, ceil(K / 8))) -> the dense (N, K) weight in values' dtype, zeros at the
    pruned positions. Inverse of `pack_2of4`."""
    name = "unpack_2of4"
    _check_k(name, k)
    if values.dim() != 2 or values.shape[1] * 2 != k:
        raise ValueError(f"{name}: values must be (N, K // 2) = (N, {k // 2}), got {tuple(values.shape)}")
    n = values.shape[0]
    _check_meta(name, meta, n, k)
    idx = _unpack_meta(meta, k)
    dense = values.new_zeros(n, k // 4, 4)
    dense.scatter_(-1, idx, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


def _check_scales(name, scales, zeros, n, k, group_size) -> None:
    check_group_size(k, group_size)
    for t, what in ((scales, "scales"), (zeros, "zeros")):
        if t.dtype != torch.float16 or tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"{name}: {what} must be float16 (N, K // group_size) = ({n}, {k // group_size}), "
                             f"got {t.dtype} {tuple(t.shape)}")


def pack_2of4_int4(codes: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 codes of a 2:4-pruned weight -> (qvalues uint8 (N, K // 4), meta uint8 (N, ceil(K / 8)), scales, zeros).

    Args:
        codes: (N, K) integer in [0, 15]; ignored where mask is False.
        mask: (N, K) bool, exactly two True in every group of 4 consecutive k.
        scales, zeros: float16 (N, K // group_size), along the original K; returned as they are.
        group_size: 32, 64 or 128.
    """
    name = "pack_2of4_int4"
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"{name}: codes must be a 2-D (N, K) integer tensor, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    _check_k(name, k)
    if mask.dtype != torch.bool or mask.shape != codes.shape:
        raise ValueError(f"{name}: mask must be bool {tuple(codes.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    _check_scales(name, scales, zeros, n, k, group_size)
    kept = codes[mask]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) > 15):
        raise ValueError(f"{name}: kept codes must be in [0, 15], got [{int(kept.min())}, {int(kept.max())}]")
    groups = mask.reshape(n, k // 4, 4)
    bad = groups.sum(-1) != 2
    if bad.any():
        row, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: mask must keep exactly 2 of every 4: row {row}, group {g} keeps "
                         f"{int(groups[row, g].sum())}")
    idx = _kept_positions(groups)
    q = codes.reshape(n, k // 4, 4).gather(-1, idx).to(torch.uint8)  # (N, G, 2)
    qvalues = (q[..., 0] & 0xF) | ((q[..., 1] & 0xF) << 4)
    return qvalues, _pack_meta(idx), scales, zeros


def unpack_2of4_int4(qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (N, K) `dtype` weight: (q - zero) * scale in float32 at the kept positions, rounded once; 0 at the
    pruned ones. Inverse of `pack_2of4_int4` followed by dequantization."""
    name = "unpack_2of4_int4"
    _check_k(name, k)
    if qvalues.dtype != torch.uint8 or qvalues.dim() != 2 or qvalues.shape[1] * 4 != k:
        raise ValueError(f"{name}: qvalues must be uint8 (N, K // 4) = (N, {k // 4}), "
                         f"got {qvalues.dtype} {tuple(qvalues.shape)}")
    n = qvalues.shape[0]
    _check_meta(name, meta, n, k)
    _check_scales(name, scales, zeros, n, k, group_size)
    idx = _unpack_meta(meta, k)  # (N, G, 2)
    q = torch.stack((qvalues & 0xF, qvalues >> 4), dim=-1).float()  # (N, G, 2)
    # Both kept values of a group share its quantization group: group_size is a multiple of 4.
    s = scales.float().repeat_interleave(group_size // 4, dim=1)[..., None]  # (N, G, 1)
    z = zeros.float().repeat_interleave(group_size // 4, dim=1)[..., None]
    dense = torch.zeros(n, k // 4, 4, dtype=torch.float32, device=qvalues.device)
    dense.scatter_(-1, idx, (q - z) * s)
    return dense.reshape(n, k).to(dtype)


__all__ = ["SPARSE_DTYPES", "meta_columns", "pack_2of4", "pack_2of4_int4", "unpack_2of4", "unpack_2of4_int4"]
