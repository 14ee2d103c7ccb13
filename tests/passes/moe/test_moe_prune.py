"""moe-prune on random Mixtral configs through the backend: the compiled pruned model equals the model pruned eagerly
(router rows and experts sliced), bad options raise, the decisions give experts_kept and load per layer; and the
trained tiny-mixtral fixture (marked `fixtures`)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers

from llmcompress.backend import make_backend
from llmcompress.errors import OptionError
from llmcompress.testing.fixtures import corpus_windows, fixtures_dir, load_model, load_tokenizer, missing, perplexity
from llmcompress.testing.models import VOCAB, example_ids, tiny_model


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


def _calibration(n=4, seq=32, seed=3):
    return torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _options(prune, report=None, cal=True, seq=32):
    options = {"lowering": "eager", "strict": True, "passes": {"canonicalize": {}, "moe-prune": prune}}
    if cal:
        c = _calibration(seq=seq)
        options.update(calibration=c, calibration_samples=c.shape[0], calibration_seq_len=c.shape[1])
    if report is not None:
        options["report"] = str(report)
    return options


def _decisions(report_path, name="moe-prune"):
    graphs = json.loads(report_path.read_text())["graphs"]
    return [d for g in graphs for p in g["passes"] if p["name"] == name for d in p["decisions"]]


def _sliced(model, kept, routers, downs=None):
    """An eager copy with each layer's router rows and experts sliced to `kept[layer]` (router rows from `routers`,
    down projections from `downs`, the compiled graph's kept rows, when given)."""
    pruned = copy.deepcopy(model)
    for i, layer in enumerate(pruned.model.layers):
        moe, ids = layer.mlp, kept[f"model.layers.{i}.mlp"]
        with torch.no_grad():
            w = routers[i] if routers is not None else moe.gate.weight[ids]
            moe.gate.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
            moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj[ids].clone(), requires_grad=False)
            d = downs[i] if downs is not None else moe.experts.down_proj[ids]
            moe.experts.down_proj = torch.nn.Parameter(d.clone(), requires_grad=False)
        for sub in moe.modules():
            if hasattr(sub, "num_experts"):
                sub.num_experts = len(ids)
    return pruned


