"""The low-rank split's kernel choice (`kernels/lowrank_path.py`): whether the split pays against dense at M rows,
and the fused kernel's range, priced by the cost model."""

from __future__ import annotations

import pytest
import torch

from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.kernels.lowrank_path import choose_lowrank_path

H100 = CostModel(HARDWARE["h100-sxm"])
CPU = CostModel(HARDWARE["cpu"])


def test_h100_4096_square_at_rank_1024_pays_at_decode():
    """Memory-bound at M = 1 and 16: the factors are r(K + N) / NK = 1/2 of the dense bytes."""
    path = choose_lowrank_path(H100, 4096, 4096, 1024, torch.bfloat16, "cuda")
    assert path.fused_max_m == 16 and path.kernel_at(1) == path.kernel_at(16) == "fused"
    assert path.kernel_at(17) == "two-linears"
    assert path.pays_at(1) and path.pays_at(16)
    for m in ("m=1", "m=16"):
        p = path.priced[m]
        assert p["fused_s"] <= p["two_linears_s"] < p["dense_s"]
    assert path.priced["m=256"]["fused_s"] is None  # past the fused kernel's 16 rows


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("m", [4096, 8192])
def test_large_m_pays_iff_fewer_flops(n, k, m):
    """Compute-bound: the split does 2·M·r·(K + N) FLOPs against dense's 2·M·N·K, so it pays below the break-even
    rank NK / (N + K) (10 % margin either side for the launches and the t round trip) and not above."""
    even = n * k / (n + k)
    assert choose_lowrank_path(H100, n, k, int(0.9 * even), torch.bfloat16, "cuda").pays_at(m)
    assert not choose_lowrank_path(H100, n, k, int(1.1 * even), torch.bfloat16, "cuda").pays_at(m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_prices_two_matmuls(dtype):
    """On a CPU the op is F.linear twice in x's dtype: each priced as its own matmul; no fused kernel."""
    n, k, r, e = 4096, 4096, 1024, torch.empty((), dtype=dtype).element_size()
    path = choose_lowrank_path(CPU, n, k, r, dtype, "cpu")
    assert path.fused_max_m == 0 and path.kernel_at(1) == "two-linears"
    for m in (1, 256):
        p = path.priced[f"m={m}"]
        want = CPU.kernel_time(2.0 * m * r * k, (r * k + m * k + m * r) * e, dtype, rows=m) + \
            CPU.kernel_time(2.0 * m * r * n, (n * r + m * r + m * n) * e, dtype, rows=m)
        assert p["fused_s"] is None and p["two_linears_s"] == pytest.approx(want)
        assert p["dense_s"] == pytest.approx(CPU.kernel_time(2.0 * m * n * k, (n * k + m * k + m * n) * e, dtype,
                                                             rows=m))
    assert path.pays_at(1) and path.pays_at(4096)
    assert not choose_lowrank_path(CPU, n, k, 2100, dtype, "cpu").pays_at(1)  # more bytes than dense


class Stub:
    """The fused kernel (two launches, no rows) costs 1 up to 4 padded rows and 9 above; the linears 2 each."""

    def kernel_time(self, flops, nbytes, dtype, *, tensor_cores=True, rows=None, launches=1):
        if rows is None:
            return 1.0 if not tensor_cores else 9.0
        return 2.0 if flops < 2.0 * rows * 64 * 64 else 3.0


def test_fused_range_ends_where_two_linears_win():
    path = choose_lowrank_path(Stub(), 64, 64, 8, torch.float16, "cuda")
    assert path.fused_max_m == 4 and path.kernel_at(4) == "fused" and path.kernel_at(5) == "two-linears"
    assert path.times(1) == {"fused": 1.0, "two-linears": 4.0, "dense": 3.0} and path.pays_at(1)
    assert not path.pays_at(5)  # 2 + 2 linears against one dense at 3


def test_without_cost_model_nothing_pays():
    path = choose_lowrank_path(None, 64, 64, 8, torch.float16, "cuda")
    assert path.fused_max_m == 16 and not path.pays_at(1) and path.priced == {}


@pytest.mark.parametrize("args,match", [
    ((64, 64, 64, torch.float16, "cuda"), r"r must be in \[1, min\(N, K\)\) = \[1, 64\), got 64"),
    ((64, 32, 0, torch.float16, "cuda"), r"= \[1, 32\), got 0"),
    ((64, 64, 8, torch.int8, "cuda"), "dtype must be one of"),
    ((64, 64, 8, torch.float16, "meta"), "device must be cuda or cpu, got meta"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        choose_lowrank_path(H100, *args)
