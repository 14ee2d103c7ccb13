"""The lowrank-split pass: parity of the compiled split model with the same factors applied eagerly (eager and
Inductor lowerings), recompiles reusing the factors, the report, the speed objective, composition with quantize-linear
(int8 factors), the recipes, and the errors and warnings for bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llmcompress.backend import make_backend
from llmcompress.calibration.data import CalibrationWarning
from llmcompress.errors import LLMCompressError, OptionError
from llmcompress.recipes import builtin_recipes, load_recipe
from llmcompress.testing.models import VOCAB, example_ids, main_output, tiny_model
from llmcompress.testing.numerics import fake_quantize_linears, sqnr_db

META = "llmcompress.lowrank"


def _root_cause(e):
    while e.__cause__ is not None or getattr(e, "inner_exception", None) is not None:
        e = e.__cause__ or e.inner_exception
    return e


def _raises(exc, match, fn):
    with pytest.raises(Exception) as info:
        fn()
    cause = _root_cause(info.value)
    assert isinstance(cause, exc), repr(cause)
    assert re.search(match, str(cause)), str(cause)


def _calibration(n=6, seq=24, seed=3):
    return torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _cal_options(cal=None):
    cal = _calibration() if cal is None else cal
    return {"calibration": cal, "calibration_samples": cal.shape[0], "calibration_seq_len": cal.shape[1]}


def _passes(**split):
    return {"canonicalize": {}, "lowrank-split": {"objective": "memory", **split}}


def _compile(model, options, on_graph=None):
    torch._dynamo.reset()
    return torch.compile(model, backend="llmcompress" if on_graph is None else make_backend(on_graph=on_graph),
                         options=options)


def _record(report_path, index=0, name="lowrank-split"):
    graph = json.loads(report_path.read_text())["graphs"][index]
    return next(p for p in graph["passes"] if p["name"] == name)


def _attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _factors(gm):
    """{layer: (U, V)} read from the split linears of a compiled graph."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n in gm.graph.nodes:
        if META in n.meta:
            factor = out.setdefault(n.meta[META]["layer"], {})
            if n.meta[META]["factor"] == "vu":  # llmcompress::linear_lowrank(x, v, u, ...)
                factor.update(v=_attr(gm, n.args[1].target), u=_attr(gm, n.args[2].target))
            else:
                factor[n.meta[META]["factor"]] = _attr(gm, n.args[1].target)
    return {k: (v["u"], v["v"]) for k, v in out.items()}


def _apply_eagerly(model, factors):
    """The oracle: each split nn.Linear replaced by Sequential(Linear(K, r) with V, Linear(r, N) with U and the
    bias), in eager PyTorch."""
    for name, (u, v) in factors.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        first = torch.nn.Linear(v.shape[1], v.shape[0], bias=False, dtype=v.dtype)
        second = torch.nn.Linear(u.shape[1], u.shape[0], bias=old.bias is not None, dtype=u.dtype)
        with torch.no_grad():
            first.weight.copy_(v)
            second.weight.copy_(u)
            if old.bias is not None:
                second.bias.copy_(old.bias)
        setattr(parent, child, torch.nn.Sequential(first, second))
    return model


