"""Embedding lookups on quantized tables: gather the rows' codes and scales, dequantize only those rows.

Entry points:
- `torch.ops.llmcompress.embedding_w8(ids, qweight, scale, out_dtype)`: int8 rows (V, D) with one float32 scale
  per row (V,) (`formats.quantize_int8_per_channel` of the table: a row is an "output channel").
- `torch.ops.llmcompress.embedding_w4(ids, qweight, scales, zeros, group_size, out_dtype)`: int4 rows
  (V, D // 2) packed as `formats.pack_int4`, float16 scales and zeros (V, D // group_size)
  (`formats.quantize_int4_rtn` of the table).
- `embedding_w8_reference`, `embedding_w4_reference`: dequantize the whole table in float32, then `F.embedding`;
  the oracle for tests.

Both ops are plain torch (a gather reads M rows of a table, so there is nothing for a kernel to stream): `triton_op`s
without a Triton kernel, so under torch.compile Inductor inlines them and fuses the dequantization into one gather
kernel. They run on every device. The table stays in its compressed form; nothing dense is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op

from llmcompress.cost.roofline import nbytes, numel, register_cost, sym
from llmcompress.formats.quantized import INT4_GROUP_SIZES, dequantize_int4, dequantize_int8
from llmcompress.fx_utils import val

__all__ = ["embedding_w4_reference", "embedding_w8_reference"]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_common(name, ids, out_dtype) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: ids must be int64 or int32, got {ids.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def _check_w8(ids, qweight, scale, out_dtype) -> None:
    _check_common("embedding_w8", ids, out_dtype)
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"embedding_w8: qweight must be int8 (V, D), got {qweight.dtype} {tuple(qweight.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (qweight.shape[0],):
        raise ValueError(f"embedding_w8: scale must be float32 (V,) = ({qweight.shape[0]},), "
                         f"got {scale.dtype} {tuple(scale.shape)}")


def _check_w4(ids, qweight, scales, zeros, group_size, out_dtype) -> None:
    _check_common("embedding_w4", ids, out_dtype)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"embedding_w4: group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or (qweight.shape[1] * 2) % group_size:
        raise ValueError(f"embedding_w4: qweight must be uint8 (V, D // 2) with group_size {group_size} dividing D, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    expected = (qweight.shape[0], qweight.shape[1] * 2 // group_size)
    for t, what in ((scales, "scales"), (zeros, "zeros")):
        if t.dtype != torch.float16 or tuple(t.shape) != expected:
            raise ValueError(f"embedding_w4: {what} must be float16 (V, D // group_size) = {expected}, "
                             f"got {t.dtype} {tuple(t.shape)}")


def embedding_w8_reference(ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """F.embedding(ids, q * scale) in float32, rounded once to out_dtype. ids (...) -> (..., D)."""
    return F.embedding(ids, dequantize_int8(qweight, scale)).to(out_dtype)


def embedding_w4_reference(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """F.embedding(ids, (q - zero) * scale) in float32, rounded once to out_dtype. ids (...) -> (..., D)."""
    return F.embedding(ids, dequantize_int4(qweight, scales, zeros, group_size)).to(out_dtype)


@triton_op("llmcompress::embedding_w8", mutates_args=())
def _embedding_w8_op(ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    _check_w8(ids, qweight, scale, out_dtype)
    rows = F.embedding(ids, qweight).float()
    return (rows * F.embedding(ids, scale[:, None])).to(out_dtype)


@triton_op("llmcompress::embedding_w4", mutates_args=())
def _embedding_w4_op(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    _check_w4(ids, qweight, scales, zeros, group_size, out_dtype)
    packed = F.embedding(ids, qweight)  # (..., D // 2)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).float()  # (..., D)
    d = codes.shape[-1]
    grouped = codes.unflatten(-1, (d // group_size, group_size))
    s = F.embedding(ids, scales).float()[..., None]
    z = F.embedding(ids, zeros).float()[..., None]
    return ((grouped - z) * s).flatten(-2).to(out_dtype)


def _gather_cost(node):
    """A gather, as the roofline prices `aten.embedding`: the rows it reads at their stored width (codes, scales,
    zeros: M rows of each table, not the table), the ids, the rows it writes; one multiply-add per output value."""
    ids, out = val(node.args[0]), node.meta["val"]
    m = numel(ids)
    rows = sum(numel(t) / sym(t.shape[0]) * t.element_size() for t in (val(a) for a in node.args[1:])
               if isinstance(t, torch.Tensor))
    return 2 * numel(out), nbytes(ids) + nbytes(out, stored=False) + m * rows


register_cost(torch.ops.llmcompress.embedding_w8.default)(_gather_cost)
register_cost(torch.ops.llmcompress.embedding_w4.default)(_gather_cost)
