"""The code generator's kernels for the fusion tests' groups (residual + RMSNorm, rotary embedding, masked softmax),
compiled ahead of time for sm_90 and sm_80 at a prefill shape in each dtype (llmcompress/testing/gpu_compile.py):
a compile error, shared memory over the limit or a spill fails."""

from __future__ import annotations

import pytest

from llmcompress.testing.gpu_compile import REDUCED_GROUPS, check_row

pytestmark = pytest.mark.gpu_compile


@pytest.fixture(scope="module")
def rows(reduced_gpu_rows) -> list[dict]:
    return reduced_gpu_rows("codegen")


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("group", REDUCED_GROUPS)
def test_generated_kernel_compiles_for_the_gpu(rows, group, dtype, target):
    found = [r for r in rows if (r["variant"], r["dtype"], r["target"]) == (group, dtype, target)]
    assert len(found) == 1 and found[0]["kernel"] == "fused_kernel"
    check_row(found[0])