def _svd_factors(w, r):
    """An independent truncated SVD (float64), split sqrt(s) on each side as the pass does."""
    uu, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    return (uu[:, :r] * root).to(w.dtype), (root[:, None] * vh[:r]).to(w.dtype)


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_plain_svd_at_fixed_ranks_matches_an_independent_svd_applied_eagerly(lowering, tmp_path):
    ids = example_ids()
    ranks = {"*.self_attn.*": 12, "*.mlp.*": 20}
    oracle = tiny_model("llama")
    factors = {}
    for name, mod in oracle.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith("_proj"):
            factors[name] = _svd_factors(mod.weight, 12 if "self_attn" in name else 20)
    with torch.no_grad():
        dense = main_output(tiny_model("llama")(ids))
        expected = main_output(_apply_eagerly(oracle, factors)(ids))
    options = {"lowering": lowering, "report": str(tmp_path / "r.json"),
               "passes": _passes(method="svd", refit=False, overrides={p: {"rank": r} for p, r in ranks.items()})}
    with torch.no_grad():
        out = main_output(_compile(tiny_model("llama"), options)(ids))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert sqnr_db(dense, out) < 40  # the split did change the model
    rec = _record(tmp_path / "r.json")
    assert rec["stats"]["split svd"] == 14


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
@pytest.mark.parametrize("method", ["asvd", "svd-llm"])
def test_compiled_split_model_matches_its_factors_applied_eagerly(method, lowering, tmp_path):
    """Calibrated, sequential, allocated, refit: the graph's factors in an eager copy give the compiled outputs."""
    ids = example_ids()
    graphs = []
    options = {"lowering": lowering, **_cal_options(), "passes": _passes(method=method, ratio=0.6)}
    with torch.no_grad():
        out = main_output(_compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))(ids))
        factors = _factors(graphs[0])
        expected = main_output(_apply_eagerly(tiny_model("llama"), factors)(ids))
    assert len(factors) >= 8
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_triton_lowering_runs_the_split_as_the_fused_op_and_matches_the_factors_applied_eagerly(tmp_path):
    """With our Triton lowering the split is priced as a GPU kernel: each layer becomes one
    `llmcompress::linear_lowrank` node carrying the chooser's fused_max_m; the outputs are the eager oracle's."""
    ids = example_ids()
    graphs = []
    options = {"lowering": "triton", "report": str(tmp_path / "r.json"),
               "passes": _passes(method="svd", refit=False, overrides={"*_proj": {"rank": 12}})}
    with torch.no_grad():
        out = main_output(_compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))(ids))
        factors = _factors(graphs[0])
        expected = main_output(_apply_eagerly(tiny_model("llama"), factors)(ids))
    ops = [n for n in graphs[0].graph.nodes if n.target is torch.ops.llmcompress.linear_lowrank.default]
    assert len(ops) == len(factors) == 14
    assert not [n for n in graphs[0].graph.nodes if n.target is torch.ops.aten.linear.default
                and META in n.meta]
    decisions = [d["rank"] for d in _record(tmp_path / "r.json")["decisions"] if d["rank"]["rank"] != "dense"]
    assert all(d["kernel"].startswith("linear_lowrank") and d["predicted"]["device"] == "cuda" for d in decisions)
    assert {n.args[4] for n in ops} == {d["predicted"]["fused_max_m"] for d in decisions}
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_quantize_linear_after_the_split_keeps_two_linears_even_where_the_fused_op_would_run(tmp_path):
    """quantize-linear in the pipeline: the split stays two linears (each factor becomes its own int8 linear), with
    the reason in the report, not a fused op quantize-linear cannot take."""
    graphs = []
    options = {"lowering": "triton", "report": str(tmp_path / "r.json"),
               "passes": {**_passes(method="svd", overrides={"*_proj": {"rank": 12}}),
                          "quantize-linear": {"scheme": "w8a16", "method": "rtn"}}}
    with torch.no_grad():
        _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))(example_ids())
    assert not [n for n in graphs[0].graph.nodes if n.target is torch.ops.llmcompress.linear_lowrank.default]
    decisions = [d["rank"] for d in _record(tmp_path / "r.json")["decisions"] if d["rank"]["rank"] != "dense"]
    assert len(decisions) == 14
    assert all(d["kernel"].startswith("two linears") and "quantize-linear" in d["predicted"]["why_kernel"]
               for d in decisions)


