"""Our Triton code generator: a fusion group of aten nodes -> Triton source -> kernel -> one custom op call.

Entry points: `fusible(node)` and `is_reduction(node)` (what a group may hold), `compile_group(nodes)` (raises
`CodegenError` with the reason when it cannot), `insert_call(gm, kernel)`, `get_kernel(key)`. The row model and the
numerics are described in `emit.py` and `ops.py`; the cache and the op in `runtime.py`.
"""

from .group import CodegenError
from .ops import fusible, is_input_view, is_reduction
from .runtime import FusedKernel, compile_group, default_cache_dir, get_kernel, insert_call

__all__ = ["CodegenError", "FusedKernel", "compile_group", "default_cache_dir", "fusible", "get_kernel",
           "insert_call", "is_input_view", "is_reduction"]
