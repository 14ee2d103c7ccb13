"""The 2:4 kernel choice (`kernels/sparse_path.py`): per M, our 2:4 op, torch's semi-structured path or the dense
masked linear, priced by the cost model."""

from __future__ import annotations

import pytest
import torch

from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.kernels.kernel_path import M_GRID
from llmcompress.kernels.linear_common import GEMV_MAX_M
from llmcompress.kernels.sparse_path import SEMI_STRUCTURED_SMALL_M_FACTOR, choose_sparse_path, stored_bytes

H100 = CostModel(HARDWARE["h100-sxm"])


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_h100_decode_takes_the_2of4_gemv(n, k):
    path = choose_sparse_path(H100, n, k, torch.bfloat16, "cuda")
    assert path.kernel_at(1) == "gemv" and path.gemv_max_m >= 1 and path.uses_op
    assert path.kernel_at(17) != "gemv"  # past the GEMV's 16 rows
    # Memory-bound at M = 1: 0.5625 of dense's bytes, so (launch included) well under dense.
    p = path.priced["m=1"]
    assert p["gemv_s"] < 0.75 * p["dense_masked_s"]
    # torch's semi-structured path is priced 25x dense at decode, never chosen there.
    assert p["semi_structured_s"] == pytest.approx(SEMI_STRUCTURED_SMALL_M_FACTOR * p["dense_masked_s"])
    # Prefill: compute-bound, our kernels multiply the zeros too, so they never win; the sparse tensor cores may.
    assert path.kernel_at(4096) in ("dense (masked)", "semi-structured")


def test_int4_variant_on_h100():
    path = choose_sparse_path(H100, 4096, 4096, torch.float16, "cuda", "2of4-w4a16", 128)
    assert path.kernel_at(1) == "gemv"
    assert path.priced["m=1"]["semi_structured_s"] is None  # only the float variant has torch's path
    assert stored_bytes(4096, 4096, torch.float16, "2of4-w4a16") == 4096 * 4096 * (0.375 + 4 / 128)


@pytest.mark.parametrize("variant", ["2of4", "2of4-w4a16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_keeps_dense_masked_everywhere(variant, dtype):
    """On a CPU the op is its reference (unpack + float32 matmul): never faster than the dense masked linear."""
    cpu = CostModel(HARDWARE["cpu"])
    path = choose_sparse_path(cpu, 4096, 4096, dtype, "cpu", variant)
    assert path.ranges == ((1, None, "dense (masked)"),) and not path.uses_op
    for prices in path.priced.values():
        assert prices["gemv_s"] is None and prices["semi_structured_s"] is None
        assert prices["reference_s"] > prices["dense_masked_s"]


class Stub:
    """Prices told apart by their bytes: M <= 3 the op wins, then dense, from 1024 torch's semi-structured path."""

    def __init__(self, n, k):
        self.dense = n * k * 2
        self.sparse = stored_bytes(n, k, torch.bfloat16, "2of4")

    def kernel_time(self, flops, nbytes, dtype, *, tensor_cores=True, rows=None, launches=1):
        if rows is None:  # the GEMV, on its padded rows
            return 1.0 if flops <= 2 * 4 * 96 * 80 else 9.0
        if flops < 2 * rows * 96 * 80:  # semi-structured: the sparse tensor cores' share of the FLOPs
            return 1.5 if rows >= 1024 else 100.0
        weight = nbytes - rows * (80 + 96) * 2
        assert weight in (self.dense, self.sparse)
        return 2.0 if weight == self.dense else 3.0  # dense cuBLAS, our GEMM


def test_ranges_follow_the_cheapest_kernel_per_m():
    path = choose_sparse_path(Stub(96, 80), 96, 80, torch.bfloat16, "cuda")
    # bucket 4 holds M = 3, 4: the GEMV wins up to 4.
    assert path.ranges == ((1, 4, "gemv"), (5, 1023, "dense (masked)"), (1024, None, "semi-structured"))
    assert path.gemv_max_m == 4
    assert path.dense_min_m == 5  # the op expands the weight and runs F.linear from the first M it loses
    assert [path.kernel_at(m) for m in (1, 4, 5, 1000, 1024, 10**6)] == \
        ["gemv", "gemv", "dense (masked)", "dense (masked)", "semi-structured", "semi-structured"]
    assert set(path.priced) == {"m=1", "m=4", "m=16", "m=256", "m=4096"} and M_GRID[0] == 1


def test_no_cost_model_means_dense():
    path = choose_sparse_path(None, 64, 64, torch.float16, "cuda")
    assert path.kernel_at(1) == "dense (masked)" and path.dense_min_m is None


def test_dense_min_m_on_h100_and_cpu():
    """The op runs where it wins at decode; past its last winning M it expands the weight (never torch's path,
    which needs its own weight form); on a CPU the layer keeps its masked dense weight (None)."""
    path = choose_sparse_path(H100, 11008, 4096, torch.bfloat16, "cuda")
    first_loss = next(first for first, _, kernel in path.ranges if kernel not in ("gemv", "gemm"))
    assert path.dense_min_m == first_loss > GEMV_MAX_M
    cpu = CostModel(HARDWARE["cpu"])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert choose_sparse_path(cpu, 4096, 4096, dtype, "cpu").dense_min_m is None


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "2of8"}, r"variant must be one of \('2of4', '2of4-w4a16'\)"),
    ({"dtype": torch.int8}, r"dtype must be one of"),
    ({"k": 66}, r"K must be a multiple of 4"),
    ({"device": "meta"}, r"device must be cuda or cpu"),
    ({"variant": "2of4-w4a16", "group_size": 48}, r"group_size must be one of"),
])
def test_bad_arguments(kwargs, match):
    args = {"cost_model": H100, "n": 64, "k": 128, "dtype": torch.float16, "device": "cuda"} | kwargs
    with pytest.raises(ValueError, match=match):
        choose_sparse_path(**args)


class Flat:
    def kernel_time(self, *args, **kwargs):
        return 1.0


def test_ties_go_to_dense():
    """Where every candidate costs the same, the layer keeps its masked dense weight."""
    assert choose_sparse_path(Flat(), 96, 80, torch.float16, "cuda").ranges == ((1, None, "dense (masked)"),)