def test_a_split_the_cost_model_rejects_adds_no_factor_constants(tmp_path):
    """objective speed at 22 tokens on the CPU profile keeps (some) tiny layers dense: the graph module holds factor
    buffers for exactly the layers it split, none for the rejected ones."""
    graphs = []
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": {"canonicalize": {}, "lowrank-split": {"method": "svd", "ratio": 0.5}}}
    with torch.no_grad():
        _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))(example_ids())
    rejected = [d["layer"] for d in _record(tmp_path / "r.json")["decisions"] if d["rank"].get("why") == "slower"]
    assert rejected
    split = {n.meta[META]["layer"] for n in graphs[0].graph.nodes if META in n.meta}
    buffers = [name for name, _ in graphs[0].named_buffers() if "lowrank" in name]
    assert len(buffers) == 2 * len(split)


def test_sequential_mode_factors_on_the_split_models_activations():
    stored = {}
    for sequential in (True, False):
        graphs: list = []
        options = {"lowering": "eager", **_cal_options(),
                   "passes": _passes(method="svd-llm", ratio=0.6, sequential=sequential)}
        with torch.no_grad():
            _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx, g=graphs: g.append(a))(example_ids())
        stored[sequential] = _factors(graphs[0])
    first = "model.layers.0.self_attn.q_proj"  # nothing is split before it
    assert torch.allclose(stored[True][first][1], stored[False][first][1], atol=1e-5)
    down = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(stored[True][down][0], stored[False][down][0], atol=1e-3)


def test_recompiles_reuse_the_factors(tmp_path):
    report = tmp_path / "r.json"
    options = {"lowering": "eager", **_cal_options(), "report": str(report),
               "passes": _passes(method="svd-llm", ratio=0.7)}
    graphs = []
    compiled = _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))
    with torch.no_grad():
        compiled(example_ids(seq=11))
        compiled(example_ids(seq=7))  # a new sequence length: Dynamo recompiles
    assert len(graphs) == 2
    first_rec, second = _record(report, 0), _record(report, 1)
    split = first_rec["stats"]["split svd-llm"]
    assert second["stats"]["factored: cached"] == split and "calibration tokens" not in second["stats"]
    first, again = _factors(graphs[0]), _factors(graphs[1])
    assert first.keys() == again.keys() and len(first) == split
    assert all(again[n][0] is first[n][0] and again[n][1] is first[n][1] for n in first)


def test_report_gives_rank_bytes_kernel_time_and_kept_fraction(tmp_path):
    options = {"lowering": "eager", **_cal_options(), "report": str(tmp_path / "r.json"),
               "passes": _passes(method="svd-llm", ratio=0.5)}
    with torch.no_grad():
        _compile(tiny_model("llama"), options)(example_ids())
    rec = _record(tmp_path / "r.json")
    by_layer = {d["layer"]: d["rank"] for d in rec["decisions"]}
    assert len(by_layer) == 15 and by_layer["lm_head"]["rank"] == "dense"
    split = {k: v for k, v in by_layer.items() if v["rank"] != "dense"}
    assert split
    total = kept = 0
    for name, d in by_layer.items():
        if name == "lm_head":
            continue
        n, k = d["shape"]
        total += n * k
        if d["rank"] == "dense":
            assert d["reason"], d
            kept += n * k
            continue
        r = d["rank"]
        assert 1 <= r < n * k / (n + k) and d["method"] == "svd-llm"
        assert d["dense_bytes"] == 4 * n * k and d["stored_bytes"] == 4 * r * (n + k)
        assert d["kernel"] == "two linears (x -> V -> U)"
        assert d["predicted"]["at_m"]["dense_s"] > 0 and d["predicted"]["at_m"]["split_s"] > 0
        assert d["predicted"]["m"] == example_ids().numel() and d["predicted"]["device"] == "cpu"
        kept += r * (n + k)
    assert rec["stats"]["params_kept_fraction"] == round(kept / total, 6)
    assert 0.5 - 96 * 2 / total < rec["stats"]["params_kept_fraction"] <= 0.5  # the budget, to within a rank step


