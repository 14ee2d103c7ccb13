"""Tests for llmcompress/kernels/moe_experts.py: the GEMV and GEMM paths against a float64 oracle (uneven routed
counts, experts without tokens, one token, odd H and I, three dtypes, transposed weight storage, dropped slots),
route + experts against transformers' MixtralSparseMoeBlock, the op on CPU and traced, its cost and bad inputs."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels.moe_experts as mx  # registers the ops
import llmcompress.kernels.moe_route as mr
from llmcompress.testing.devices import DEVICE, needs_triton
from llmcompress.testing.numerics import path_tokens, uneven_router_logits

OP = torch.ops.llmcompress.moe_experts.default
# Outputs O(1): fp32 differs from float64 by fp32 sums; fp16 / bf16 by one rounding of h and of y (bf16 ~8e-3 per
# ulp at 1, and the interpreter truncates bf16 casts).
DTYPE_TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 2e-2)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _experts(e, h, i, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_gate_up = torch.randn(e, 2 * i, h, generator=g) * (2 / h) ** 0.5
    w_down = torch.randn(e, h, i, generator=g) * (2 / i) ** 0.5
    return w_gate_up.to(dtype).to(DEVICE), w_down.to(dtype).to(DEVICE)


def _routing(logits, k, block_m, norm=True):
    return mr.moe_route_reference(logits.to(DEVICE), k, "softmax", norm, block_m)



# (T, E, k, H, I, block_m): H, I never multiples of the interpreter's BLOCK_N = 16 / BLOCK_K = 32.
CASES = [
    (1, 4, 2, 40, 24, 16),  # one token
    (9, 6, 2, 33, 20, 16),  # uneven counts, expert 0 without tokens, 2 blocks for expert 1
    (21, 5, 3, 47, 36, 32),
    (6, 4, 4, 24, 18, 16),  # top_k = E
]


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("t,e,k,h,i,block_m", CASES)
def test_paths_equal_float64_oracle(t, e, k, h, i, block_m, path, dtype, atol, rtol):
    t = path_tokens(t, path)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(dtype).to(DEVICE)
    w_gate_up, w_down = _experts(e, h, i, dtype, seed=e)
    routing = _routing(uneven_router_logits(t, e, seed=h), k, block_m)
    assert k == e or 0 not in routing[1].tolist()
    got = mx.moe_experts_triton(x, w_gate_up, w_down, *routing, block_m, t if path == "gemv" else 0)
    want = mx.moe_experts_reference(x, w_gate_up, w_down, routing[0], routing[1], compute_dtype=torch.float64)
    assert got.dtype == dtype and got.shape == (t, h)
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_transposed_storage_and_dropped_slots(path):
    """Weights stored (E, H, 2I) / (E, I, H), passed as transpose views; slots with an id outside [0, E) add
    nothing (the reference's align leaves them out of the blocks)."""
    t, e, k, h, i = 5, 4, 2, 40, 24
    x = torch.randn(t, h).to(DEVICE)
    w_gate_up, w_down = _experts(e, h, i, torch.float32)
    w_gu_t = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    w_d_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    weights, ids, *_ = _routing(torch.randn(t, e), k, 16)
    ids = ids.clone()
    ids[1, 1] = e
    ids[3, 0] = -1
    layout = mr.moe_align_reference(ids, e, 16)
    got = mx.moe_experts_triton(x, w_gu_t, w_d_t, weights, ids, *layout, 16, t if path == "gemv" else 0)
    want = mx.moe_experts_reference(x, w_gate_up, w_down, weights, ids, compute_dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    kept = ids.clone()
    kept[1, 1] = kept[3, 0] = 0
    w0 = weights.clone()
    w0[1, 1] = w0[3, 0] = 0.0  # the same as routing those slots with weight 0
    torch.testing.assert_close(want, mx.moe_experts_reference(x, w_gate_up, w_down, w0, kept,
                                                              compute_dtype=torch.float64))


def _mixtral_block(dtype, hidden=48, inter=40, experts=4, k=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                           num_experts_per_tok=k, hidden_act="silu")
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, hidden**-0.5)
        block.experts.down_proj.normal_(0, inter**-0.5)
    return block.to(dtype).to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_route_and_experts_equal_mixtral_block(path, dtype, atol, rtol):
    """The exactness target: transformers' MixtralSparseMoeBlock forward (eager experts) against its router's
    logits through moe_route's kernels and the block's own gate_up_proj / down_proj through moe_experts: the same
    expert ids, outputs equal within rounding."""
    block = _mixtral_block(dtype)
    x = torch.randn(1, 11, 48).to(dtype).to(DEVICE)
    with torch.no_grad():
        want = block(x)
        logits, eager_w, eager_ids = block.gate(x.view(-1, 48))
        routing = mr.moe_route_triton(logits, 2, "softmax", True, 16)
        got = mx.moe_experts_triton(x.view(-1, 48), block.experts.gate_up_proj, block.experts.down_proj, *routing,
                                    16, 11 if path == "gemv" else 0)
    assert torch.equal(routing[1].long(), eager_ids)
    torch.testing.assert_close(routing[0], eager_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.view_as(want), want, atol=atol, rtol=rtol)


def test_op_on_cpu_traced_and_on_meta():
    t, e, k, h, i = 6, 4, 2, 16, 8
    x = torch.randn(t, h)
    w_gate_up, w_down = (w.cpu() for w in _experts(e, h, i, torch.float32))
    logits = torch.randn(t, e)

    def block(x, logits):
        return OP(x, w_gate_up, w_down, *torch.ops.llmcompress.moe_route(logits, k, "softmax", True, 16), 16, 0)

    want = mx.moe_experts_reference(x, w_gate_up, w_down, *mr.moe_route_reference(logits, k)[:2])
    torch.testing.assert_close(block(x, logits), want, rtol=0, atol=0)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, logits), want, rtol=0, atol=0)
    meta = OP(x.to("meta"), w_gate_up.to("meta"), w_down.to("meta"),
              *torch.ops.llmcompress.moe_route(logits.to("meta"), k, "softmax", True, 16), 16, 0)
    assert meta.shape == (t, h) and meta.device.type == "meta"


