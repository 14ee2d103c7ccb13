"""Tests for AWQ experts in llmcompress/kernels/moe_experts.py (`moe_experts_w4a16` with act_gate_up / act_down):
the GEMV and GEMM paths against a float64 oracle (uneven routed counts, an expert without tokens, one token, two
dtypes), the reference against the grouped path's ops (`grouped_linear_w4a16` with act_scale), the op on the CPU,
its cost and bad scales."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmcompress.kernels.grouped_linear as gl
import llmcompress.kernels.moe_experts as mx
import llmcompress.kernels.moe_route as mr
from llmcompress.testing.devices import DEVICE, needs_triton
from llmcompress.testing.numerics import path_tokens, uneven_router_logits

OP = torch.ops.llmcompress.moe_experts_w4a16.default



def _awq_experts(e, h, i, group_size, seed=0):
    """Random experts quantized round to nearest after AWQ's column scaling W·s, with the 1/s (float32 (E, H) and
    (E, I), in [0.25, 4): far from 1, so a scale applied to the wrong expert or left out changes the output)."""
    from llmcompress.formats.quantized import quantize_int4_rtn

    g = torch.Generator().manual_seed(seed)
    w_gate_up = torch.randn(e, 2 * i, h, generator=g) * (2 / h) ** 0.5
    w_down = torch.randn(e, h, i, generator=g) * (2 / i) ** 0.5
    s_gu = 4 ** (2 * torch.rand(e, h, generator=g) - 1)
    s_d = 4 ** (2 * torch.rand(e, i, generator=g) - 1)
    gu = [quantize_int4_rtn(w * s[None, :], group_size) for w, s in zip(w_gate_up, s_gu)]
    dn = [quantize_int4_rtn(w * s[None, :], group_size) for w, s in zip(w_down, s_d)]
    stored = [torch.stack(t).to(DEVICE) for t in zip(*gu)] + [torch.stack(t).to(DEVICE) for t in zip(*dn)]
    return stored, (1 / s_gu).to(DEVICE), (1 / s_d).to(DEVICE)


# (T, E, k, H, I, group_size, block_m): T never a multiple of block_m; H = 96 not a multiple of the GPU GEMV's
# BLOCK_K = 64; expert 0 gets no token.
CASES = [(1, 4, 2, 96, 64, 32, 16), (9, 6, 2, 128, 96, 32, 16), (21, 5, 3, 96, 64, 32, 32)]
# fp16 / bf16: one rounding of h and of y, and the GEMM rounds x·(1/s) and the dequantized tile to x's dtype; atol
# is a fraction of the largest output (these experts' outputs reach ~12-33; bf16's ulp there is 0.06-0.25, and the
# bf16 GEMM measured 0.30 at most, 2.3 % of the output's norm, float experts' GEMM 1.1 %).
DTYPE_TOLS = [(torch.float16, 1e-3, 4e-3), (torch.bfloat16, 3e-2, 2e-2)]


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=["fp16", "bf16"])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("t,e,k,h,i,group_size,block_m", CASES)
def test_awq_paths_equal_float64_oracle(t, e, k, h, i, group_size, block_m, path, dtype, atol, rtol):
    t = path_tokens(t, path)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(dtype).to(DEVICE)
    stored, a_gu, a_d = _awq_experts(e, h, i, group_size, seed=e)
    routing = mr.moe_route_reference(uneven_router_logits(t, e, seed=h).to(DEVICE), k, "softmax", True, block_m)
    assert 0 not in routing[1].tolist()
    got = mx.moe_experts_w4a16_triton(x, *stored, group_size, *routing, block_m, t if path == "gemv" else 0, a_gu,
                                      a_d)
    want = mx.moe_experts_w4a16_reference(x, *stored, group_size, routing[0], routing[1], act_gate_up=a_gu,
                                          act_down=a_d, compute_dtype=torch.float64)
    assert got.dtype == dtype and got.shape == (t, h)
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(), rtol=rtol)


def test_awq_reference_is_the_grouped_path():
    """The fused reference with AWQ scales computes what the grouped path's ops do on the same tensors: expert-sorted
    rows through `grouped_linear_w4a16` with act_scale, SiLU·up, the down projection with its act_scale, weighted
    and summed per token (float32: only sum order differs)."""
    from llmcompress.passes.quantize.experts import expert_sorted

    t, e, k, h, i, g = 13, 5, 2, 64, 32, 32
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1))
    stored, a_gu, a_d = (s.cpu() if torch.is_tensor(s) else [v.cpu() for v in s] for s in _awq_experts(e, h, i, g))
    weights, ids, *_ = mr.moe_route_reference(uneven_router_logits(t, e), k)
    rows, offs = expert_sorted(x, ids, e)
    gu = gl.grouped_linear_w4a16_reference(rows, *stored[:3], g, offs, a_gu)
    hid = F.silu(gu[:, :i]) * gu[:, i:]
    y = gl.grouped_linear_w4a16_reference(hid, *stored[3:], g, offs, a_d)
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    want = torch.zeros(t, h).index_add_(0, order // k, y * weights.reshape(-1)[order][:, None])
    got = mx.moe_experts_w4a16_reference(x, *stored, g, weights, ids, act_gate_up=a_gu, act_down=a_d)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_awq_op_on_cpu_and_its_cost():
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmcompress.cost.hardware import HARDWARE
    from llmcompress.cost.roofline import CostModel

    t, e, k, h, i, g = 3, 8, 2, 64, 32, 32
    stored, a_gu, a_d = _awq_experts(e, h, i, g)
    stored, a_gu, a_d = [s.cpu() for s in stored], a_gu.cpu(), a_d.cpu()
    x, logits = torch.randn(t, h).half(), torch.randn(t, e)

    def block(x, logits, *tensors, acts=True):
        routing = torch.ops.llmcompress.moe_route(logits, k, "softmax", True, 16)
        return OP(x, *tensors[:6], g, *routing, 16, 0, *(tensors[6:] if acts else ()))

    want = mx.moe_experts_w4a16_reference(x, *stored, g, *mr.moe_route_reference(logits, k)[:2], act_gate_up=a_gu,
                                          act_down=a_d)
    torch.testing.assert_close(block(x, logits, *stored, a_gu, a_d), want, rtol=0, atol=0)
    assert not torch.equal(block(x, logits, *stored, acts=False), want)
    model = CostModel(HARDWARE["h100-sxm"])
    costs = []
    for acts in (True, False):
        gm = make_fx(lambda *a, acts=acts: block(*a, acts=acts), tracing_mode="fake")(x, logits, *stored, a_gu, a_d)
        costs.append(model.node_cost(next(n for n in gm.graph.nodes if n.target is OP)))
    hit = e * (1 - (1 - k / e) ** t)
    # The scales are read with their expert: 4 bytes per H and per I of each expected hit expert.
    assert float(costs[0].bytes - costs[1].bytes) == pytest.approx(hit * 4 * (h + i))


@pytest.mark.parametrize("which,value,match", [
    (0, torch.ones(8, 63), r"act_gate_up \(AWQ's per-expert 1/s\) must be float32 \(8, 64\)"),
    (1, torch.ones(8, 32, dtype=torch.float16), r"act_down \(AWQ's per-expert 1/s\) must be float32 \(8, 32\)"),
])
def test_bad_awq_scales(which, value, match):
    t, e, k, h, i, g = 3, 8, 2, 64, 32, 32
    stored, a_gu, a_d = _awq_experts(e, h, i, g)
    acts = [a_gu.cpu(), a_d.cpu()]
    acts[which] = value
    routing = torch.ops.llmcompress.moe_route(torch.randn(t, e), k, "softmax", True, 16)
    with pytest.raises(ValueError, match=match):
        OP(torch.randn(t, h).half(), *[s.cpu() for s in stored], g, *routing, 16, 0, *acts)
