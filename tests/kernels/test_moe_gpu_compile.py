"""The MoE kernels (llmcompress/kernels/moe_route.py, moe_experts.py) compiled ahead of time for sm_90 and sm_80
(llmcompress/testing/gpu_compile.py, families "moe", "moe-int4" (with AWQ scales too) and "moe-int8", with the load
counters' and the skip compensation's kernels): one config per kernel, block shape, dtype and target, the one
with the most shared memory the launcher offers; a compile error, shared memory over the limit or the estimate, or a
spill fails."""

from __future__ import annotations

import inspect

import pytest

from llmcompress.kernels import moe_experts, moe_load_counters, moe_route, moe_skip_compensation
from llmcompress.testing.gpu_compile import check_row

pytestmark = pytest.mark.gpu_compile

DTYPES = ("float16", "bfloat16", "float32")
TARGETS = ("sm_90", "sm_80")
KERNELS = {"gemv": ("_moe_topk_kernel", "_moe_align_kernel", "_moe_gate_up_gemv_kernel", "_moe_down_gemv_kernel"),
           "gemm": ("_moe_topk_kernel", "_moe_align_kernel", "_moe_gate_up_gemm_kernel", "_moe_down_gemm_kernel")}
VARIANTS = {"gemv": ("mixtral-8x7b (8 experts, top-2), gemv, block_m 16", "olmoe (64 experts, top-8), gemv, block_m 16"),
            "gemm": ("mixtral-8x7b (8 experts, top-2), gemm, block_m 64",
                     "olmoe (64 experts, top-8), gemm, block_m 64")}
EXPECTED = [(kernel, variant) for path in ("gemv", "gemm") for kernel in KERNELS[path] for variant in VARIANTS[path]]
INT4_VARIANTS = {"gemv": "mixtral-8x7b int4 g128, gemv, block_m 16", "gemm": "mixtral-8x7b int4 g128, gemm, block_m 64"}
EXPECTED_INT4 = [(kernel, INT4_VARIANTS[path]) for path in ("gemv", "gemm") for kernel in KERNELS[path]] + [
    (kernel, INT4_VARIANTS[path].replace("g128", "g128 awq")) for path in ("gemv", "gemm") for kernel in KERNELS[path]]
INT8_VARIANTS = {"gemv": "mixtral-8x7b int8, gemv, block_m 16", "gemm": "mixtral-8x7b int8, gemm, block_m 64"}
EXPECTED_INT8 = [(kernel, INT8_VARIANTS[path]) for path in ("gemv", "gemm") for kernel in KERNELS[path]] + [
    ("_moe_count_kernel", "load counters, 512 tokens top-2"), ("_compensate_kernel", "skip compensation, 512 tokens top-2"),
    ("_moe_topk_kernel", "routing with skipping, 512 tokens top-2"),
    ("_moe_align_kernel", "routing with skipping, 512 tokens top-2")]


@pytest.fixture(scope="module")
def rows(reduced_gpu_rows) -> list[dict]:
    return reduced_gpu_rows("moe,moe-int4,moe-int8")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,variant", EXPECTED)
def test_moe_kernel_compiles_for_the_gpu(rows, kernel, variant, dtype, target):
    found = [r for r in rows if (r["family"], r["kernel"], r["variant"], r["dtype"], r["target"])
             == ("moe", kernel, variant, dtype, target)]
    assert len(found) == 1, f"{len(found)} rows for {kernel} {variant} {dtype} {target}"
    check_row(found[0])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("kernel,variant", EXPECTED_INT4)
def test_moe_int4_kernel_compiles_for_the_gpu(rows, kernel, variant, dtype, target):
    found = [r for r in rows if (r["family"], r["kernel"], r["variant"], r["dtype"], r["target"])
             == ("moe", kernel, variant, dtype, target)]
    assert len(found) == 1, f"{len(found)} rows for {kernel} {variant} {dtype} {target}"
    check_row(found[0])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("kernel,variant", EXPECTED_INT8)
def test_moe_int8_kernel_compiles_for_the_gpu(rows, kernel, variant, dtype, target):
    found = [r for r in rows if (r["family"], r["kernel"], r["variant"], r["dtype"], r["target"])
             == ("moe", kernel, variant, dtype, target)]
    assert len(found) == 1, f"{len(found)} rows for {kernel} {variant} {dtype} {target}"
    check_row(found[0])


def test_every_moe_kernel_is_compiled(rows):
    defined = {name for module in (moe_route, moe_experts, moe_load_counters, moe_skip_compensation)
               for name, obj in vars(module).items()
               if name.endswith("_kernel") and hasattr(obj, "fn") and inspect.getmodule(obj.fn) is module}
    assert len(defined) == 8 and defined <= {r["kernel"] for r in rows}, f"not compiled: {defined}"