def test_cost_counts_expected_experts_hit():
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmcompress.cost.hardware import HARDWARE
    from llmcompress.cost.roofline import CostModel

    e, k, h, i = 8, 2, 64, 32

    def block(x, logits, w_gu, w_d):
        return OP(x, w_gu, w_d, *torch.ops.llmcompress.moe_route(logits, k, "softmax", True, 16), 16, 0)

    model = CostModel(HARDWARE["h100-sxm"])
    per_expert = 3 * h * i * 2
    for t in (1, 4, 64):
        args = (torch.randn(t, h).bfloat16(), torch.randn(t, e), torch.randn(e, 2 * i, h).bfloat16(),
                torch.randn(e, h, i).bfloat16())
        gm = make_fx(block, tracing_mode="fake")(*args)
        cost = model.node_cost(next(n for n in gm.graph.nodes if n.target is OP))
        hit = e * (1 - (1 - k / e) ** t)
        assert float(cost.flops) == 6 * t * k * h * i
        acts = 2 * t * h * 2 + 2 * t * k * i * 2 + t * k * 8
        assert float(cost.bytes) == pytest.approx(hit * per_expert + acts)
    assert mx.expected_experts_hit(8, 2, 1) == pytest.approx(2) and mx.expected_experts_hit(64, 8, 1000) == \
        pytest.approx(64)


def _args(t=3, e=4, k=2, h=16, i=8, dtype=torch.float32):
    x = torch.randn(t, h, dtype=dtype)
    w_gate_up, w_down = (w.cpu() for w in _experts(e, h, i, dtype))
    return [x, w_gate_up, w_down, *mr.moe_route_reference(torch.randn(t, e), k, "softmax", True, 16), 16, 0]


@pytest.mark.parametrize("index,value,match", [
    (0, torch.randn(3, 16).double(), "x must be float16, bfloat16 or float32"),
    (1, torch.randn(4, 15, 16), r"w_gate_up must be \(E, 2 \* I, H=16\)"),
    (1, torch.randn(4, 16, 16).half(), r"w_gate_up must be .* in x's dtype"),
    (2, torch.randn(4, 8, 16), r"w_down must be \(E, H, I\) = \(4, 16, 8\)"),
    (3, torch.rand(3, 2).double(), "topk_weights must be float32"),
    (4, torch.zeros(3, 2, dtype=torch.int64), "topk_ids must be int32"),
    (5, torch.zeros(10, dtype=torch.int32), r"sorted_ids must be int32 \(66,\)"),
    (8, 48, "block_m must be one of"),
    (9, -1, "gemv_max_tokens must be an int >= 0"),
])
def test_bad_inputs(index, value, match):
    args = _args()
    args[index] = value
    with pytest.raises(ValueError, match=match):
        OP(*args)


def _int4_experts(e, h, i, group_size, seed=0):
    """Random float experts quantized round-to-nearest (`formats.quantized`), stacked per expert."""
    from llmcompress.formats.quantized import quantize_int4_rtn

    w_gate_up, w_down = _experts(e, h, i, torch.float32, seed)
    gu = [quantize_int4_rtn(w.cpu(), group_size) for w in w_gate_up]
    dn = [quantize_int4_rtn(w.cpu(), group_size) for w in w_down]
    return [torch.stack(t).to(DEVICE) for t in zip(*gu)] + [torch.stack(t).to(DEVICE) for t in zip(*dn)]


