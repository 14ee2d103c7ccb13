"""The fuse-sibling-linears pass: linears on one input become one linear on concatenated weights plus slices; where it
fires (counts, structure), where it must not, numerics against eager on tiny HF models through both lowerings,
quantizing the fused layers (one quantized op per group, skip patterns by member name), and greedy generate."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmcompress.passes.fusion.siblings  # noqa: F401  (registers the passes)
import llmcompress.testing.probe  # noqa: F401
from llmcompress.backend import make_backend
from llmcompress.fx_utils import fused_name, member_names
from llmcompress.passes.quantize.quantize_linear import _matches
from llmcompress.testing.models import example_ids, main_output, randomize_norms, tiny_model
from llmcompress.testing.probe import ops_of_last_graph

# fp32: torch.testing's default; bf16: one rounding step (eps 7.8e-3) of the unit-scale outputs.
TOL = {torch.float32: {}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}
FUSE = ["canonicalize", "fuse-sibling-linears", "probe-graph"]
BOTH = ["canonicalize", "fold-into-weights", "fuse-sibling-linears", "probe-graph"]
LINEAR, SLICE = "aten.linear.default", "aten.slice.Tensor"


def _run(model, inputs, passes=FUSE, lowering="eager", report=None, on_graph=None):
    options = {"passes": passes, "lowering": lowering, "strict": True}
    if report is not None:
        options["report"] = str(report)
    with torch.no_grad():
        return torch.compile(model, backend="llmcompress" if on_graph is None else make_backend(on_graph=on_graph),
                             options=options)(*inputs)


def _pass(report, name="fuse-sibling-linears"):
    data = json.loads(report.read_text())
    (graph,) = data["graphs"]
    return next(p for p in graph["passes"] if p["name"] == name)


# --- HF models -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, dtype, lowering, passes, groups", [
    ("llama", torch.float32, "eager", FUSE, 4),      # 2 layers x (q/k/v, gate/up)
    ("llama", torch.bfloat16, "inductor", BOTH, 4),
    ("qwen2", torch.float32, "eager", FUSE, 4),      # q/k/v with biases
    ("qwen2", torch.bfloat16, "eager", BOTH, 4),
    ("mixtral", torch.float32, "inductor", BOTH, 2),  # q/k/v; the experts are grouped mms, the router alone
    ("opt", torch.float32, "eager", BOTH, 2),        # q/k/v once q's scaling is folded into it
    ("gpt2", torch.float32, "eager", BOTH, 0),       # c_attn is fused already
])
def test_fuses_siblings_on_hf_models(family, dtype, lowering, passes, groups, tmp_path):
    model, ids = randomize_norms(tiny_model(family, dtype=dtype)), example_ids()
    with torch.no_grad():
        reference = main_output(model(ids))
    _run(model, [ids], passes=[p for p in passes if p != "fuse-sibling-linears"])
    before = ops_of_last_graph()
    torch._dynamo.reset()
    out = main_output(_run(model, [ids], passes=passes, lowering=lowering, report=tmp_path / "r.json"))
    after = ops_of_last_graph()
    torch.testing.assert_close(out, reference, **TOL[dtype])
    rec = _pass(tmp_path / "r.json")
    assert rec["stats"].get("fused groups", 0) == groups
    members = rec["stats"].get("fused linears", 0)
    assert before[LINEAR] - after[LINEAR] == members - groups
    assert after[SLICE] - before[SLICE] == members
    assert len(rec["decisions"]) == groups
    for d in rec["decisions"]:
        assert d["fused"] and d["after_s"] < d["before_s"], d
        assert len(d["layers"]) >= 2


def test_greedy_generate_with_static_cache_gives_eager_tokens(tmp_path):
    model, ids = randomize_norms(tiny_model("llama")), example_ids(batch=1, seq=6)
    expected = model.generate(ids, max_new_tokens=16, do_sample=False, cache_implementation="static",
                              pad_token_id=0)
    report = tmp_path / "r.json"
    config = transformers.CompileConfig(backend="llmcompress", mode=None, options={
        "lowering": "eager", "strict": True, "report": str(report), "passes": BOTH[:-1]})
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    tokens = model.generate(ids, max_new_tokens=16, do_sample=False, cache_implementation="static",
                            compile_config=config, pad_token_id=0)
    assert torch.equal(tokens, expected)
    data = json.loads(report.read_text())
    assert data["summary"]["fallbacks"] == 0 and data["summary"]["recompiles"] == 0
    for graph in data["graphs"]:
        stats = {p["name"]: p["stats"] for p in graph["passes"]}
        assert stats["fuse-sibling-linears"]["fused groups"] == 4
        assert stats["fold-into-weights"]["norm scale"] == 5


# --- small modules -------------------------------------------------------------------------------------------


class Siblings(torch.nn.Module):
    """Linears of widths `ns` on one input; `bias[i]` says which have a bias."""

    def __init__(self, k=24, ns=(40, 8, 8), bias=(True, True, True)):
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=b) for n, b in zip(ns, bias))

    def forward(self, x):
        # Each output kept apart, so a slice of the fused output in the wrong place, of the wrong width or member
        # cannot cancel out (a sum over them would hide all three); the scales tell equal-width members apart.
        return torch.cat([lin(x) * (i + 1) for i, lin in enumerate(self.linears)], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [(True, True, True), (False, False, False), (True, False, True)])
def test_fused_linear_matches_eager(bias, dtype, tmp_path):
    torch.manual_seed(0)
    model = Siblings(ns=(40, 7, 13), bias=bias).to(dtype).eval()
    x = torch.randn(3, 5, 24, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    out = _run(model, [x], report=tmp_path / "r.json")
    # One linear on concatenated weights computes each output element as the member's own linear does (the same
    # K-sum, accumulated in fp32 and rounded once), and the scales by 1, 2, 3 are exact: equal to one rounding step
    # (bf16 2**-8, fp16 2**-11 relative), far below the 5 % a scale error would make.
    tol = {torch.float32: {}, torch.float16: {"atol": 1e-3, "rtol": 1e-3}, torch.bfloat16: {"atol": 8e-3, "rtol": 8e-3}}
    torch.testing.assert_close(out, expected, **tol[dtype])
    assert _pass(tmp_path / "r.json")["stats"] == {"fused groups": 1, "fused linears": 3}
    ops = ops_of_last_graph()
    assert ops[LINEAR] == 1 and ops[SLICE] == 3


def test_fused_weight_is_the_concatenation_and_named_after_its_members():
    torch.manual_seed(0)
    model = Siblings(bias=(True, False, True)).eval()
    seen = []
    _run(model, [torch.randn(2, 24)], on_graph=lambda b, a, ctx: seen.append((a, ctx)))
    gm, ctx = seen[0]
    (lin,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert ctx.weights.name(lin.args[1]) == "linears.0+1+2.weight"
    assert lin.meta["llmcompress.linear"] == "linears.0+1+2.weight"
    torch.testing.assert_close(ctx.weights.value(lin.args[1]), torch.cat([m.weight for m in model.linears]))
    b = model.linears
    torch.testing.assert_close(ctx.weights.value(lin.args[2]), torch.cat([b[0].bias, torch.zeros(8), b[2].bias]))


def test_view_that_merges_the_last_dim_becomes_a_reshape(tmp_path):
    """A slice is not contiguous: `view(-1)` on it is impossible, so the pass turns that view into a reshape."""

    class Flatten(Siblings):
        def forward(self, x):
            return torch.cat([lin(x).view(-1) for lin in self.linears])

    torch.manual_seed(0)
    model, x = Flatten().eval(), torch.randn(3, 24)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run(model, [x], report=tmp_path / "r.json"), expected)
    stats = _pass(tmp_path / "r.json")["stats"]
    assert stats == {"fused groups": 1, "fused linears": 3, "view -> reshape": 3}


@pytest.mark.parametrize("case, stats", [
    ("different inputs", {}),
    ("single linear", {}),
    ("chained", {}),  # b reads a's output: no shared input
    ("dynamic weight", {}),  # an mm on an input weight is not a canonical linear
    ("output", {"skipped: output is a graph output": 1, "skipped: no sibling of the same dtype and K": 1}),
])
def test_not_fused(case, stats, tmp_path):
    torch.manual_seed(0)

    class Case(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(24, 24), torch.nn.Linear(24, 16)

        def forward(self, x, w):
            if case == "different inputs":
                return self.a(x).sum() + self.b(x + 1).sum()
            if case == "single linear":
                return self.a(x) * 2
            if case == "chained":
                return self.b(self.a(x)).sum()
            if case == "dynamic weight":
                return self.a(x).sum() + torch.nn.functional.linear(x, w).sum()
            return self.a(x), self.b(x).sum()

    model, inputs = Case().eval(), [torch.randn(3, 24), torch.randn(16, 24)]
    with torch.no_grad():
        expected = model(*inputs)
    out = _run(model, inputs, report=tmp_path / "r.json")
    torch.testing.assert_close(out, expected)
    rec = _pass(tmp_path / "r.json")
    assert rec["status"] == "unchanged" and rec["stats"] == stats
    assert ops_of_last_graph()[SLICE] == 0


def test_names_round_trip():
    cases = [
        ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
         "model.layers.0.self_attn.v_proj.weight"],
        ["q.weight", "k.weight"],
        ["a.b.q.weight", "a.c.k.weight", "a.c.v.weight"],
        ["a.w2.weight", "w1.weight"],  # a top-level member is written first
        ["x.w1", "x.w2"],
    ]
    assert fused_name(cases[0]) == "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"
    for names in cases:
        fused = fused_name(names)
        modules = sorted(n.removesuffix(".weight") for n in names)
        assert sorted(member_names(fused.removesuffix(".weight"))) == modules, fused
    assert member_names("model.lm_head") == ["model.lm_head"]
    assert _matches("model.layers.0.self_attn.q_proj+k_proj+v_proj", "*.k_proj")
    assert _matches("model.layers.0.self_attn.q_proj+k_proj+v_proj", "v_proj")
    assert not _matches("model.layers.0.self_attn.q_proj+k_proj+v_proj", "o_proj")


# --- with quantize-linear --------------------------------------------------------------------------------------


def _quantized(model, ids, fuse, tmp_path, skip=None):
    passes = {"canonicalize": {}}
    if fuse:
        passes["fuse-sibling-linears"] = {}
    quant = {"scheme": "w4a16", "group_size": 32}
    if skip is not None:
        quant["skip"] = skip
    passes["quantize-linear"] = quant
    passes["probe-graph"] = {}
    report = tmp_path / f"r{int(fuse)}.json"
    out = main_output(_run(model, [ids], passes=passes, report=report))
    torch._dynamo.reset()
    return out, _pass(report, "quantize-linear"), ops_of_last_graph()


def test_quantizes_each_fused_group_as_one_layer(tmp_path):
    model, ids = tiny_model("llama"), example_ids()
    dense, rec_dense, _ = _quantized(model, ids, False, tmp_path)
    fused, rec, ops = _quantized(model, ids, True, tmp_path)
    # per-group quantization along K does not mix output rows: the same codes, the same results
    torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-5)
    assert rec_dense["stats"]["w4a16 rtn"] == 14
    assert rec["stats"]["w4a16 rtn"] == 2 * (1 + 1 + 2)  # per layer: q+k+v, o, gate+up, down
    # On the CPU the quantized layers run torch's packed kernels (linear_w4a16_cpu), elsewhere linear_w4a16.
    quantized = ops["llmcompress.linear_w4a16.default"] + ops["llmcompress.linear_w4a16_cpu.default"]
    assert quantized == 8 and ops[LINEAR] == 1  # lm_head, skipped
    layers = {d["layer"] for d in rec["decisions"] if "scheme" in d}
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj" in layers
    assert "model.layers.1.mlp.gate_proj+up_proj" in layers


def test_skip_pattern_matching_a_member_skips_its_group(tmp_path):
    model, ids = tiny_model("llama"), example_ids()
    _, rec, ops = _quantized(model, ids, True, tmp_path, skip=["lm_head", "*.k_proj"])
    assert rec["stats"]["w4a16 rtn"] == 6 and rec["stats"]["skipped: skip pattern"] == 3
    skipped = {d["layer"] for d in rec["decisions"] if d.get("skipped") == "skip pattern"}
    assert skipped == {"lm_head", "model.layers.0.self_attn.q_proj+k_proj+v_proj",
                       "model.layers.1.self_attn.q_proj+k_proj+v_proj"}
    assert ops[LINEAR] == 3


def test_fused_weights_are_cached_across_recompiles_and_invalidated_by_any_member():
    from llmcompress.passes.weights import DERIVED

    torch.manual_seed(0)
    model = Siblings(bias=(True, False, True)).eval()
    compiled = torch.compile(model, backend="llmcompress", options={"passes": FUSE, "lowering": "eager"})
    with torch.no_grad():
        compiled(torch.randn(2, 24))
        hits = DERIVED.hits
        compiled(torch.randn(2, 3, 24))  # a new rank: recompile
        assert DERIVED.hits - hits == 2  # the concatenated weight and bias come from the cache
        model.linears[1].weight.mul_(2)  # one member changes: the concatenated weight is stale, the bias is not
        torch._dynamo.reset()
        x = torch.randn(2, 3, 24)
        hits, misses = DERIVED.hits, DERIVED.misses
        out = compiled(x)
        assert (DERIVED.hits - hits, DERIVED.misses - misses) == (1, 1)
        torch.testing.assert_close(out, model(x))
