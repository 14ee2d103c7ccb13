"""Whether our fused kernels run as Triton where this graph runs: the cost model prices them as fused kernels, which
they are only there. Elsewhere (a CPU without the Triton interpreter) the ops run their PyTorch references, op by op,
and hide the graph from the lowering: `fuse-linear-epilogue` and `fuse-pointwise` then leave it alone (unless
`force`d, as `lowering="triton"` does; that lowering itself refuses a CPU without the interpreter)."""

from __future__ import annotations

from typing import Any

import torch

from llmcompress.passes.base import PassContext


def _device(ctx: PassContext) -> torch.device | None:
    return next((x.device for x in ctx.example_inputs if isinstance(x, torch.Tensor)), None)


def no_triton_reason(ctx: PassContext) -> str | None:
    """None when our Triton kernels run on the graph's device (CUDA; the CPU under TRITON_INTERPRET=1; the meta
    device of a cost report, which prices the target hardware), else why not."""
    from llmcompress.kernels.linear_common import INTERPRETED

    device: Any = _device(ctx)
    if device is None or device.type in ("cuda", "meta") or (device.type == "cpu" and INTERPRETED):
        return None
    return f"no Triton kernels on {device.type} (our ops would run their PyTorch references)"
