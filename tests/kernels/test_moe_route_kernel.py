"""Tests for llmcompress/kernels/moe_route.py: the top-k and align kernels against the reference (ids and layout
exactly, weights to fp32 rounding), the reference against the eager models' routing and the layout's invariants,
the op on CPU and under tracing, its cost and bad inputs."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels.moe_route as mr  # registers the op
from llmcompress.testing.devices import DEVICE, needs_triton

OP = torch.ops.llmcompress.moe_route.default


def _logits(t, e, dtype, seed=0, ties=True):
    """Random logits; with `ties`, rows whose experts share a value (all equal, a pair at the top, a pair at the
    k-th place) so the lowest-index rule is exercised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g)
    if ties and t >= 3:
        x[0, :] = 0.5
        x[1, 1] = x[1, 3] = x[1].max() + 1
        x[2, :] = torch.arange(e, dtype=torch.float32).flip(0) / e
        x[2, 2] = x[2, 1]
    return x.to(dtype).to(DEVICE)


def _check_layout(ids, sorted_ids, block_expert, num_padded, e, block_m):
    """What moe_experts relies on, checked from first principles (not against the reference)."""
    t, k = ids.shape
    n = t * k
    flat = ids.reshape(-1).cpu().long()
    sorted_ids, block_expert = sorted_ids.cpu().long(), block_expert.cpu().long()
    total = int(num_padded.item())
    counts = torch.bincount(flat, minlength=e)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.shape[0] == n + e * (block_m - 1) and total % block_m == 0
    used = sorted_ids[:total]
    real = used[used < n]
    assert sorted(real.tolist()) == list(range(n))  # every slot exactly once
    assert (sorted_ids[total:] == n).all() and (used <= n).all()  # only the sentinel besides
    for b in range(block_expert.shape[0]):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        if b * block_m >= total:
            assert block_expert[b] == -1
            continue
        slots = rows[rows < n]
        assert slots.numel() > 0 and (flat[slots] == block_expert[b]).all()
        assert (slots.diff() > 0).all()  # slot order within an expert
    assert (block_expert[: total // block_m].diff() > 0).all()  # experts in order, each run contiguous


CASES = [  # (T, E, k, scoring, norm, block_m)
    (1, 8, 2, "softmax", True, 16),  # one token
    (7, 8, 2, "softmax", True, 16),  # Mixtral
    (5, 6, 6, "softmax", False, 16),  # top_k = E
    (19, 64, 8, "softmax", False, 32),  # OLMoE: 64 experts, most get no token
    (13, 60, 4, "softmax", True, 64),  # Qwen2-MoE's 60 experts (not a power of two)
    (11, 16, 3, "sigmoid", True, 16),
    (9, 5, 2, "sigmoid", False, 128),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,e,k,scoring,norm,block_m", CASES)
def test_kernels_equal_reference(t, e, k, scoring, norm, block_m, dtype):
    logits = _logits(t, e, dtype, seed=t + e)
    got = mr.moe_route_triton(logits, k, scoring, norm, block_m)
    want = mr.moe_route_reference(logits, k, scoring, norm, block_m)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a, b)
    _check_layout(*got[1:], e, block_m)


def test_lowest_index_wins_ties():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    w, ids, *_ = mr.moe_route_reference(logits, 2, "softmax", True, 16)
    assert ids.tolist() == [[1, 3], [0, 1]]
    torch.testing.assert_close(w, torch.full((2, 2), 0.5))


def _eager_routing(logits, k, norm):
    """Mixtral / Qwen2-MoE / OLMoE routing: float32 softmax, torch.topk, optional renormalisation."""
    top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    return (top / top.sum(-1, keepdim=True) if norm else top), idx


@pytest.mark.parametrize("norm", [True, False])
def test_reference_equals_eager_routing(norm):
    """float32 logits (no ties): the same ids in the same order, weights to fp32 rounding."""
    logits = _logits(64, 8, torch.float32, seed=3, ties=False).cpu()
    top, idx = _eager_routing(logits, 2, norm)
    w, ids, *_ = mr.moe_route_reference(logits, 2, "softmax", norm, 16)
    assert torch.equal(ids.long(), idx)
    torch.testing.assert_close(w, top, rtol=1e-6, atol=1e-7)


def test_bfloat16_ties_differ_from_eager_only_in_order():
    """bfloat16 logits tie often (8 mantissa bits): torch.topk orders tied experts its own way, we take the lowest
    index first. Where no tie reaches past the k-th place, the chosen experts and weights are the eager model's
    (as sets: the experts' sum does not depend on the order)."""
    logits = _logits(512, 8, torch.bfloat16, seed=3, ties=False).cpu()
    top, idx = _eager_routing(logits, 2, True)
    w, ids, *_ = mr.moe_route_reference(logits, 2, "softmax", True, 16)
    ranked = logits.float().sort(dim=-1, descending=True).values
    straddles = ranked[:, 1] == ranked[:, 2]  # a tie across the k-th place: which expert is kept is a choice
    same_order = (ids.long() == idx).all(-1)
    assert (~same_order).any()  # the seed has tied rows
    keep = ~straddles
    assert torch.equal(ids.long()[keep].sort(-1).values, idx[keep].sort(-1).values)
    torch.testing.assert_close(w[keep].sort(-1).values, top[keep].sort(-1).values, rtol=1e-6, atol=1e-7)


def test_expert_without_tokens_and_uneven_counts():
    logits = torch.full((10, 6), -5.0)
    logits[:, 0] = 3.0  # every token: expert 0 first
    logits[:7, 2] = 2.0  # 7 tokens to expert 2, 3 to expert 5; experts 1, 3, 4 get none
    logits[7:, 5] = 2.0
    _, ids, sorted_ids, block_expert, num_padded = mr.moe_route_reference(logits, 2, "softmax", True, 16)
    assert num_padded.item() == 48 and block_expert[:4].tolist() == [0, 2, 5, -1]
    _check_layout(ids, sorted_ids, block_expert, num_padded, 6, 16)


def test_align_reference_leaves_out_of_range_ids_unrouted():
    ids = torch.tensor([[0, 4], [-1, 0], [1, 2]], dtype=torch.int32)  # E = 4: 4 and -1 are dropped slots
    sorted_ids, block_expert, num_padded = mr.moe_align_reference(ids, 4, 16)
    assert num_padded.item() == 48 and block_expert[:3].tolist() == [0, 1, 2]
    assert sorted_ids[:2].tolist() == [0, 3] and sorted_ids[16].item() == 4 and sorted_ids[32].item() == 5
    assert set(sorted_ids.tolist()) == {0, 3, 4, 5, 6}


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (19, 64, 8, 32), (5, 6, 6, 128)])
def test_host_align_equals_reference(t, e, k, block_m):
    """The CPU path's layout (Python lists on the host) against the traceable reference, ids out of range too."""
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(-1, e + 1, (t, k), generator=g, dtype=torch.int32)
    for a, b in zip(mr.moe_align_host(ids, e, block_m), mr.moe_align_reference(ids, e, block_m)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_op_on_cpu_and_traced():
    logits = _logits(6, 8, torch.float32, ties=False).cpu()
    want = mr.moe_route_reference(logits, 2, "softmax", True, 16)
    for a, b in zip(OP(logits, 2, "softmax", True, 16), want):
        assert torch.equal(a, b)
    fn = torch.compile(lambda x: OP(x, 2, "softmax", True, 16), backend="aot_eager", fullgraph=True)
    for a, b in zip(fn(logits), want):
        assert torch.equal(a, b)
    meta = OP(logits.to("meta"), 2, "softmax", True, 32)
    assert [tuple(m.shape) for m in meta] == [(6, 2), (6, 2), (12 + 8 * 31,), (9,), (1,)]


def test_cost_is_registered():
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmcompress.cost.hardware import HARDWARE
    from llmcompress.cost.roofline import CostModel

    gm = make_fx(lambda x: OP(x, 2, "softmax", True, 16), tracing_mode="fake")(torch.randn(4, 8))
    node = next(n for n in gm.graph.nodes if n.target is OP)
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(node)
    assert cost.kind == "custom" and float(cost.flops) == 4 * 32
    # logits 4·8·4, weights and ids 2·4·2·4, sorted ids (8 + 8·15)·4, 8 block experts ·4, num_padded 4.
    assert float(cost.bytes) == 128 + 64 + 128 * 4 + 32 + 4


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 0}, "top_k must be an int in"),
    ({"top_k": 9}, "top_k must be an int in"),
    ({"scoring": "softplus"}, "scoring must be one of"),
    ({"block_m": 24}, "block_m must be one of"),
])
def test_bad_options(kwargs, match):
    args = {"top_k": 2, "scoring": "softmax", "norm_topk_prob": True, "block_m": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        OP(torch.randn(3, 8), args["top_k"], args["scoring"], args["norm_topk_prob"], args["block_m"])


def test_bad_logits():
    with pytest.raises(ValueError, match=r"router_logits must be \(T, E\)"):
        OP(torch.randn(2, 3, 8), 2)
    with pytest.raises(ValueError, match="router_logits must be float16, bfloat16 or float32"):
        OP(torch.randn(3, 8).double(), 2)
