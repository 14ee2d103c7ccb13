"""The 2:4 kernels (llmcompress/kernels/sparse_linear.py) compiled ahead of time for sm_90 and sm_80
(llmcompress/testing/gpu_compile.py, family "sparse"): one config per kernel, variant, dtype and target, the one with
the most shared memory the launcher offers; a compile error, shared memory over the limit or the estimate, or a
spill fails."""

from __future__ import annotations

import inspect

import pytest

from llmcompress.kernels import sparse_linear
from llmcompress.testing.gpu_compile import check_row

pytestmark = pytest.mark.gpu_compile

DTYPES = ("float16", "bfloat16", "float32")
TARGETS = ("sm_90", "sm_80")
EXPECTED = [(kernel, variant) for kernel in ("_s24_gemv_kernel", "_s24_gemm_kernel")
            for variant in ("2:4", "int4 + 2:4 group 128")]


@pytest.fixture(scope="module")
def rows(reduced_gpu_rows) -> list[dict]:
    return reduced_gpu_rows("sparse")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,variant", EXPECTED)
def test_sparse_kernel_compiles_for_the_gpu(rows, kernel, variant, dtype, target):
    found = [r for r in rows if (r["family"], r["kernel"], r["variant"], r["dtype"], r["target"])
             == ("sparse_linear", kernel, variant, dtype, target)]
    assert len(found) == 1, f"{len(found)} rows for {kernel} {variant} {dtype} {target}"
    check_row(found[0])


def test_every_sparse_kernel_is_compiled(rows):
    defined = {name for name, obj in vars(sparse_linear).items() if name.endswith("_kernel") and hasattr(obj, "fn")
               and inspect.getmodule(obj.fn) is sparse_linear}
    assert defined and defined <= {r["kernel"] for r in rows}, f"not compiled: {defined}"
