"""The kernel-path choice (`kernels/kernel_path.py`): which M runs the GEMV, the GEMM or dequantize + cuBLAS, priced by
the cost model; the GEMV's engine and padding are the kernel's own."""

from __future__ import annotations

import torch

from llmcompress.cost.hardware import HARDWARE, Hardware
from llmcompress.cost.roofline import CostModel
from llmcompress.formats import quantized as formats
from llmcompress.kernels.kernel_path import choose_gemv_max_m, choose_kernel_path
from llmcompress.kernels.linear_common import DENSE_OFF, GEMV_MAX_M, run_by_rows

N, K, E = 96, 80, 2  # bfloat16; not multiples of any block size
WEIGHT_BYTES = 3.0  # the stored weight: tiny, so that the stub below tells the GEMM from cuBLAS by bytes
DENSE_BYTES = N * K * E

# The GEMV's rows and engine at each M as its launchers run it: BLOCK_M = 1, 2, 4 with fp32 FMAs, 16 on tensor
# cores (`if BLOCK_M >= 16: tl.dot` in the kernels).
GEMV_ROWS = {1: (1, False), 2: (2, False), 3: (4, False), 4: (4, False),
             **{m: (16, True) for m in range(5, GEMV_MAX_M + 1)}}


def _act(m: int) -> float:
    return float((m * K + m * N) * E)


# Stub prices (seconds) of each candidate by M: the GEMV wins up to 5, ties at 6, loses after; dequantize +
# cuBLAS beats the GEMM from 512.
def gemv_price(m):
    return 1.0 if m <= 5 else 2.0 if m == 6 else 3.0


def gemm_price(m):
    return 2.0


def dense_price(m):
    return 0.5 + (10.0 if m < 512 else 1.0)


class StubCostModel:
    """Prices each candidate kernel by what it is, told apart by its arguments; records the GEMV's calls."""

    def __init__(self):
        self.gemv_calls = {}

    def kernel_time(self, flops, nbytes, dtype, *, tensor_cores=True, rows=None, launches=1):
        assert dtype is torch.bfloat16
        if rows is None and flops == 0:  # dequantize: writes the dense copy
            assert not tensor_cores and nbytes == WEIGHT_BYTES + DENSE_BYTES
            return 0.5
        if rows is None:  # the GEMV: its padded rows, on its engine
            m = round((nbytes - WEIGHT_BYTES) / ((K + N) * E))
            self.gemv_calls[m] = (flops / (2 * N * K), tensor_cores)
            return gemv_price(m)
        if nbytes - _act(rows) == WEIGHT_BYTES:  # the GEMM streams the stored weight
            return gemm_price(rows)
        assert nbytes - _act(rows) == DENSE_BYTES  # cuBLAS reads the dense copy
        return dense_price(rows) - 0.5


def test_gemv_priced_on_its_padded_rows_and_engine():
    cm = StubCostModel()
    choose_kernel_path(cm, N, K, torch.bfloat16, WEIGHT_BYTES)
    assert cm.gemv_calls == GEMV_ROWS


def test_crossovers_pick_the_cheapest_kernel_at_every_m():
    path = choose_kernel_path(StubCostModel(), N, K, torch.bfloat16, WEIGHT_BYTES)
    assert (path.gemv_max_m, path.dense_min_m) == (6, 512)  # the tie at 6 goes to the GEMV
    assert path.priced["m=1"] == {"gemv_s": 1.0, "gemm_s": 2.0, "dequant_cublas_s": 10.5}
    assert path.priced["m=4096"] == {"gemv_s": None, "gemm_s": 2.0, "dequant_cublas_s": 1.5}
    # Oracle: the cheapest candidate at each M from the price table (GEMV, then GEMM on ties) is the kernel the op
    # runs with these crossovers.
    x = torch.randn(1000, 3)
    for m in range(1, 1000, 7):
        prices = {"gemv": gemv_price(m) if m <= GEMV_MAX_M else float("inf"), "gemm": gemm_price(m),
                  "dense": dense_price(m)}
        best = min(prices, key=lambda p: (prices[p], ["gemv", "gemm", "dense"].index(p)))
        ran = run_by_rows("t", x[:m], 1, path.gemv_max_m, path.dense_min_m,
                          *(lambda x2d, code=code: torch.full((x2d.shape[0], 1), code) for code in (0.0, 1.0, 2.0)))
        assert ["gemv", "gemm", "dense"][int(ran[0, 0])] == best, m


def test_without_the_dense_path():
    path = choose_kernel_path(StubCostModel(), N, K, torch.bfloat16, WEIGHT_BYTES, dense=False)
    assert (path.gemv_max_m, path.dense_min_m) == (6, DENSE_OFF)
    assert set(path.priced) == {"m=1", "m=4"}  # stops once the GEMV lost: nothing left to decide
    assert "dequant_cublas_s" not in path.priced["m=1"]


def test_engines_from_the_cost_model():
    # Memory bound (H100, a 4096 x 4096 int4 layer): GEMV and GEMM both stream the packed weight once and tie up to
    # the GEMV's 16 rows; writing a dense copy never pays.
    q = formats.quantize_int4_rtn(torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)), 128)
    packed = float(sum(t.numel() * t.element_size() for t in q))
    h100 = choose_kernel_path(CostModel(HARDWARE["h100-sxm"]), 4096, 4096, torch.bfloat16, packed)
    assert (h100.gemv_max_m, h100.dense_min_m) == (GEMV_MAX_M, DENSE_OFF)
    # Compute bound (memory for free): the GEMV's FMAs at M = 1 (CUDA-core peak, 1 TFLOP/s) lose to the GEMM on
    # tensor cores (100 TFLOP/s), so the GEMV never runs.
    fast_memory = Hardware("fast-memory", "cuda", 1e18, {"float32": 1e12, "bfloat16": 1e14}, 1 << 20, 0.0)
    path = choose_kernel_path(CostModel(fast_memory), 4096, 4096, torch.bfloat16, packed)
    assert path.gemv_max_m == 0
    assert path.priced["m=1"]["gemv_s"] > 50 * path.priced["m=1"]["gemm_s"]
    assert choose_gemv_max_m(CostModel(fast_memory), 4096, 4096, torch.bfloat16)[0] == 0
    # Without a cost model: the GEMV up to its capacity, never the dense path.
    assert (choose_kernel_path(None, N, K, torch.float32, 1.0).gemv_max_m,
            choose_kernel_path(None, N, K, torch.float32, 1.0).dense_min_m) == (GEMV_MAX_M, DENSE_OFF)