def test_objective_speed_leaves_layers_dense_where_the_cost_model_prices_the_split_slower(tmp_path):
    """At 22 tokens on this CPU profile the two small linears of every tiny layer cost more than the dense one (the
    cost model's per-op overhead dominates a 64-wide layer), so `speed` keeps them all dense and says why."""
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": {"canonicalize": {}, "lowrank-split": {"method": "svd", "ratio": 0.5}}}
    with torch.no_grad():
        out = main_output(_compile(tiny_model("llama"), options)(example_ids()))
        dense = main_output(tiny_model("llama")(example_ids()))
    rec = _record(tmp_path / "r.json")
    slower = [d["rank"] for d in rec["decisions"] if d["rank"].get("why") == "slower"]
    assert slower and all(d["predicted"]["at_m"]["split_s"] > d["predicted"]["at_m"]["dense_s"] for d in slower)
    assert all("objective: memory" in d["reason"] for d in slower)
    if len(slower) == 14:
        torch.testing.assert_close(out, dense)


def test_a_rank_that_saves_no_bytes_leaves_the_layer_dense(tmp_path):
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": _passes(method="svd", overrides={"*.q_proj": {"rank": 40}, "*": {"rank": 8}})}
    with torch.no_grad():
        _compile(tiny_model("llama"), options)(example_ids())
    by_layer = {d["layer"]: d["rank"] for d in _record(tmp_path / "r.json")["decisions"]}
    q = by_layer["model.layers.0.self_attn.q_proj"]  # 64 x 64: r = 40 >= 4096 / 128 = 32
    assert q["rank"] == "dense" and q["why"] == "no bytes saved" and "32.0" in q["reason"]
    assert by_layer["model.layers.0.self_attn.k_proj"]["rank"] == 8


# --- composition with quantize-linear ---------------------------------------------------------------------------


def test_int8_factors_match_the_split_then_fake_quantized_oracle(tmp_path):
    """lowrank-split then quantize-linear w8a16: both factor linears become int8 (they are plain linears on frozen
    weights), and the outputs are the eager oracle's: the same factors applied eagerly, then fake-quantized."""
    recipe = load_recipe("lowrank-svdllm-80-w8a16")
    assert [s.name for s in recipe.passes] == ["canonicalize", "lowrank-split", "quantize-linear"]
    assert dict(recipe.passes[1].options) == {"method": "svd-llm", "ratio": 0.8}
    ids = example_ids()
    split_graphs, graphs = [], []
    passes = {"canonicalize": {}, "lowrank-split": {"method": "svd-llm", "ratio": 0.8, "objective": "memory"}}
    with torch.no_grad():
        _compile(tiny_model("llama"), {"lowering": "eager", **_cal_options(), "passes": passes},
                 on_graph=lambda b, a, ctx: split_graphs.append(a))(ids)
        factors = _factors(split_graphs[0])
        out = main_output(_compile(tiny_model("llama"), {
            "lowering": "eager", **_cal_options(), "report": str(tmp_path / "r.json"),
            "passes": {**passes, "quantize-linear": {"scheme": "w8a16", "method": "rtn"}}},
            on_graph=lambda b, a, ctx: graphs.append(a))(ids))
        expected = main_output(fake_quantize_linears(_apply_eagerly(tiny_model("llama"), factors), "w8a16")(ids))
    assert factors
    int8 = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "linear_w8a16" in str(n.target)]
    names = {n.meta["llmcompress.linear"] for n in int8}
    for layer in factors:
        assert {f"{layer}.lowrank_v.weight", f"{layer}.lowrank_u.weight"} <= names, layer
    for n in int8:
        assert _attr(graphs[0], n.args[1].target).dtype == torch.int8
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_lowrank_split_after_quantize_linear_says_which_order_to_use():
    quantize_first = {"canonicalize": {}, "quantize-linear": {"scheme": "w8a16"},
                      "lowrank-split": {"method": "svd", "ratio": 0.5}}
    _raises(OptionError, "list lowrank-split before quantize-linear",
            lambda: _compile(tiny_model("llama"), {"lowering": "eager", "passes": quantize_first})(example_ids()))


