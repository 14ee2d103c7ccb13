"""Tests for the int8 experts of llmcompress/kernels/moe_experts.py (`moe_experts_w8a16`) and the int4 experts with
float32 activations: the GEMV and GEMM paths against a float64 oracle (uneven routed counts, an expert with no
tokens, one token, H and I not multiples of the blocks, three dtypes), the reference against the float op on the
dequantized weights, the op on the CPU and traced, its cost (only the experts expected to be hit) and bad inputs."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels.moe_experts as mx  # registers the ops
import llmcompress.kernels.moe_route as mr
from llmcompress.formats.quantized import dequantize_int8, quantize_int4_rtn, quantize_int8_per_channel
from llmcompress.testing.devices import DEVICE, needs_triton
from llmcompress.testing.numerics import path_tokens, uneven_router_logits

OP = torch.ops.llmcompress.moe_experts_w8a16.default
# Outputs O(1). fp32: the dequantized weights are exact in fp32, so fp32 sums only; fp16 / bf16 one rounding of h
# and of y, and (GEMM) the dequantized tile rounded to x's dtype for tl.dot.
DTYPE_TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 6e-3, 4e-3), (torch.bfloat16, 4.5e-2, 2e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _int8_experts(e, h, i, seed=0):
    """Random float experts quantized per output channel (`formats.quantized`), stacked per expert:
    (qgate_up, sgate_up, qdown, sdown)."""
    g = torch.Generator().manual_seed(seed)
    w_gate_up = torch.randn(e, 2 * i, h, generator=g) * (2 / h) ** 0.5
    w_down = torch.randn(e, h, i, generator=g) * (2 / i) ** 0.5
    gu = [quantize_int8_per_channel(w) for w in w_gate_up]
    dn = [quantize_int8_per_channel(w) for w in w_down]
    qgu, sgu = (torch.stack(t) for t in zip(*gu))
    qd, sd = (torch.stack(t) for t in zip(*dn))
    return [t.to(DEVICE) for t in (qgu, sgu, qd, sd)]



# (T, E, k, H, I, block_m): H, I never multiples of the interpreter's BLOCK_N = 16 / BLOCK_K = 32.
CASES = [
    (1, 4, 2, 40, 24, 16),  # one token
    (9, 6, 2, 33, 20, 16),  # uneven counts, expert 0 without tokens, 2 blocks for expert 1
    (21, 5, 3, 47, 36, 32),
]


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("t,e,k,h,i,block_m", CASES)
def test_w8a16_paths_equal_float64_oracle(t, e, k, h, i, block_m, path, dtype, atol, rtol):
    t = path_tokens(t, path)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(dtype).to(DEVICE)
    stored = _int8_experts(e, h, i, seed=e)
    routing = mr.moe_route_reference(uneven_router_logits(t, e, seed=h).to(DEVICE), k, "softmax", True, block_m)
    assert 0 not in routing[1].tolist()
    got = mx.moe_experts_w8a16_triton(x, *stored, *routing, block_m, t if path == "gemv" else 0)
    want = mx.moe_experts_w8a16_reference(x, *stored, routing[0], routing[1], compute_dtype=torch.float64)
    assert got.dtype == dtype and got.shape == (t, h)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_w4a16_float32_activations_equal_float64_oracle(path):
    """int4 experts of a float32 model (quantize-linear's result on it): the kernels take fp32 x."""
    t, e, k, h, i, g, block_m = 9, 6, 2, 128, 96, 32, 16
    gen = torch.Generator().manual_seed(1)
    gu = [quantize_int4_rtn(torch.randn(2 * i, h, generator=gen) * 0.1, g) for _ in range(e)]
    dn = [quantize_int4_rtn(torch.randn(h, i, generator=gen) * 0.1, g) for _ in range(e)]
    stored = [torch.stack(s).to(DEVICE) for s in zip(*gu)] + [torch.stack(s).to(DEVICE) for s in zip(*dn)]
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    routing = mr.moe_route_reference(uneven_router_logits(t, e).to(DEVICE), k, "softmax", True, block_m)
    got = mx.moe_experts_w4a16_triton(x, *stored, g, *routing, block_m, t if path == "gemv" else 0)
    want = mx.moe_experts_w4a16_reference(x, *stored, g, routing[0], routing[1], compute_dtype=torch.float64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_w8a16_reference_is_the_float_op_on_dequantized_weights():
    t, e, k, h, i = 7, 4, 2, 40, 24
    x = torch.randn(t, h)
    qgu, sgu, qd, sd = (s.cpu() for s in _int8_experts(e, h, i))
    weights, ids, *_ = mr.moe_route_reference(torch.randn(t, e), k)
    dense_gu = torch.stack([dequantize_int8(qgu[j], sgu[j]) for j in range(e)])
    dense_d = torch.stack([dequantize_int8(qd[j], sd[j]) for j in range(e)])
    torch.testing.assert_close(mx.moe_experts_w8a16_reference(x, qgu, sgu, qd, sd, weights, ids),
                               mx.moe_experts_reference(x, dense_gu, dense_d, weights, ids), rtol=0, atol=0)
    # and it is not the float op on the unquantized weights' neighbours: a scale changed changes the output
    sgu2 = sgu.clone()
    sgu2[ids[0, 0]] *= 1.5
    assert not torch.equal(mx.moe_experts_w8a16_reference(x, qgu, sgu2, qd, sd, weights, ids),
                           mx.moe_experts_w8a16_reference(x, qgu, sgu, qd, sd, weights, ids))


def test_w8a16_op_on_cpu_and_its_cost():
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmcompress.cost.hardware import HARDWARE
    from llmcompress.cost.roofline import CostModel
    from llmcompress.kernels.moe_path import expert_bytes

    t, e, k, h, i = 3, 8, 2, 64, 32
    stored = [s.cpu() for s in _int8_experts(e, h, i)]
    x, logits = torch.randn(t, h).half(), torch.randn(t, e)

    def block(x, logits, *stored):
        return OP(x, *stored, *torch.ops.llmcompress.moe_route(logits, k, "softmax", True, 16), 16, 0)

    want = mx.moe_experts_w8a16_reference(x, *stored, *mr.moe_route_reference(logits, k)[:2])
    torch.testing.assert_close(block(x, logits, *stored), want, rtol=0, atol=0)
    gm = make_fx(block, tracing_mode="fake")(x, logits, *stored)
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(next(n for n in gm.graph.nodes if n.target is OP))
    hit = e * (1 - (1 - k / e) ** t)
    # int8 codes and one float32 scale per output row: the expected hit experts' stored bytes.
    assert expert_bytes(h, i, torch.float16, scheme="w8a16") == 3 * h * i + (2 * i + h) * 4
    acts = 2 * t * h * 2 + 2 * t * k * i * 2 + t * k * 8
    assert float(cost.bytes) == pytest.approx(hit * expert_bytes(h, i, torch.float16, scheme="w8a16") + acts)
    assert float(cost.flops) == pytest.approx(6 * t * k * h * i)


@pytest.mark.parametrize("index,value,match", [
    (1, torch.zeros(4, 15, 64, dtype=torch.int8), r"qgate_up must be int8 \(E, 2 \* I, H=64\)"),
    (1, torch.zeros(4, 64, 64, dtype=torch.uint8), r"qgate_up must be int8"),
    (2, torch.zeros(4, 64, dtype=torch.float16), r"sgate_up must be float32 \(4, 64\)"),
    (3, torch.zeros(4, 64, 16, dtype=torch.int8), r"qdown must be int8 \(E, H, I\) = \(4, 64, 32\)"),
    (4, torch.zeros(4, 32), r"sdown must be float32 \(4, 64\)"),
    (0, torch.randn(3, 64).double(), "x must be float16, bfloat16 or float32"),
    (10, 48, "block_m must be one of"),
])
def test_w8a16_bad_inputs(index, value, match):
    t, e, k, h, i = 3, 4, 2, 64, 32
    args = [torch.randn(t, h).half(), *(s.cpu() for s in _int8_experts(e, h, i)),
            *mr.moe_route_reference(torch.randn(t, e), k), 16, 0]
    args[index] = value
    with pytest.raises(ValueError, match=match):
        OP(*args)
