"""The low-rank fused kernel (llmcompress/kernels/lowrank_linear.py) compiled ahead of time for sm_90 and sm_80
(llmcompress/testing/gpu_compile.py, family "lowrank"): one config per row path (FMA rows, tensor-core rows), dtype
and target, the one with the most shared memory the launcher offers; a compile error, shared memory over the limit
or the estimate, or a spill fails."""

from __future__ import annotations

import inspect

import pytest

from llmcompress.kernels import lowrank_linear
from llmcompress.testing.gpu_compile import check_row

pytestmark = pytest.mark.gpu_compile

DTYPES = ("float16", "bfloat16", "float32")
TARGETS = ("sm_90", "sm_80")
VARIANTS = tuple(f"r 1024, {rows}{u}" for rows in ("fma rows", "tensor-core rows") for u in ("", ", u transposed"))


@pytest.fixture(scope="module")
def rows(reduced_gpu_rows) -> list[dict]:
    return reduced_gpu_rows("lowrank")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lowrank_kernel_compiles_for_the_gpu(rows, variant, dtype, target):
    found = [r for r in rows if (r["family"], r["kernel"], r["variant"], r["dtype"], r["target"])
             == ("lowrank_linear", "_lowrank_fused_kernel", variant, dtype, target)]
    assert len(found) == 1, f"{len(found)} rows for {variant} {dtype} {target}"
    check_row(found[0])


def test_every_lowrank_kernel_is_compiled(rows):
    defined = {name for name, obj in vars(lowrank_linear).items() if name.endswith("_kernel") and hasattr(obj, "fn")
               and inspect.getmodule(obj.fn) is lowrank_linear}
    assert defined and defined <= {r["kernel"] for r in rows}, f"not compiled: {defined}"
