"""`llmcompress::moe_skip_compensate`: the Triton kernel and the op against the reference, the reference against a
float64 loop written from the rule (each slot with w < β × the token's top weight adds w × means[id]), uneven
routed counts, an expert no token picked, one token; bad input raises."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels.moe_skip_compensation as msc
from llmcompress.testing.devices import DEVICE, needs_triton

OP = torch.ops.llmcompress.moe_skip_compensate.default


def _inputs(t, k, e, h, dtype, seed=0, unused=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(2 * torch.randn(t, k, generator=g), dim=-1)
    allowed = torch.tensor([x for x in range(e) if x not in unused])
    # Uneven counts: expert ids drawn with weights 1, 2, 3, ... over the allowed experts.
    p = torch.arange(1, len(allowed) + 1, dtype=torch.float)
    ids = allowed[torch.multinomial(p, t * k, replacement=True, generator=g)].view(t, k).to(torch.int32)
    means = torch.randn(e, h, generator=g)
    out = torch.randn(t, h, generator=g).to(dtype)
    return out.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), means.to(DEVICE)


def _loop(out, w, ids, means, beta):
    """float64, slot by slot from the rule."""
    res = out.double().cpu().clone()
    w, ids, means = w.double().cpu(), ids.cpu(), means.double().cpu()
    for t in range(w.shape[0]):
        top = w[t].max()
        for j in range(w.shape[1]):
            if w[t, j] < beta * top:
                res[t] += w[t, j] * means[int(ids[t, j])]
    return res


CASES = [(1, 2, 8, 64), (37, 2, 8, 200), (19, 8, 64, 130), (13, 3, 5, 257)]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,k,e,h", CASES)
@pytest.mark.parametrize("beta", [0.3, 0.8])
def test_reference_equals_the_rule_in_float64(t, k, e, h, dtype, beta):
    out, w, ids, means = _inputs(t, k, e, h, dtype, seed=t + k, unused=(1,))
    got = msc.moe_skip_compensate_reference(out, w, ids, means, beta)
    want = _loop(out, w, ids, means, beta)
    assert got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=atol * 4, rtol=rtol)
    if t > 1:
        assert (want - out.double().cpu()).abs().max() > 1e-2  # something was compensated


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,k,e,h", CASES)
def test_kernel_equals_reference(t, k, e, h, dtype):
    out, w, ids, means = _inputs(t, k, e, h, dtype, seed=3 * t + k, unused=(0, e - 1))
    got = msc.moe_skip_compensate_triton(out, w, ids, means, 0.5)
    want = msc.moe_skip_compensate_reference(out, w, ids, means, 0.5)
    atol, rtol = TOL[dtype]
    # Both accumulate in float32 and round once; the order of the k adds may differ: one ulp of the dtype.
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("t,k,e,h", CASES[1:])
def test_moe_route_encoding_of_skipped_slots_is_the_same_expert(t, k, e, h):
    """moe_route writes a skipped slot's id as E + its expert's: the kernel and the reference read it as that expert,
    so the result equals the float64 rule on the plain ids."""
    out, w, ids, means = _inputs(t, k, e, h, torch.float32, seed=7 * t + k)
    skipped = w < 0.5 * w.amax(-1, keepdim=True)
    assert skipped.any()
    encoded = torch.where(skipped, ids + e, ids)
    want = _loop(out, w, ids, means, 0.5)
    for got in (msc.moe_skip_compensate_triton(out, w, encoded, means, 0.5),
                msc.moe_skip_compensate_reference(out, w, encoded, means, 0.5)):
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_op_on_cpu_is_the_reference_and_takes_int64_ids():
    out, w, ids, means = _inputs(9, 2, 4, 40, torch.float32, seed=5)
    got = OP(out.cpu(), w.cpu(), ids.long().cpu(), means.cpu(), 0.6)
    assert torch.equal(got, msc.moe_skip_compensate_reference(out.cpu(), w.cpu(), ids.cpu(), means.cpu(), 0.6))


def test_a_weight_at_the_threshold_is_kept():
    out = torch.zeros(1, 3)
    w = torch.tensor([[0.8, 0.4]])
    means = torch.ones(2, 3)
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    assert torch.equal(msc.moe_skip_compensate_reference(out, w, ids, means, 0.5), out)
    torch.testing.assert_close(msc.moe_skip_compensate_reference(out, w, ids, means, 0.51), torch.full((1, 3), 0.4))


@pytest.mark.parametrize("bad, match", [
    ({"skip_beta": 0.0}, r"skip_beta must be in \(0, 1\)"),
    ({"skip_beta": 1.0}, r"skip_beta must be in \(0, 1\)"),
    ({"means": torch.zeros(4, 7)}, r"means must be float32 \(E, H=40\)"),
    ({"means": torch.zeros(4, 40, dtype=torch.float64)}, "means must be float32"),
    ({"topk_ids": torch.zeros(9, 3, dtype=torch.int32)}, "topk_ids must be int32 or int64"),
    ({"out": torch.zeros(9, 40, dtype=torch.int32)}, "out must be"),
])
def test_bad_input_says_what_is_allowed(bad, match):
    out, w, ids, means = _inputs(9, 2, 4, 40, torch.float32, seed=5)
    args = {"out": out.cpu(), "topk_weights": w.cpu(), "topk_ids": ids.cpu(), "means": means.cpu(), "skip_beta": 0.5}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        OP(*args.values())