def test_recipes_are_built_in():
    for name in ("lowrank-svdllm-80", "lowrank-svdllm-80-w8a16"):
        assert name in builtin_recipes()
        spec = next(s for s in load_recipe(name).passes if s.name == "lowrank-split")
        assert spec.options == {"method": "svd-llm", "ratio": 0.8}


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts,match", [
    ({"ratio": 0.0}, r"fraction in \(0, 1\]"),
    ({"ratio": 1.5}, r"fraction in \(0, 1\]"),
    ({"ratio": True}, "key .ratio. got True"),
    ({"method": "svdllm", "ratio": 0.5}, "did you mean 'svd-llm'"),
    ({"ratio": 0.5, "objective": "fast"}, "'speed' . 'memory'"),
    ({}, "give 'ratio'"),
    ({"overrides": {"*": {"rank": 0}}}, "integer >= 1"),
    ({"overrides": {"*": {"rank": -3}}}, "integer >= 1"),
    ({"ratio": 0.5, "overrides": {"*": {"ranks": 3}}}, "unknown key 'ranks'"),
])
def test_bad_options_say_what_is_allowed(opts, match):
    _raises(OptionError, match, lambda: _compile(tiny_model("llama"), {
        "lowering": "eager", "passes": {"canonicalize": {}, "lowrank-split": opts}})(example_ids()))


def test_a_rank_at_or_above_min_n_k_is_refused():
    _raises(OptionError, r"rank 64 for model\.layers\.0\.self_attn\.q_proj \(64x64\) must be below min\(N, K\) = 64",
            lambda: _compile(tiny_model("llama"), {"lowering": "eager", "passes": _passes(
                method="svd", overrides={"*": {"rank": 64}})})(example_ids()))


@pytest.mark.parametrize("method", ["asvd", "svd-llm"])
def test_calibrated_methods_need_data_or_the_fallback(method, tmp_path):
    _raises(LLMCompressError, "fallback: svd", lambda: _compile(tiny_model("llama"), {
        "lowering": "eager", "passes": _passes(method=method, ratio=0.6)})(example_ids()))
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": _passes(method=method, ratio=0.6, fallback="svd")}
    with pytest.warns(CalibrationWarning, match="plain SVD instead"), torch.no_grad():
        _compile(tiny_model("llama"), options)(example_ids())
    stats = _record(tmp_path / "r.json")["stats"]
    assert stats["fallback: svd (no calibration data)"] == 14 and stats["split svd"] > 0


def test_a_pattern_matching_no_layer_warns():
    options = {"lowering": "eager", "passes": _passes(method="svd", ratio=0.6, skip=["lm_head", "*.nope_proj"])}
    with pytest.warns(UserWarning, match=r"pattern '\*\.nope_proj' matches no layer"), torch.no_grad():
        _compile(tiny_model("llama"), options)(example_ids())


def test_a_singular_xtx_is_damped_with_a_warning():
    """Calibration of 2 windows of one repeated token but the last: the first layer's inputs take 3 distinct values,
    so its XᵀX has rank 3 of K = 64 (a damping of 1e-6 is below float32's rounding of it)."""
    cal = torch.full((2, 11), 7)
    cal[:, -1] = torch.tensor([3, 5])
    options = {"lowering": "eager", **_cal_options(cal), "passes": _passes(method="svd-llm", ratio=0.6, damp=1e-6,
                                                                           refit=False, sequential=False)}
    with pytest.warns(RuntimeWarning, match=r"svd-llm: XᵀX not positive definite with damp=1e-06; damped with"), \
            torch.no_grad():
        out = main_output(_compile(tiny_model("llama"), options)(example_ids()))
    assert torch.isfinite(out).all()
