"""Our Triton code generator: a fusion group of aten nodes -> Triton source -> kernel -> one custom op call.

Entry points: `fusible(node)` and `is_reduction(node)` (what a group may hold), `compile_group(nodes)` (raises
`CodegenError` with the reason when it cannot), `get_kernel(key)`. The row model and the
numerics are described in `emit.py` and `ops.py`; the cache and the op in `runtime.py`.
"""

from llmcompress.codegen.group import CodegenError
from llmcompress.codegen.ops import fusible, is_input_view, is_reduction
from llmcompress.codegen.runtime import FusedKernel, compile_group, default_cache_dir, get_kernel

__all__ = ["CodegenError", "FusedKernel", "compile_group", "default_cache_dir", "fusible", "get_kernel",
           "is_input_view", "is_reduction"]
