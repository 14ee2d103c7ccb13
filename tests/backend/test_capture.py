"""Capture: weights frozen as constants, derived weights reused across recompiles, release of dense originals,
inference-only fallback, verify."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from llmcompress import Pass, PassResult, register_pass
from llmcompress.backend.pipeline import FallbackWarning
from llmcompress.errors import VerificationError
from llmcompress.fx_utils import add_constant, call, fake_mode_of
from llmcompress.passes.registry import unregister_pass
from llmcompress.passes.weights import DERIVED, fqn_from_source, is_released

aten = torch.ops.aten


class MLP(torch.nn.Module):
    def __init__(self, k=12, h=20, n=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(k, h)
        self.down = torch.nn.Linear(h, n, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class RelayoutWeights(Pass):
    """Replaces each linear's weight by a derived copy (scaled by `scale`), as a quantizing pass would."""

    name: ClassVar[str] = "t-relayout"
    description: ClassVar[str] = "test: derive a copy of every linear weight"
    after: ClassVar[tuple[str, ...]] = ("canonicalize",)
    calls: ClassVar[int] = 0
    scale: ClassVar[float] = 1.0

    def run(self, gm, ctx):
        count = 0
        fake_mode = fake_mode_of(gm)
        for node in list(gm.graph.nodes):
            if node.target is aten.linear.default and ctx.weights.is_constant(node.args[1]):
                def derive(w):
                    type(self).calls += 1
                    return (w * type(self).scale).t().contiguous()

                copy_kn = ctx.weights.derive(node.args[1], self.cache_key(self.scale), derive)
                with gm.graph.inserting_before(node):
                    const = add_constant(gm, fake_mode, copy_kn, "derived")
                    new_w = call(gm.graph, fake_mode, aten.t.default, (const,))
                node.replace_input_with(node.args[1], new_w)
                count += 1
        gm.graph.eliminate_dead_code()
        return PassResult(count > 0, {"relaid out": count})


@pytest.fixture
def relayout():
    register_pass(RelayoutWeights)
    RelayoutWeights.calls, RelayoutWeights.scale = 0, 1.0
    yield RelayoutWeights
    unregister_pass(RelayoutWeights.name)


def test_fqn_from_dynamo_source():
    src = "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._parameters['weight']"
    assert fqn_from_source(src) == "model.layers.0.mlp.weight"


def test_weights_are_frozen_constants(tmp_path):
    model, report = MLP(), tmp_path / "r.json"
    compiled = torch.compile(model, backend="llmcompress", options={"lowering": "eager", "report": str(report)})
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    graph = json.loads(report.read_text())["graphs"][0]
    assert graph["frozen_weights"]["count"] == 3  # up.weight, up.bias, down.weight
    assert graph["frozen_weights"]["bytes"] == (12 * 20 + 20 + 20 * 8) * 4
    assert [d["weight"] for d in graph["passes"][0]["decisions"]] == ["up.weight", "down.weight"]


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_derived_weights_are_reused_across_recompiles(relayout, tmp_path, lowering):
    model, report = MLP(), tmp_path / "r.json"
    compiled = torch.compile(model, backend="llmcompress",
                             options={"passes": ["canonicalize", "t-relayout"], "lowering": lowering,
                                      "report": str(report)})
    with torch.no_grad():
        for seq in (5, 7, 9, 11):  # 5 compiles static, 7 recompiles dynamic, 9 and 11 reuse it
            x = torch.randn(2, seq, 12)
            torch.testing.assert_close(compiled(x), model(x))
    graphs = json.loads(report.read_text())["graphs"]
    assert [g["recompile"] for g in graphs] == [False, True]
    assert relayout.calls == 2, "each weight derived once, not once per graph"
    none_on_disk = {"disk_hits": 0, "disk_writes": 0, "not_persisted": 0}  # the probe does not persist
    assert graphs[0]["derived_weights"] == {"hits": 0, "misses": 2, **none_on_disk}
    assert graphs[1]["derived_weights"] == {"hits": 2, "misses": 0, **none_on_disk}


