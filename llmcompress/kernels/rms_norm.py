"""RMSNorm over the last dimension, with Hugging Face LlamaRMSNorm numerics.

Entry points:
- `torch.ops.llmcompress.rms_norm(x, weight, eps)`: the custom op that graphs call;
  CUDA runs the Triton kernel, CPU runs `rms_norm_reference`; differentiable (plain
  torch backward) so torch.compile also works when the weight requires grad.
- `rms_norm_triton(x, weight, eps)`: checks inputs, allocates and launches `_rms_norm_kernel`.
- `rms_norm_reference(x, weight, eps)`: plain torch, the single source of truth for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from triton.runtime.jit import JITFunction

from llmcompress.cost.roofline import io_bytes, numel, register_cost
from llmcompress.kernels import linear_common as common

__all__ = ["rms_norm_reference", "rms_norm_triton"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# One row is held in registers as a single block; Triton caps a block at 2**20
# elements, and past 64K fp32 values per row a one-block kernel spills badly.
# LLM hidden sizes stop at 16384 (Llama 3.1 405B).
_MAX_N = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    n_cols,
    x_row_stride,
    out_row_stride,
    eps,
    BLOCK_N: tl.constexpr,
):
    # int64 row offsets: rows * stride passes 2**31 for large activations.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    h = x.to(tl.float32)
    # Masked lanes load 0, so they add nothing to the sum; divide by the true n_cols.
    mean_sq = tl.sum(h * h, axis=0) / n_cols
    h = h * tl.rsqrt(mean_sq + eps)

    # LlamaRMSNorm rounds the normalized row to the input dtype *before* the weight
    # multiply. Products of two fp16/bf16 values are exact in fp32, so multiplying
    # in fp32 and rounding once to the output dtype equals torch's promoted multiply.
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward verbatim; the CPU path of the op and the oracle for tests.

    Args:
        x: (..., N) float tensor.
        weight: (N,) scale.
        eps: added to the mean square before the rsqrt.

    Returns:
        (..., N) tensor of dtype promote_types(weight.dtype, x.dtype).
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    allowed = "float16, bfloat16 or float32"
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm: x must be {allowed}, got {x.dtype}")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm: weight must be {allowed}, got {weight.dtype}")
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least 1 dimension, got a 0-d tensor")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must be 1-D of size x.shape[-1]={x.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(
            f"rms_norm: x and weight must be on the same device, got {x.device} and {weight.device}"
        )


def _num_warps(block_n: int) -> int:
    # Liger-Kernel's calculate_settings thresholds; not re-tuned for this kernel.
    if block_n >= 32768:
        return 32
    if block_n >= 8192:
        return 16
    if block_n >= 2048:
        return 8
    return 4


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch `_rms_norm_kernel`, one program per row; same numerics as `rms_norm_reference`.

    Any leading layout works: x is flattened to (rows, N) with an explicit row stride,
    copied only when its last dim is strided or the leading dims cannot be merged.

    Args:
        x: (..., N) float16/bfloat16/float32 tensor, N <= 65536, on a Triton device
            (CPU tensors only under TRITON_INTERPRET=1).
        weight: (N,) float16/bfloat16/float32, same device as x.
        eps: added to the mean square before the rsqrt.

    Returns:
        (..., N) contiguous tensor of dtype promote_types(weight.dtype, x.dtype).
    """
    _check_inputs(x, weight)
    # Under TRITON_INTERPRET=1 @triton.jit returns an InterpretedFunction, which runs
    # on CPU tensors; torch 2.11's wrap_triton rejects it (2.13 passes it through).
    compiled = isinstance(_rms_norm_kernel, JITFunction)
    if compiled and x.device.type == "cpu":
        raise ValueError(
            "rms_norm_triton: x is on cpu; the Triton kernel needs a GPU tensor "
            "(or TRITON_INTERPRET=1); use rms_norm_reference on CPU"
        )
    n = x.shape[-1]
    if n > _MAX_N:
        raise ValueError(f"rms_norm_triton: x.shape[-1] must be <= {_MAX_N}, got {n}")

    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    x2d = x.reshape(-1, n)
    out2d = out.view(-1, n)

    block_n = triton.next_power_of_2(n)
    common.wrap(_rms_norm_kernel)[(x2d.shape[0],)](
        x2d,
        weight,
        out2d,
        n,
        x2d.stride(0),
        out2d.stride(0),
        eps,
        BLOCK_N=block_n,
        num_warps=_num_warps(block_n),
    )
    return out


@triton_op("llmcompress::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # triton_op also uses this body as the fake impl and, under torch.compile, inlines
    # it (its FunctionalTensorMode rule) instead of dispatching to the CPU kernel below;
    # so it must route CPU tensors to the reference itself. The device is static while
    # tracing, so only one branch lands in the graph.
    if x.device.type != "cuda":  # the CPU, and the meta device of a cost report's trace
        _check_inputs(x, weight)
        return rms_norm_reference(x, weight, eps)
    return rms_norm_triton(x, weight, eps)


@_rms_norm_op.register_kernel("cpu")
def _rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Eager CPU calls land here, so they never take the triton_op launch path.
    _check_inputs(x, weight)
    return rms_norm_reference(x, weight, eps)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad_out: torch.Tensor):
    # Without a formula, torch.compile of a module whose weight requires grad fails
    # while tracing the joint graph, even if backward is never called. Plain torch in
    # fp32, treating the round of h to x.dtype as identity (as autograd does for .to).
    x, weight = ctx.saved_tensors
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ctx.eps)
    h = h * rstd
    g = grad_out.float()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        gh = g * weight.float()
        grad_x = (rstd * (gh - h * (gh * h).mean(-1, keepdim=True))).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = (g * h.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return grad_x, grad_w, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


@register_cost(torch.ops.llmcompress.rms_norm.default)
def _rms_norm_cost(node):
    """Square, sum, scale and weight multiply per element (4 FLOPs); x and weight read once, out written once."""
    x = node.args[0].meta["val"]
    return 4 * numel(x), io_bytes(node)
