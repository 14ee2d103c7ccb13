"""Dynamic expert skipping inside `llmcompress::moe_route` (`skip_beta`): the kernels against the reference, the
rule from first principles (slot j dropped ⇔ weight < β × the token's top weight; its id becomes E + its expert's,
its weight kept), skipped slots in no block of the layout, `moe_experts` fed the skipped routing equal to the experts
with those slots' weights zeroed, bad β."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels.moe_experts as mx  # registers the ops
import llmcompress.kernels.moe_route as mr
from llmcompress.testing.devices import DEVICE, needs_triton

OP = torch.ops.llmcompress.moe_route.default


def _logits(t, e, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(t, e, generator=g)).to(dtype).to(DEVICE)


def _check_skipped_layout(ids, sorted_ids, block_expert, num_padded, e, block_m):
    """Exactly the kept slots (id in [0, E)) are in the layout, each once, in its expert's blocks."""
    t, k = ids.shape
    n = t * k
    flat = ids.reshape(-1).cpu().long()
    kept = (flat >= 0) & (flat < e)
    counts = torch.bincount(flat[kept], minlength=e)
    total = int(num_padded.item())
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = sorted_ids.cpu().long()[:total]
    assert sorted(used[used < n].tolist()) == kept.nonzero().flatten().tolist()
    for b in range(total // block_m):
        rows = used[b * block_m:(b + 1) * block_m]
        assert (flat[rows[rows < n]] == int(block_expert[b])).all()


# (T, E, k, scoring, norm, block_m, beta)
CASES = [
    (1, 8, 2, "softmax", True, 16, 0.3),
    (37, 8, 2, "softmax", True, 16, 0.5),  # Mixtral
    (19, 64, 8, "softmax", False, 32, 0.2),  # OLMoE: several slots of a token skipped
    (13, 60, 4, "softmax", True, 64, 0.7),
    (11, 16, 3, "sigmoid", True, 16, 0.9),
    (5, 6, 6, "softmax", False, 16, 0.4),  # top_k = E
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,e,k,scoring,norm,block_m,beta", CASES)
def test_kernels_equal_reference_with_skipping(t, e, k, scoring, norm, block_m, beta, dtype):
    logits = _logits(t, e, dtype, seed=t + e)
    got = mr.moe_route_triton(logits, k, scoring, norm, block_m, beta)
    want = mr.moe_route_reference(logits, k, scoring, norm, block_m, beta)
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    _check_skipped_layout(*got[1:], e, block_m)


@pytest.mark.parametrize("t,e,k,scoring,norm,block_m,beta", CASES)
def test_reference_skips_exactly_below_beta_times_top(t, e, k, scoring, norm, block_m, beta):
    """From first principles, against the unskipped routing: the dropped slots are those under β × the top weight
    (never the top), their id is E + their expert's id, every weight unchanged; the CPU op agrees."""
    logits = _logits(t, e, torch.float32, seed=t * e).cpu()
    w0, ids0, *_ = mr.moe_route_reference(logits, k, scoring, norm, block_m)
    w, ids, *layout = mr.moe_route_reference(logits, k, scoring, norm, block_m, beta)
    skip = w0 < beta * w0[:, :1]
    assert not skip[:, 0].any()
    if t > 1:
        assert skip.any() and (~skip[:, 1:]).any()  # the cases exercise both
    assert torch.equal(ids, torch.where(skip, e + ids0, ids0)) and torch.equal(w, w0)
    _check_skipped_layout(ids, *layout, e, block_m)
    for a, b in zip(OP(logits, k, scoring, norm, block_m, beta), (w, ids, *layout)):
        assert torch.equal(a, b)


def test_beta_zero_is_the_unskipped_routing():
    logits = _logits(23, 8, torch.float32).cpu()
    for a, b in zip(mr.moe_route_reference(logits, 2, "softmax", True, 16, 0.0),
                    mr.moe_route_reference(logits, 2, "softmax", True, 16)):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_experts_read_nothing_for_skipped_slots(path):
    """moe_experts on the skipped routing = the float64 experts with the skipped slots' weights zeroed."""
    t, e, k, h, i, beta = 17, 6, 2, 33, 20, 0.6
    g = torch.Generator().manual_seed(5)
    x = torch.randn(t, h, generator=g).to(DEVICE)
    w_gate_up = (torch.randn(e, 2 * i, h, generator=g) * (2 / h) ** 0.5).to(DEVICE)
    w_down = (torch.randn(e, h, i, generator=g) * (2 / i) ** 0.5).to(DEVICE)
    logits = torch.randn(t, e, generator=g).to(DEVICE)
    routing = mr.moe_route_triton(logits, k, "softmax", True, 16, beta)
    assert (routing[1] >= e).any() and (routing[0][routing[1] >= e] > 0).all()  # skipped, weights kept
    got = mx.moe_experts_triton(x, w_gate_up, w_down, *routing, 16, t if path == "gemv" else 0)
    w0, ids0, *_ = mr.moe_route_reference(logits, k, "softmax", True, 16)
    masked = torch.where(w0 < beta * w0[:, :1], 0.0, w0)
    want = mx.moe_experts_reference(x, w_gate_up, w_down, masked, ids0, compute_dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_traced_with_skipping():
    logits = _logits(6, 8, torch.float32).cpu()
    want = mr.moe_route_reference(logits, 2, "softmax", True, 16, 0.5)
    fn = torch.compile(lambda x: OP(x, 2, "softmax", True, 16, 0.5), backend="aot_eager", fullgraph=True)
    for a, b in zip(fn(logits), want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=r"skip_beta must be a float in \[0, 1\)"):
        OP(torch.randn(3, 8), 2, "softmax", True, 16, beta)
    if beta != 1.5:
        with pytest.raises(ValueError, match=r"skip_beta must be a float in \[0, 1\)"):
            mr.moe_route_triton(torch.randn(3, 8), 2, "softmax", True, 16, beta)