# (T, E, k, H, I, group_size, block_m): H and I multiples of the group; several groups per K step and per row.
W4_CASES = [(1, 4, 2, 96, 64, 32, 16), (9, 6, 2, 128, 96, 32, 16), (21, 5, 3, 128, 64, 64, 32)]


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("t,e,k,h,i,group_size,block_m", W4_CASES)
def test_w4a16_paths_equal_float64_oracle(t, e, k, h, i, group_size, block_m, path, dtype, atol, rtol):
    t = path_tokens(t, path)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(dtype).to(DEVICE)
    stored = _int4_experts(e, h, i, group_size, seed=e)
    routing = _routing(uneven_router_logits(t, e, seed=h), k, block_m)
    got = mx.moe_experts_w4a16_triton(x, *stored, group_size, *routing, block_m, t if path == "gemv" else 0)
    want = mx.moe_experts_w4a16_reference(x, *stored, group_size, routing[0], routing[1], compute_dtype=torch.float64)
    assert got.dtype == dtype and got.shape == (t, h)
    # bf16 / fp16: the GEMM multiplies the dequantized tile rounded to x's dtype (as tl.dot takes it).
    torch.testing.assert_close(got.double(), want, atol=atol * 1.5, rtol=rtol)


def test_w4a16_reference_is_the_float_op_on_dequantized_weights():
    from llmcompress.formats.quantized import dequantize_int4

    t, e, k, h, i, g = 7, 4, 2, 64, 32, 32
    x = torch.randn(t, h)
    qgu, sgu, zgu, qd, sd, zd = (s.cpu() for s in _int4_experts(e, h, i, g))
    weights, ids, *_ = mr.moe_route_reference(torch.randn(t, e), k)
    dense_gu = torch.stack([dequantize_int4(qgu[j], sgu[j], zgu[j], g) for j in range(e)])
    dense_d = torch.stack([dequantize_int4(qd[j], sd[j], zd[j], g) for j in range(e)])
    torch.testing.assert_close(mx.moe_experts_w4a16_reference(x, qgu, sgu, zgu, qd, sd, zd, g, weights, ids),
                               mx.moe_experts_reference(x, dense_gu, dense_d, weights, ids), rtol=0, atol=0)


def test_w4a16_op_on_cpu_and_its_cost():
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmcompress.cost.hardware import HARDWARE
    from llmcompress.cost.roofline import CostModel
    from llmcompress.kernels.moe_path import expert_bytes

    t, e, k, h, i, g = 3, 8, 2, 64, 32, 32
    op = torch.ops.llmcompress.moe_experts_w4a16.default
    stored = [s.cpu() for s in _int4_experts(e, h, i, g)]
    x, logits = torch.randn(t, h).half(), torch.randn(t, e)

    def block(x, logits, *stored):
        return op(x, *stored, g, *torch.ops.llmcompress.moe_route(logits, k, "softmax", True, 16), 16, 0)

    want = mx.moe_experts_w4a16_reference(x, *stored, g, *mr.moe_route_reference(logits, k)[:2])
    torch.testing.assert_close(block(x, logits, *stored), want, rtol=0, atol=0)
    gm = make_fx(block, tracing_mode="fake")(x, logits, *stored)
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(next(n for n in gm.graph.nodes if n.target is op))
    hit = e * (1 - (1 - k / e) ** t)
    # int4 codes, fp16 scales and zeros per group of 32: the expected hit experts' stored bytes.
    assert expert_bytes(h, i, torch.float16, g) == 3 * h * i / 2 + 3 * h * i / g * 4
    acts = 2 * t * h * 2 + 2 * t * k * i * 2 + t * k * 8
    assert float(cost.bytes) == pytest.approx(hit * expert_bytes(h, i, torch.float16, g) + acts)


@pytest.mark.parametrize("index,value,match", [
    (1, torch.zeros(4, 16, 16, dtype=torch.uint8), r"qgate_up must be uint8 \(E, 2 \* I, H // 2\)"),
    (2, torch.zeros(4, 16, 2), r"sgate_up must be float16 \(4, 64, 2\)"),
    (4, torch.zeros(4, 64, 8, dtype=torch.uint8), r"qdown must be uint8 \(E, H, I // 2\)"),
    (7, 48, "group_size must be one of"),
    (0, torch.randn(3, 64).double(), "x must be float16, bfloat16 or float32"),
])
def test_w4a16_bad_inputs(index, value, match):
    t, e, k, h, i, g = 3, 4, 2, 64, 32, 32
    args = [torch.randn(t, h).half(), *(s.cpu() for s in _int4_experts(e, h, i, g)), g,
            *mr.moe_route_reference(torch.randn(t, e), k), 16, 0]
    args[index] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.llmcompress.moe_experts_w4a16(*args)
