"""`CostModel.lowered_cost`: nodes priced as a lowering runs them (bytes worked out by hand) and `candidate_cost`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel

aten = torch.ops.aten


def _norm_linear_silu_residual():
    """x (8, 24) -> RMSNorm without weight -> @ w.T (w: 40 x 24) -> silu -> + r (8, 40), all float32."""

    def fn(x, w, r):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return F.silu(h @ w.t()) + r

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(8, 24), torch.randn(40, 24), torch.randn(8, 40))
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def test_eager_runs_a_kernel_per_node_and_fusing_lowerings_fuse_around_the_matmul():
    nodes = _norm_linear_silu_residual()
    assert [n.target for n in nodes] == [aten.pow.Tensor_Scalar, aten.mean.dim, aten.add.Tensor, aten.rsqrt.default,
                                         aten.mul.Tensor, aten.t.default, aten.mm.default, aten.silu.default,
                                         aten.add.Tensor]
    model = CostModel(HARDWARE["h100-sxm"])
    eager = model.lowered_cost(nodes, "eager", {})
    # pow 768 + 768, mean 768 + 32, add 32 + 32, rsqrt 32 + 32, mul 768 + 32 + 768, t free, mm 768 + 3840 + 1280,
    # silu 1280 + 1280, add 3 x 1280.
    assert eager.total("bytes") == 16320
    assert sum(c.kind != "free" for c in eager.nodes) == 8
    for lowering in ("inductor", "triton"):
        fused = model.lowered_cost(nodes, lowering, {})
        # The norm reads x once and writes h once; the matmul alone; silu + add read y and r and write once. The
        # transpose of w alone launches nothing.
        assert sorted(c.bytes for c in fused.nodes) == [768 + 768, 1280 * 3, 768 + 3840 + 1280]
        assert fused.total("time_s") == pytest.approx(
            sum(float(c.time_s) for c in fused.nodes))
        assert fused.total("time_s") < eager.total("time_s")  # five launches and round trips fewer


def test_disconnected_runs_are_separate_kernels_and_candidates_their_own():
    nodes = _norm_linear_silu_residual()
    model = CostModel(HARDWARE["h100-sxm"])
    prologue, epilogue = nodes[:5], nodes[7:]
    both = model.lowered_cost([*prologue, *epilogue], "inductor", {})
    assert sorted(c.bytes for c in both.nodes) == [768 + 768, 1280 * 3]  # not one kernel: the matmul is between
    mode = prologue[-1].meta["val"].fake_mode
    with mode:
        w = torch.empty(40, 24)  # a weight not derived yet
    candidate = model.candidate_cost(aten.linear.default, (prologue[-1], w, None), mode, {})
    assert candidate.kind == "matmul" and candidate.bytes == 768 + 3840 + 1280
    with_candidate = model.lowered_cost([*prologue, candidate], "inductor", {})
    assert sorted(c.bytes for c in with_candidate.nodes) == [768 + 768, 768 + 3840 + 1280]