def _family(name):
    """Random Qwen2-MoE (shared expert with a sigmoid gate, top-k not renormalised) and OLMoE configs, 2 layers."""
    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0,
              "bos_token_id": 0, "eos_token_id": 1}
    if name == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                             num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                                             decoder_sparse_step=1, mlp_only_layers=[], **common)
        model_cls = transformers.Qwen2MoeForCausalLM
    else:
        config = transformers.OlmoeConfig(num_experts=8, num_experts_per_tok=2, **common)
        model_cls = transformers.OlmoeForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_cls(config).eval().requires_grad_(False)
    with torch.no_grad():  # routers 10× their initial scale: fresh ones route every token almost uniformly
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(10)
    return model


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_other_families_pruned_equal_their_eagerly_pruned_copy(family, tmp_path):
    ids = example_ids()
    model = _family(family)
    compiled = torch.compile(model, backend="llmcompress",
                             options=_options({"keep": 4, "refit_router": False, "correct_down": False},
                                              tmp_path / "r.json"))
    with torch.no_grad():
        out = compiled(ids).logits
        kept = {d["layer"]: d["experts_kept"] for d in _decisions(tmp_path / "r.json")}
        assert len(kept) == 2 and all(len(v) == 4 for v in kept.values())
        expected = _sliced(model, kept, None)(ids).logits
        dense = model(ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-4  # pruning changed the model


@pytest.mark.parametrize("refit", [False, True])
def test_pruned_compiled_model_equals_the_eagerly_pruned_one(refit, tmp_path):
    ids = example_ids()
    graphs = []
    model = tiny_model("mixtral")
    options = _options({"keep": 3, "refit_router": refit, "refit_steps": 20, "correct_down": refit},
                       tmp_path / "r.json")
    compiled = torch.compile(model, backend=make_backend(on_graph=lambda b, a, ctx: graphs.append(a)),
                             options=options)
    with torch.no_grad():
        out = compiled(ids).logits
        dense = model(ids).logits
    kept = {d["layer"]: d["experts_kept"] for d in _decisions(tmp_path / "r.json")}
    assert sorted(kept) == ["model.layers.0.mlp", "model.layers.1.mlp"] and all(len(v) == 3 for v in kept.values())
    routers = downs = None
    if refit:  # the refit rows and down projections live in the graph: read them from its derived constants
        gm = next(g for g in graphs if any("weight_pruned" in n.target for n in g.graph.find_nodes(op="get_attr")))
        attrs = [n.target for n in gm.graph.find_nodes(op="get_attr")]
        routers = [getattr(gm, a) for a in attrs if "weight_pruned" in a]
        downs = [getattr(gm, a) for a in attrs if "down_proj" in a]
        assert len(routers) == 2 and len(downs) == 2
        first = kept["model.layers.0.mlp"]
        assert not torch.equal(routers[0], model.model.layers[0].mlp.gate.weight[first])  # the refit moved them
        assert not torch.equal(downs[0], model.model.layers[0].mlp.experts.down_proj[first])
        errors = [(d["reconstruction_error_refit"], d["reconstruction_error_down"]) for d in _decisions(tmp_path / "r.json")]
        assert all(down <= refit_error for refit_error, down in errors)
    with torch.no_grad():
        expected = _sliced(model, kept, routers, downs)(ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # pruning changed the model


def test_decisions_give_experts_kept_and_load(tmp_path):
    cal = _calibration(seq=11)  # the graph's sequence length (example_ids): feeds are whole (2, 11) chunks
    compiled = torch.compile(tiny_model("mixtral"), backend="llmcompress",
                             options=_options({"keep": 0.75, "refit_router": False}, tmp_path / "r.json", seq=11))
    with torch.no_grad():
        compiled(example_ids())
    decisions = _decisions(tmp_path / "r.json")
    assert len(decisions) == 2
    for d in decisions:
        assert len(d["experts_kept"]) == 3 and len(d["experts_removed"]) == 1 and d["num_experts"] == 4
        assert sum(d["load"]["tokens"]) == cal.numel() * 2  # every calibration token, top-2
        assert abs(sum(d["load"]["share"]) - 1) < 1e-5
        assert d["reconstruction_error"] >= 0 and "sliced" in d["how"]
        # fp32 router (4, 64), gate_up (4, 192, 64), down (4, 64, 96): 4 · 73984 bytes before, 3 · 73984 after
        assert d["bytes"] == {"before": 4 * 73984, "after": 3 * 73984}


def test_global_allocation_keeps_the_average(tmp_path):
    compiled = torch.compile(tiny_model("mixtral"), backend="llmcompress",
                             options=_options({"keep": 3, "allocate": "global", "refit_router": False},
                                              tmp_path / "r.json"))
    with torch.no_grad():
        compiled(example_ids())
    kept = [len(d["experts_kept"]) for d in _decisions(tmp_path / "r.json")]
    assert sum(kept) == 6 and all(2 <= k <= 4 for k in kept)


@pytest.mark.parametrize("prune, match", [
    ({"keep": 4}, r"keep must be < 4"),
    ({"keep": 1}, r"fewer than its top-2; keep must be in \[2, 3\]"),
    ({"keep": 0.25}, r"leaves 1 experts .* fewer than its top-2"),
    ({"keep": 1.5}, r"as a fraction must be in \(0, 1\)"),
    ({}, r"give option 'keep'"),
    ({"keep": 3, "method": "random"}, r"method"),
    ({"keep": 3, "down_ridge": 0.0}, r"down_ridge must be > 0"),
])
def test_bad_options_raise(prune, match):
    compiled = torch.compile(tiny_model("mixtral"), backend="llmcompress", options=_options(prune))
    with torch.no_grad():
        _raises(OptionError, match, lambda: compiled(example_ids()))


def test_no_calibration_data_raises():
    compiled = torch.compile(tiny_model("mixtral"), backend="llmcompress", options=_options({"keep": 3}, cal=False))
    with torch.no_grad():
        _raises(OptionError, r"moe-prune: needs calibration data", lambda: compiled(example_ids()))


def test_a_model_without_moe_is_left_alone(tmp_path):
    compiled = torch.compile(tiny_model("llama"), backend="llmcompress", options=_options({"keep": 3},
                                                                                      tmp_path / "r.json"))
    with torch.no_grad():
        compiled(example_ids())
    assert _decisions(tmp_path / "r.json") == []


@pytest.mark.fixtures
def test_tiny_mixtral_keeps_6_of_8_experts_per_layer(tmp_path):
    fixtures = fixtures_dir()
    if missing(fixtures):
        pytest.fail(missing(fixtures))
    tokenizer = load_tokenizer(fixtures)
    cal = corpus_windows(fixtures, tokenizer, "train.txt", 4, length=128)
    val = corpus_windows(fixtures, tokenizer, "validation.txt", 2, length=128)
    model = load_model(fixtures, "tiny-mixtral")
    dense = perplexity(model, val)
    options = {"lowering": "eager", "strict": True, "report": str(tmp_path / "r.json"), "calibration": cal,
               "calibration_samples": 4, "calibration_seq_len": 128,
               "passes": {"canonicalize": {}, "moe-prune": {"keep": 6, "refit_steps": 20}}}
    ppl = perplexity(torch.compile(load_model(fixtures, "tiny-mixtral"), backend="llmcompress", options=options), val)
    decisions = _decisions(tmp_path / "r.json")
    assert [len(d["experts_kept"]) for d in decisions] == [6, 6, 6, 6]
    assert all(d["bytes"]["after"] * 8 == d["bytes"]["before"] * 6 for d in decisions)  # sliced to 6 of 8
    assert transformers.MixtralConfig  # the fixture is a Mixtral
    assert dense < ppl < dense * 1.15, (dense, ppl)  # +3.7 % on 32 windows of 512 (benchmarks/moe_quality.py)


def test_correct_down_recovers_reachable_targets_and_never_raises_the_error():
    """Targets made by the kept experts with known down projections D*: a small ridge recovers D*; any ridge gives
    an error no larger than the original downs' (they are a feasible point of the ridge objective)."""
    from llmcompress.passes.moe.prune import correct_down
    from llmcompress.passes.moe.routing import combine, expert_outputs, route

    g = torch.Generator().manual_seed(0)
    t, e, h, i, k, kept = 600, 5, 12, 7, 2, [0, 2, 3]
    x = torch.randn(t, h, generator=g)
    gate_up, down = torch.randn(e, 2 * i, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5
    logits = 3 * torch.randn(t, e, generator=g)
    allowed = torch.zeros(e, dtype=torch.bool)
    allowed[kept] = True
    true_down = down + 0.3 * torch.randn(e, h, i, generator=g) / i**0.5
    w, idx = route(logits, k, True, allowed)
    target = combine(expert_outputs(x, gate_up, true_down), w, idx)

    def error(d):
        return float(((combine(expert_outputs(x, gate_up, d), w, idx) - target) ** 2).sum() / (target**2).sum())

    got = correct_down(x, gate_up, down, logits, kept, k, True, target, 1e-9)
    torch.testing.assert_close(got[kept], true_down[kept], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[[1, 4]], down[[1, 4]])  # removed experts untouched
    before = error(down)
    for ridge in (1e-3, 0.1, 10.0):
        assert error(correct_down(x, gate_up, down, logits, kept, k, True, target, ridge)) < before


def _impl_model(impl, seed=0):
    model = tiny_model("mixtral", seed=seed)
    model.config._experts_implementation = impl
    model.set_experts_implementation(impl)
    return model


def _expert_constants(gm):
    """{shape[0] of each 3-D constant of the graph} (the experts' weights)."""
    return [tuple(getattr(gm, n.target).shape) for n in gm.graph.find_nodes(op="get_attr")
            if getattr(gm, n.target).dim() == 3]


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_sliced_graph_holds_only_the_kept_experts_and_equals_the_masked_one(impl, tmp_path):
    """The graph's experts and router have the kept rows only; its output is the masked graph's (remove_experts:
    false, every expert in the graph with a -inf router bias) and the eagerly sliced model's."""
    ids = example_ids()
    prune = {"keep": 3, "refit_steps": 10}
    outs, graphs = {}, {}
    for remove in (True, False):
        torch._dynamo.reset()
        seen = []
        compiled = torch.compile(_impl_model(impl), backend=make_backend(on_graph=lambda b, a, ctx, seen=seen:
                                                                         seen.append(a)),
                                 options=_options({**prune, "remove_experts": remove}, tmp_path / f"{remove}.json"))
        with torch.no_grad():
            outs[remove] = compiled(ids).logits
        graphs[remove] = seen[0]
    assert _expert_constants(graphs[True]) == [(3, 192, 64), (3, 64, 96)] * 2
    assert _expert_constants(graphs[False]) == [(4, 192, 64), (4, 64, 96)] * 2
    routers = [getattr(graphs[True], n.target) for n in graphs[True].graph.find_nodes(op="get_attr")
               if "weight_pruned" in n.target]
    assert [tuple(r.shape) for r in routers] == [(3, 64), (3, 64)]
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    sliced, masked = _decisions(tmp_path / "True.json"), _decisions(tmp_path / "False.json")
    assert [d["experts_kept"] for d in sliced] == [d["experts_kept"] for d in masked]
    assert all(d["bytes"]["after"] * 4 == d["bytes"]["before"] * 3 and "sliced" in d["how"] for d in sliced)
    assert all(d["bytes"]["after"] == d["bytes"]["before"] and "-inf" in d["how"] for d in masked)
    kept = {d["layer"]: d["experts_kept"] for d in sliced}
    downs = [getattr(graphs[True], n.target) for n in graphs[True].graph.find_nodes(op="get_attr")
             if "down_proj" in n.target]
    with torch.no_grad():
        expected = _sliced(_impl_model(impl), kept, routers, downs)(ids).logits
    torch.testing.assert_close(outs[True], expected, atol=1e-5, rtol=1e-5)


def test_release_weights_frees_the_removed_experts(tmp_path):
    """With release_weights the module's original expert tensors (all 4 experts) are freed: the graph reads only the
    sliced copies, and still computes the pruned model."""
    model, ids = tiny_model("mixtral"), example_ids()
    with torch.no_grad():
        expected = torch.compile(copy.deepcopy(model), backend="llmcompress",
                                 options=_options({"keep": 3, "refit_router": False}))(ids).logits
        torch._dynamo.reset()
        options = {**_options({"keep": 3, "refit_router": False}), "release_weights": True}
        out = torch.compile(model, backend="llmcompress", options=options)(ids).logits
    torch.testing.assert_close(out, expected)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.untyped_storage().nbytes() == 0 and experts.down_proj.untyped_storage().nbytes() == 0


@pytest.mark.parametrize("keep", [3, 2])
def test_prune_then_fuse_moe_runs_the_kept_experts_and_counts_by_original_id(keep, tmp_path):
    """fuse-moe after moe-prune fuses the sliced blocks (moe_experts on (keep, ...) experts; keep = top-k leaves a
    top-2 of 2), equals the sliced unfused graph, and its load counters name the original expert ids."""
    from llmcompress.kernels.moe_load_counters import moe_load_counters

    ids = example_ids()
    prune = {"keep": keep, "refit_steps": 10}
    with torch.no_grad():
        expected = torch.compile(tiny_model("mixtral"), backend="llmcompress", options=_options(prune))(ids).logits
        torch._dynamo.reset()
        graphs = []
        model = tiny_model("mixtral")
        options = _options(prune, tmp_path / "r.json")
        options["passes"]["fuse-moe"] = {"objective": "always", "load_counters": True}
        out = torch.compile(model, backend=make_backend(on_graph=lambda b, a, ctx: graphs.append(a)),
                            options=options)(ids).logits
    torch.testing.assert_close(out, expected)
    fused = [n for n in graphs[0].graph.nodes if n.target is torch.ops.llmcompress.moe_experts.default]
    assert [tuple(n.args[1].meta["val"].shape) for n in fused] == [(keep, 192, 64)] * 2
    kept = {d["layer"]: d["experts_kept"] for d in _decisions(tmp_path / "r.json")}
    counters = moe_load_counters(model)
    assert sorted(counters) == sorted(kept)
    for layer, c in counters.items():
        assert c["experts"] == kept[layer] and c["tokens"].shape == (keep,)
        assert int(c["tokens"].sum()) == ids.numel() * 2  # every token, top-2, over the kept experts


def test_compile_served_from_the_disk_cache_reports_the_load(tmp_path):
    """A second process (here: a fresh copy of the model, so nothing is in memory) loads the pruned layers from
    the disk cache and still reports each layer's calibrated load."""
    reports = []
    for run in range(2):
        torch._dynamo.reset()
        path = tmp_path / f"r{run}.json"
        compiled = torch.compile(tiny_model("mixtral"), backend="llmcompress",
                                 options=_options({"keep": 3, "refit_steps": 5}, path))
        with torch.no_grad():
            compiled(example_ids())
        reports.append(json.loads(path.read_text()))
    derived = [r["graphs"][0]["derived_weights"] for r in reports]
    # 2 layers' pruned results and loads from disk, nothing calibrated again (the misses: the kept rows sliced)
    assert derived[0]["disk_hits"] == 0 and derived[1]["disk_hits"] == 4 and derived[1]["disk_writes"] == 0
    first, second = (_decisions(tmp_path / f"r{run}.json") for run in range(2))
    assert all("load" in d for d in second) and [d["load"] for d in second] == [d["load"] for d in first]
    assert [d["experts_kept"] for d in second] == [d["experts_kept"] for d in first]


def test_eager_experts_loop_is_left_with_a_hint(tmp_path):
    """transformers' eager experts loop breaks the graph: the router's graph has no experts to slice."""
    compiled = torch.compile(_impl_model("eager"), backend="llmcompress", options=_options({"keep": 3},
                                                                                         tmp_path / "r.json"))
    with torch.no_grad():
        compiled(example_ids())
    decisions = _decisions(tmp_path / "r.json")
    assert decisions and all(d["experts_kept"] == "all" and "grouped_mm" in d["left as is"] for d in decisions)


def test_greedy_generate_through_the_sliced_graphs_equals_the_eagerly_pruned_model(tmp_path):
    """Prefill, decode and the dynamic-shape recompile are each sliced (the pruned layers cached from the first
    graph) and greedy generate gives the eagerly sliced model's tokens."""
    ids = example_ids(batch=1, seq=7)
    model = tiny_model("mixtral")
    model.forward = torch.compile(model.forward, backend="llmcompress",
                                  options=_options({"keep": 3, "refit_router": False, "correct_down": False},
                                                   tmp_path / "r.json"))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    decisions = _decisions(tmp_path / "r.json")
    assert len(decisions) >= 4 and all("sliced" in d["how"] for d in decisions)  # 2 layers in each of >= 2 graphs
    kept = {d["layer"]: d["experts_kept"] for d in decisions}
    with torch.no_grad():
        expected = _sliced(tiny_model("mixtral"), kept, None).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)


def test_a_block_whose_slice_does_not_trace_is_masked_with_the_reason(tmp_path, monkeypatch):
    """An expert count the slice does not know to change (here: the grouped matmul's histc bins left at E) makes the
    copy fail to trace: the block is masked as before (every expert kept in the graph), never rewritten wrongly."""
    from llmcompress.passes.moe import remove

    monkeypatch.setattr(remove, "_histc_args", lambda args, e, n: args)
    ids, prune = example_ids(), {"keep": 3, "refit_steps": 5}
    with torch.no_grad():
        out = torch.compile(tiny_model("mixtral"), backend="llmcompress",
                            options=_options(prune, tmp_path / "r.json"))(ids).logits
        torch._dynamo.reset()
        expected = torch.compile(tiny_model("mixtral"), backend="llmcompress",
                                 options=_options({**prune, "remove_experts": False}))(ids).logits
    torch.testing.assert_close(out, expected)
    decisions = _decisions(tmp_path / "r.json")
    assert len(decisions) == 2
    assert all("-inf" in d["how"] and "does not trace" in d["how"] and d["bytes"]["after"] == d["bytes"]["before"]
               for d in decisions)
