"""Weight-only linears on the CPU through torch's own kernels, on weights packed once at compile time.

Entry points:
- `torch.ops.llmcompress.linear_w8a16_cpu(x, qweight, scale, bias=None, act_scale=None)`:
  `aten._weight_int8pack_mm` on int8 codes (N, K) and a per-channel scale (N,) in x's dtype.
- `torch.ops.llmcompress.linear_w4a16_cpu(x, qweight, scales_and_zeros, group_size, bias=None, act_scale=None)`:
  `aten._weight_int4pack_mm_for_cpu` on torch's packed int4 layout (N, K // 2) and (K // group_size, N, 2)
  [scale, zero_float] in x's dtype.
- `linear_w8a16_cpu_reference`, `linear_w4a16_cpu_reference`: plain torch (dequantize to float32, one matmul),
  the oracle the ops are tested against, beside `linear_w8a16_reference` / `linear_w4a16_reference` on the
  formats these were converted from.

The formats and the shapes torch's kernels accept are `formats/cpu_packed.py`'s. `quantize-linear` puts these ops in
a graph whose weights are on the CPU (the cost model prices them against the reference path of `linear_w8a16` /
`linear_w4a16`, which dequantizes the whole weight per call). Numerics: torch's kernels accumulate in float32;
x * act_scale is rounded to x's dtype before the product and the bias is added to the rounded product (the
references round once), and the scales are held in x's dtype (`cpu_packed.py`).

The ops are `triton_op`s with no Triton kernel: under torch.compile their body is inlined, so Inductor sees the
aten calls (its `_weight_int8pack_mm` lowering, the act_scale multiply fused into the producer's kernel).
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from llmcompress.cost.roofline import register_cost
from llmcompress.formats import cpu_packed
from llmcompress.kernels import linear_common as common

__all__ = ["linear_w4a16_cpu_reference", "linear_w8a16_cpu_reference"]

aten = torch.ops.aten


def _check(name, x, qweight, scale_dtype, n, bias, act_scale) -> None:
    common.check_activation(name, x)
    if x.device.type not in ("cpu", "meta"):
        raise ValueError(f"{name}: runs on the CPU (torch's CPU weight-only kernels), got x on {x.device}; "
                         "on a GPU the graph calls linear_w8a16 / linear_w4a16")
    if scale_dtype != x.dtype:
        raise ValueError(f"{name}: scales must be in x's dtype {x.dtype} (torch's CPU kernel), got {scale_dtype}; "
                         "repack with formats.cpu_packed for this dtype")
    common.check_bias_act_scale(name, x, n, bias, act_scale)
    common.check_devices(name, x, qweight, bias, act_scale)


def _check_w8(x, qweight, scale, bias, act_scale, name="linear_w8a16_cpu") -> None:
    k = x.shape[-1]
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(f"{name}: qweight must be int8 (N, K) with K={k}, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if tuple(scale.shape) != (n,):
        raise ValueError(f"{name}: scale must be (N,) = ({n},), got {tuple(scale.shape)}")
    reason = cpu_packed.int8_cpu_unsupported(n, k)
    if reason:
        raise ValueError(f"{name}: {reason}; use linear_w8a16 (its CPU path is the reference)")
    _check(name, x, qweight, scale.dtype, n, bias, act_scale)


def _check_w4(x, qweight, scales_and_zeros, group_size, bias, act_scale, name="linear_w4a16_cpu") -> None:
    k = x.shape[-1]
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise ValueError(f"{name}: qweight must be uint8 (N, K // 2) = (N, {k // 2}) in torch's CPU int4 layout, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    reason = cpu_packed.int4_cpu_unsupported(n, k, group_size)
    if reason:
        raise ValueError(f"{name}: {reason}; use linear_w4a16 (its CPU path is the reference)")
    if tuple(scales_and_zeros.shape) != (k // group_size, n, 2):
        raise ValueError(f"{name}: scales_and_zeros must be (K // group_size, N, 2) = ({k // group_size}, {n}, 2), "
                         f"got {tuple(scales_and_zeros.shape)}")
    _check(name, x, qweight, scales_and_zeros.dtype, n, bias, act_scale)


def _rows(x: torch.Tensor, act_scale: torch.Tensor | None) -> torch.Tensor:
    """x as (M, K) in its dtype, times act_scale in float32 (rounded once to x's dtype)."""
    x2d = x.reshape(-1, x.shape[-1])
    if act_scale is not None:
        x2d = (x2d.float() * act_scale).to(x.dtype)
    return x2d.contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def linear_w8a16_cpu_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                               bias: torch.Tensor | None = None,
                               act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """((x.float() * act_scale) @ (q * scale).T + bias).to(x.dtype) in float32, rounded once.

    Args:
        x: (..., K) float16/bfloat16/float32.
        qweight: (N, K) int8.
        scale: (N,) in x's dtype.
        bias: optional (N,), x.dtype. act_scale: optional (K,) float32.
    """
    w = qweight.float() * scale.float()[:, None]
    return common.weight_only_linear_reference(x, w, bias, act_scale)


def linear_w4a16_cpu_reference(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
                               group_size: int, bias: torch.Tensor | None = None,
                               act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """As `linear_w8a16_cpu_reference` with W = (q - 8) * scale + zero_float (`cpu_packed.dequantize_int4_cpu`).

    Args:
        qweight: (N, K // 2) uint8 in torch's CPU int4 layout.
        scales_and_zeros: (K // group_size, N, 2) in x's dtype.
    """
    w = cpu_packed.dequantize_int4_cpu(qweight, scales_and_zeros, group_size)
    return common.weight_only_linear_reference(x, w, bias, act_scale)


@triton_op("llmcompress::linear_w8a16_cpu", mutates_args=())
def _linear_w8a16_cpu_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_w8(x, qweight, scale, bias, act_scale)
    return _finish(aten._weight_int8pack_mm(_rows(x, act_scale), qweight, scale), x, bias)


@triton_op("llmcompress::linear_w4a16_cpu", mutates_args=())
def _linear_w4a16_cpu_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_w4(x, qweight, scales_and_zeros, group_size, bias, act_scale)
    y = aten._weight_int4pack_mm_for_cpu(_rows(x, act_scale), qweight, group_size, scales_and_zeros)
    return _finish(y, x, bias)


@register_cost(torch.ops.llmcompress.linear_w8a16_cpu.default)
def _linear_w8a16_cpu_cost(node):
    """2·M·N·K (+M·N bias, +M·K act_scale); bytes: int8 codes, scales, activations at their stored dtypes."""
    return common.weight_only_linear_cost(node, bias_index=3, act_scale_index=4)


@register_cost(torch.ops.llmcompress.linear_w4a16_cpu.default)
def _linear_w4a16_cpu_cost(node):
    """2·M·N·K (+M·N bias, +M·K act_scale); bytes: packed codes (K / 2 per row), scales and zeros, activations."""
    return common.weight_only_linear_cost(node, bias_index=4, act_scale_index=5)
