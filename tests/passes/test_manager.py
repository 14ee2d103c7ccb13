"""PassManager: ordering from constraints, undo on failure, strict mode; registry errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmcompress import Pass, PassResult, register_pass
from llmcompress.errors import LLMCompressError, OptionError, PassFailedError, PassOrderError
from llmcompress.passes.manager import PassFallbackWarning, PassManager, order_passes
from llmcompress.passes.registry import get_pass, unregister_pass


@pytest.fixture
def passes():
    """Registers throwaway passes a..d and a breaking pass; unregisters them afterwards."""
    made = []

    def make(name, after=(), before=(), run=None):
        cls = type(f"P_{name.replace('-', '_')}", (Pass,), {
            "name": name, "description": f"test pass {name}", "after": tuple(after), "before": tuple(before),
            "run": run or (lambda self, gm, ctx: PassResult(False)),
        })
        register_pass(cls)
        made.append(name)
        return cls

    yield make
    for name in made:
        unregister_pass(name)


def test_order_keeps_given_order_where_free(passes):
    a, b, c = passes("t-a"), passes("t-b"), passes("t-c")
    assert [p.name for p in order_passes([c(), a(), b()])] == ["t-c", "t-a", "t-b"]


def test_order_follows_after_and_before(passes):
    a = passes("t-a", after=["t-c"])
    b = passes("t-b", before=["t-a"])
    c = passes("t-c")
    assert [p.name for p in order_passes([a(), b(), c()])] == ["t-b", "t-c", "t-a"]


def test_constraint_on_pass_not_in_pipeline_is_ignored(passes):
    a = passes("t-a", after=["canonicalize"])
    assert [p.name for p in order_passes([a()])] == ["t-a"]


def test_cycle_is_a_clear_error(passes):
    a = passes("t-a", after=["t-b"])
    b = passes("t-b", after=["t-a"])
    with pytest.raises(PassOrderError, match=r"cycle: t-\w -> t-\w -> t-\w"):
        PassManager([a(), b()])


def test_unknown_constraint_name_is_a_clear_error(passes):
    a = passes("t-a", after=["no-such-pass"])
    with pytest.raises(PassOrderError, match="after='no-such-pass', which is not a registered pass"):
        PassManager([a()])


def test_duplicate_pass_is_an_error():
    canon = get_pass("canonicalize")
    with pytest.raises(PassOrderError, match="appears twice"):
        PassManager([canon(), canon()])


def test_unknown_pass_name_lists_registered():
    with pytest.raises(OptionError, match="unknown pass 'nope'; registered passes: .*canonicalize"):
        get_pass("nope")


def test_register_pass_checks_the_class():
    with pytest.raises(LLMCompressError, match="kebab-case"):
        register_pass(type("Bad", (Pass,), {"name": "Bad_Name", "description": "x"}))
    with pytest.raises(LLMCompressError, match="description"):
        register_pass(type("NoDesc", (Pass,), {"name": "no-desc"}))
    with pytest.raises(LLMCompressError, match="taken by"):
        register_pass(type("Clash", (Pass,), {"name": "canonicalize", "description": "x"}))


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(16, 12, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(8, 16, generator=g))

    def forward(self, x):
        return F.linear(F.gelu(F.linear(x, self.w1)), self.w2)


def _break_graph_then_raise(self, gm, ctx):
    """Corrupts the graph half-way, then fails: the manager must undo the corruption."""
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.gelu.default:
            node.target = torch.ops.aten.relu.default
    gm.register_buffer("leftover", torch.ones(1))
    raise RuntimeError("boom")


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_failing_pass_is_undone_and_warned(passes, tmp_path, lowering):
    passes("t-breaks", after=["canonicalize"], run=_break_graph_then_raise)
    model, x = TwoLinears(), torch.randn(3, 12)
    report = tmp_path / "report.json"
    compiled = torch.compile(model, backend="llmcompress",
                             options={"passes": ["canonicalize", "t-breaks"], "lowering": lowering,
                                      "report": str(report)})
    with pytest.warns(PassFallbackWarning, match="pass 't-breaks' failed .* undone.*RuntimeError: boom"):
        with torch.no_grad():
            out = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))  # gelu, not the relu the pass wrote before failing
    records = json.loads(report.read_text())["graphs"][-1]["passes"]
    assert [(r["name"], r["status"]) for r in records] == [("canonicalize", "changed"), ("t-breaks", "failed")]
    assert "RuntimeError: boom" in records[1]["error"]


def test_failing_pass_raises_under_strict(passes):
    passes("t-breaks", run=_break_graph_then_raise)
    compiled = torch.compile(TwoLinears(), backend="llmcompress",
                             options={"passes": ["t-breaks"], "lowering": "eager", "strict": True})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(3, 12))
    assert _chain_has(info.value, PassFailedError, "pass 't-breaks' failed")


def test_pass_returning_wrong_type_is_a_failure(passes):
    passes("t-wrong", run=lambda self, gm, ctx: True)
    compiled = torch.compile(TwoLinears(), backend="llmcompress", options={"passes": ["t-wrong"], "lowering": "eager"})
    with pytest.warns(PassFallbackWarning, match="returned bool, expected PassResult"), torch.no_grad():
        compiled(torch.randn(3, 12))


def _chain_has(exc, cls, text):
    while exc is not None:
        if isinstance(exc, cls) and text in str(exc):
            return True
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    return False


def test_passes_after_a_split_run_on_each_piece(passes):
    """Once a pass cut the graph into pieces (`SPLIT_KEY`), the later passes run on each piece and leave the graph
    itself alone; one record per pass, decisions tagged with their piece, and a piece a pass broke is restored
    alone (the other piece keeps the change)."""
    import copy
    import types

    from llmcompress.passes.base import SPLIT_KEY

    gm = torch.fx.symbolic_trace(TwoLinears())
    pieces = [copy.deepcopy(gm), copy.deepcopy(gm)]
    seen = []

    def split(self, g, ctx):
        g.meta[SPLIT_KEY] = types.SimpleNamespace(graphs=lambda: pieces)
        return PassResult(True)

    def mark(self, g, ctx):
        seen.append(g)
        if g is pieces[1]:
            return _break_graph_then_raise(self, g, ctx)
        g.graph.call_function(torch.relu, (next(iter(g.graph.nodes)),))  # a dead node: the change to see
        return PassResult(True, {"marked": 1}, [{"nodes": len(g.graph.nodes)}])

    split_cls, mark_cls = passes("t-split", run=split), passes("t-mark", after=["t-split"], run=mark)
    parent_code = gm.code
    with pytest.warns(PassFallbackWarning, match="t-mark"):
        records = PassManager([mark_cls(), split_cls()]).run(gm, types.SimpleNamespace(graph_id="g"))
    assert seen == pieces and gm.code == parent_code
    split_rec, mark_rec = records
    assert split_rec.name == "t-split" and mark_rec.name == "t-mark"
    assert mark_rec.status == "failed" and mark_rec.error.startswith("piece 1: RuntimeError: boom")
    assert mark_rec.stats == {"pieces": 2, "marked": 1} and [d["piece"] for d in mark_rec.decisions] == [0]
    assert "relu" in pieces[0].code and "relu" not in pieces[1].code and "gelu" in pieces[1].code
    assert not hasattr(pieces[1], "leftover")