def test_derived_cache_key_includes_options(relayout):
    model = MLP()
    for scale in (1.0, 2.0):
        torch._dynamo.reset()
        relayout.scale = scale
        compiled = torch.compile(model, backend="llmcompress",
                                 options={"passes": ["canonicalize", "t-relayout"], "lowering": "eager"})
        with torch.no_grad():
            compiled(torch.randn(3, 12))
    assert relayout.calls == 4


def test_release_weights_frees_unused_dense_originals(relayout, tmp_path):
    model, report = MLP(), tmp_path / "r.json"
    x, x_longer = torch.randn(2, 5, 12), torch.randn(2, 9, 12)
    with torch.no_grad():
        expected, expected_longer = model(x), model(x_longer)  # before the release: the model cannot run after
    compiled = torch.compile(model, backend="llmcompress",
                             options={"passes": ["canonicalize", "t-relayout"], "lowering": "eager",
                                      "release_weights": True, "report": str(report)})
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, expected)
        assert is_released(model.up.weight) and is_released(model.down.weight)
        assert model.up.weight.untyped_storage().nbytes() == 0
        assert not is_released(model.up.bias), "the bias is still read dense by the graph"
        torch.testing.assert_close(compiled(x), expected)  # still runs after release
        torch.testing.assert_close(compiled(x_longer), expected_longer)  # a recompile from the derived weights
    graph = json.loads(report.read_text())["graphs"][0]
    assert graph["released_weights"] == {"count": 2, "bytes": (12 * 20 + 20 * 8) * 4}


def test_release_weights_keeps_weights_a_graph_reads(tmp_path):
    model = MLP()
    compiled = torch.compile(model, backend="llmcompress", options={"lowering": "eager", "release_weights": True})
    with torch.no_grad():
        compiled(torch.randn(3, 12))
    assert not any(is_released(p) for p in model.parameters())


def test_gradients_required_run_uncompressed_with_a_warning(tmp_path):
    model, report = MLP(), tmp_path / "r.json"
    compiled = torch.compile(model, backend="llmcompress", options={"lowering": "eager", "report": str(report)})
    x = torch.randn(3, 12)
    with pytest.warns(FallbackWarning, match="runs uncompressed: gradients are required"):
        out = compiled(x)
    out.sum().backward()
    assert model.up.weight.grad is not None
    assert "gradients are required" in json.loads(report.read_text())["graphs"][0]["fallback"]


def test_verify_passes_for_an_exact_pipeline(tmp_path):
    report = tmp_path / "r.json"
    compiled = torch.compile(MLP(), backend="llmcompress",
                             options={"lowering": "inductor", "verify": True, "report": str(report)})
    with torch.no_grad():
        compiled(torch.randn(3, 12))
    assert json.loads(report.read_text())["graphs"][0]["verify"]["outputs"] == 1


def test_verify_catches_a_wrong_rewrite(relayout):
    relayout.scale = 1.01  # a 1% error in the weights
    compiled = torch.compile(MLP(), backend="llmcompress",
                             options={"passes": ["canonicalize", "t-relayout"], "lowering": "eager", "verify": True})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(3, 12))
    cause = info.value
    while not isinstance(cause, VerificationError) and cause is not None:
        cause = getattr(cause, "inner_exception", None) or cause.__cause__
    assert cause is not None and "differs from the uncompiled graph" in str(cause)
    # a loose enough tolerance accepts it
    torch._dynamo.reset()
    compiled = torch.compile(MLP(), backend="llmcompress",
                             options={"passes": ["canonicalize", "t-relayout"], "lowering": "eager",
                                      "verify": {"atol": 1.0, "rtol": 0.1}})
    with torch.no_grad():
        compiled(torch.randn(3, 12))


def test_derived_cache_entries_die_with_their_weight(relayout):
    model = MLP()
    compiled = torch.compile(model, backend="llmcompress",
                             options={"passes": ["canonicalize", "t-relayout"], "lowering": "eager"})
    with torch.no_grad():
        compiled(torch.randn(3, 12))
    before = len(DERIVED)
    del model, compiled
    torch._dynamo.reset()
    import gc

    gc.collect()
    assert len(DERIVED) <= before - 2
