"""Hand-written Triton kernels, each registered as a `torch.ops.llmcompress.*` custom op.

Importing this package registers every op (`import llmcompress.kernels`).

Every kernel file `kernels/<name>.py` follows `rms_norm.py`:
- `_<name>_kernel`: a private `@triton.jit` kernel, arguments grouped as pointers,
  sizes, strides, scalars, then `BLOCK_*` constexprs.
- `<name>_triton(...)`: the public launcher; raises `ValueError` naming what is
  allowed for bad shapes/dtypes/devices, allocates the output, launches through
  `torch.library.wrap_triton(kernel)` (called directly when TRITON_INTERPRET=1 made
  the kernel an InterpretedFunction, which torch 2.11's `wrap_triton` rejects).
- `<name>_reference(...)`: plain torch, the CPU implementation and the single
  source of truth for tests.
- `llmcompress::<name>`: a `torch.library.triton_op`, so Inductor traces into the
  kernel; CUDA runs the launcher, CPU runs the reference. The CPU route exists
  twice: `op.register_kernel("cpu")` for eager dispatch, and a device branch in the
  op body, because triton_op reuses the body as the fake impl and inlines it under
  torch.compile without going through the CPU kernel.
- `op.register_autograd(...)` with a plain-torch backward when the op sits on a
  path that may require grad: without one, torch.compile fails while tracing the
  joint graph of any module whose weights require grad.

What the quantized linears (`int4_linear`, `int8_linear`, `w8a8_linear`, `fp8_linear`)
share — Triton helpers, the launch helper, M buckets, input checks, the backward and
cost formulas — lives in `linear_common.py`; each kernel file keeps its kernels,
launchers, reference and op. Which of a linear's kernels runs at each row count M
(GEMV, GEMM, dequantize + cuBLAS), priced by the cost model, is `kernel_path.py`'s
`choose_kernel_path`: the passes pass its crossovers to the ops. The 2:4 sparse linears
(`sparse_linear.py`, `llmcompress::linear_2of4` and `linear_2of4_w4a16`) have their own
choice against dense and torch's semi-structured path, `sparse_path.py`. The low-rank linear
(`lowrank_linear.py`, `llmcompress::linear_lowrank`) has `lowrank_path.py`: whether a split pays at all.
A MoE block is two ops: `moe_route.py` (`llmcompress::moe_route`: top-k and tokens block-aligned by expert) and
`moe_experts.py` (`llmcompress::moe_experts` / `moe_experts_w4a16`: gate-up with SiLU·up, down with the routing
weight; float or int4 experts); `moe_path.py`
chooses the experts' GEMV or GEMM per token count.
"""

from llmcompress.kernels import (
           cpu_weight_only,
           fp8_linear,
           fused_linear,
           grouped_linear,
           int4_linear,
           int8_linear,
           lowrank_linear,
           moe_experts,
           moe_load_counters,
           moe_route,
           quantized_embedding,
           rms_norm,
           sparse_linear,
           w8a8_linear,
)
from llmcompress.kernels.rms_norm import rms_norm_reference, rms_norm_triton

__all__ = ["cpu_weight_only", "fp8_linear", "fused_linear", "grouped_linear", "int4_linear", "int8_linear",
           "lowrank_linear", "moe_experts", "moe_load_counters", "moe_route", "quantized_embedding", "rms_norm", "rms_norm_reference",
           "rms_norm_triton", "sparse_linear", "w8a8_linear"]
