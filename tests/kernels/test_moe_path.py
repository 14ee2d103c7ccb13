"""The MoE experts' path choice (`kernels/moe_path.py`): GEMV per slot or grouped GEMM per T, and the GEMM's
block_m, priced by the cost model from the expected experts hit."""

from __future__ import annotations

import pytest
import torch

from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.kernels.moe_path import choose_moe_path, expert_bytes
from llmcompress.kernels.moe_route import BLOCK_MS

H100 = CostModel(HARDWARE["h100-sxm"])


def test_mixtral_8x7b_on_h100():
    path = choose_moe_path(H100, 4096, 14336, 8, 2, torch.bfloat16, "cuda")
    # One token reads two experts either way; the GEMV saves the GEMM's third launch (the sum over k).
    assert path.path_at(1) == "gemv" and path.gemv_max_tokens >= 1
    # 16 tokens hit ~7.9 of 8 experts: the GEMM reads each once, the GEMV once per slot (32 reads).
    assert path.path_at(16) == "gemm" and path.path_at(512) == "gemm"
    p = path.priced
    assert p["t=16"]["gemm_s"] < 0.5 * p["t=16"]["gemv_s"]
    # Decode is memory-bound at two experts' bytes: 2 · 3 · 4096 · 14336 · 2 B / 3.35 TB/s = 210 us + launches.
    assert 2.1e-4 < p["t=1"]["gemv_s"] < 2.3e-4
    assert path.block_m in BLOCK_MS


def test_int4_experts_read_a_quarter_of_the_bytes():
    bf16 = choose_moe_path(H100, 4096, 14336, 8, 2, torch.bfloat16, "cuda")
    int4 = choose_moe_path(H100, 4096, 14336, 8, 2, torch.bfloat16, "cuda", group_size=128)
    assert expert_bytes(4096, 14336, torch.bfloat16, 128) == 3 * 4096 * 14336 * (0.5 + 4 / 128)
    # Decode is memory-bound: 0.266 of the bf16 bytes, plus the same launch overhead.
    assert int4.path_at(1) == "gemv" and int4.priced["t=1"]["gemv_s"] < 0.35 * bf16.priced["t=1"]["gemv_s"]


def test_olmoe_prefers_large_blocks_at_prefill():
    path = choose_moe_path(H100, 2048, 1024, 64, 8, torch.bfloat16, "cuda")
    assert path.path_at(4096) == "gemm" and path.block_m >= 64


def test_cpu_runs_the_reference():
    path = choose_moe_path(CostModel(HARDWARE["cpu"]), 384, 256, 8, 2, torch.float32, "cpu")
    assert path.path_at(1) == "reference" and path.path_at(4096) == "reference" and path.gemv_max_tokens == 0
    assert all(p["gemv_s"] is None and p["reference_s"] > 0 for p in path.priced.values())


def test_without_cost_model_the_gemm_everywhere():
    path = choose_moe_path(None, 64, 32, 8, 2, torch.float16, "cuda")
    assert path.gemv_max_tokens == 0 and path.block_m == 16 and path.path_at(1) == "gemm"


class Stub:
    """The GEMV costs its bytes / 1000; the GEMM a flat 5.0 plus 1.0 per 16 padded rows of one expert."""

    def kernel_time(self, flops, nbytes, dtype, *, tensor_cores=True, rows=None, launches=1, bandwidth=None):
        if not tensor_cores:
            return nbytes / 1e3
        return 5.0 + rows / 16


def test_the_cheaper_path_wins_at_each_t():
    path = choose_moe_path(Stub(), 10, 10, 8, 2, torch.float16, "cuda")
    # GEMV: T · 2 slots · 600 B of weights + 136 B of activations per T = 1.336·T; the GEMM at small T: one block
    # of 16 rows per expert, 6.0. 1.336 · 4 <= 6 < 1.336 · 5.
    assert path.gemv_max_tokens == 4 and path.path_at(4) == "gemv" and path.path_at(5) == "gemm"
    # block_m 16 pads least at every T: 128 would cost 8x the rows at T = 5.
    assert path.block_m == 16
    assert path.priced["t=1"] == {"gemv_s": pytest.approx(1.336), "gemm_s": 6.0, "reference_s": None}


@pytest.mark.parametrize("args,match", [
    ((64, 32, 8, 9, torch.float16, "cuda"), "1 <= top_k <= num_experts"),
    ((64, 32, 8, 2, torch.float64, "cuda"), "dtype must be one of"),
    ((64, 32, 8, 2, torch.float16, "meta"), "device must be cuda or cpu"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        choose_moe_path(H100, *args)
