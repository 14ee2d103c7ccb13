"""Tests for llmcompress/kernels/moe_load_counters.py and fuse-moe's `load_counters`: the counting kernel against
its reference (uneven routing, an expert with no tokens, dropped slots, accumulation over calls), the op on the CPU,
and a compiled Mixtral's counters equal to its own routing's counts (per layer, per expert) over several calls."""

from __future__ import annotations

import pytest
import torch

import llmcompress
from llmcompress.kernels import moe_load_counters as mlc
from llmcompress.testing.devices import DEVICE, needs_triton
from llmcompress.testing.models import VOCAB, tiny_model


def _routing(t, k, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    logits[:, 0] = -10.0  # expert 0: no tokens
    logits[: (2 * t) // 3, 1] += 3.0  # expert 1: most
    w, ids = torch.softmax(logits, -1).topk(k, -1)
    return w.float(), ids.to(torch.int32)


@needs_triton
@pytest.mark.parametrize("t,k,e", [(1, 2, 4), (37, 2, 8), (600, 3, 6)])  # 1,800 slots: two programs of 1,024
def test_kernel_counts_equal_the_reference(t, k, e):
    w, ids = _routing(t, k, e, seed=t)
    ids[0, -1] = e  # a dropped slot (id outside [0, E)) counts nowhere
    tokens, wsum = torch.zeros(e, dtype=torch.int64, device=DEVICE), torch.zeros(e, device=DEVICE)
    ref_tokens, ref_wsum = torch.zeros(e, dtype=torch.int64), torch.zeros(e)
    for _ in range(2):  # counters accumulate across calls
        out = mlc.moe_count_load_triton(w.to(DEVICE), ids.to(DEVICE), tokens, wsum)
        want = mlc.moe_count_load_reference(w, ids, ref_tokens, ref_wsum)
        assert torch.equal(out.cpu(), want) and out.dtype == torch.int32
    assert torch.equal(tokens.cpu(), ref_tokens) and int(ref_tokens[0]) == 0
    assert int(ref_tokens.sum()) == 2 * (t * k - 1)
    torch.testing.assert_close(wsum.cpu(), ref_wsum, atol=1e-5, rtol=1e-5)


def test_reference_counts():
    ids = torch.tensor([[1, 2], [1, 0], [5, 1]], dtype=torch.int32)
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    tokens, wsum = torch.zeros(3, dtype=torch.int64), torch.zeros(3)
    mlc.moe_count_load_reference(w, ids, tokens, wsum)
    assert tokens.tolist() == [1, 3, 1]
    torch.testing.assert_close(wsum, torch.tensor([0.5, 0.75 + 0.5 + 0.1, 0.25]))


def _model_routing_counts(model, ids):
    """Per layer, tokens per expert of the eager model's own routing (softmax top-k of its router logits)."""
    counts = {}

    def hook(name, block):
        def f(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            logits = x @ block.gate.weight.T
            chosen = torch.softmax(logits.float(), -1).topk(block.gate.top_k, -1).indices
            counts[name] = counts.get(name, 0) + torch.bincount(chosen.flatten(), minlength=logits.shape[-1])
        return f

    handles = [layer.mlp.register_forward_pre_hook(hook(f"model.layers.{i}.mlp", layer.mlp))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in ids:
            model(batch)
    for h in handles:
        h.remove()
    return counts


def test_fuse_moe_load_counters_equal_the_models_routing():
    model = tiny_model("mixtral")
    batches = [torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    want = _model_routing_counts(model, batches)
    torch._dynamo.reset()
    passes = {"canonicalize": {}, "fuse-moe": {"objective": "always", "load_counters": True}}
    compiled = torch.compile(model, backend="llmcompress", options={"lowering": "eager", "passes": passes})
    with torch.no_grad():
        for batch in batches:
            compiled(batch)
    got = llmcompress.moe_load_counters(compiled)
    assert list(got) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for name, entry in got.items():
        assert torch.equal(entry["tokens"], want[name]), name
        assert entry["graphs"] == 1
        hit = entry["tokens"] > 0
        assert bool(((entry["mean_weight"][hit] > 0) & (entry["mean_weight"][hit] <= 1)).all())
    assert llmcompress.moe_load_counters(tiny_model("mixtral")) == {}  # another model: none of these
    llmcompress.reset_moe_load_counters(compiled)
    assert all(int(e["tokens"].sum()) == 0 for e in llmcompress.moe_load_counters(model).values())


def test_load_counters_option_is_checked():
    from llmcompress.errors import OptionError
    from llmcompress.passes.moe.fuse_moe import FuseMoeOptions

    with pytest.raises(OptionError, match="key 'load_counters' got 'yes'; expected true or false"):
        FuseMoeOptions(load_counters="yes")


def test_reset_zeroes_every_graphs_counter_of_a_block():
    """One block compiled in two graphs (prefill and decode) has two counters under one name; reset zeroes both
    (comparing counters field by field raised on their tensors)."""
    model = torch.nn.Linear(4, 3)
    keys = [mlc.new_counter("model.layers.0.mlp", 3, "cpu", [model.weight]) for _ in range(2)]
    try:
        for key in keys:
            mlc.moe_count_load_reference(torch.full((2, 2), 0.5), torch.tensor([[0, 1], [1, 2]], dtype=torch.int32),
                                         mlc.counter(key).tokens, mlc.counter(key).weight_sum)
        assert llmcompress.moe_load_counters(model)["model.layers.0.mlp"]["tokens"].tolist() == [2, 4, 2]
        llmcompress.reset_moe_load_counters(model)
        assert all(int(mlc.counter(key).tokens.sum()) == 0 and float(mlc.counter(key).weight_sum.sum()) == 0
                   for key in keys)
    finally:
        for key in keys:
            mlc.drop_counter(key)
