"""The sparsify-linear pass: parity of the compiled pruned model with the same model pruned eagerly (eager and
Inductor lowerings), the stored 2:4 weights, MoE experts (3-D weights), recompiles reusing the pruned weights, the
report, composition with quantize-linear, the recipes, and the errors and warnings for bad input."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from llmcompress.backend import make_backend
from llmcompress.calibration.data import CalibrationWarning
from llmcompress.calibration.hessian import HessianAccumulator
from llmcompress.errors import OptionError
from llmcompress.formats import quantized as formats
from llmcompress.passes.sparsify.magnitude import magnitude_mask
from llmcompress.passes.sparsify.masks import parse_pattern
from llmcompress.passes.sparsify.sparsegpt import sparsegpt_prune
from llmcompress.passes.sparsify.wanda import wanda_mask
from llmcompress.recipes import builtin_recipes, load_recipe
from llmcompress.testing.models import VOCAB, example_ids, main_output, tiny_model
from llmcompress.testing.numerics import sqnr_db


def _root_cause(e):
    while e.__cause__ is not None or getattr(e, "inner_exception", None) is not None:
        e = e.__cause__ or e.inner_exception
    return e


def _raises(exc, match, fn):
    """`fn()` raises `exc` matching `match`, possibly wrapped by Dynamo (BackendCompilerFailed)."""
    with pytest.raises(Exception) as info:
        fn()
    cause = _root_cause(info.value)
    assert isinstance(cause, exc), repr(cause)
    assert re.search(match, str(cause)), str(cause)


def _calibration(n=6, seq=24, seed=3):
    return torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _passes(**sparsify):
    return {"canonicalize": {}, "sparsify-linear": sparsify}


def _compile(model, options, on_graph=None):
    torch._dynamo.reset()
    return torch.compile(model, backend="llmcompress" if on_graph is None else make_backend(on_graph=on_graph),
                         options=options)


def _record(report_path, index=0, name="sparsify-linear"):
    graph = json.loads(report_path.read_text())["graphs"][index]
    return next(p for p in graph["passes"] if p["name"] == name)


def _stored(gm):
    """{layer weight name: the weight a pruned linear / grouped matmul of the compiled graph reads}."""
    out = {}
    for n in gm.graph.nodes:
        if "llmcompress.sparsity" in n.meta:
            w = n.args[1]
            obj = gm
            for part in w.target.split("."):
                obj = getattr(obj, part)
            out[n.meta["llmcompress.linear"]] = obj
    return out


def _pruned_layers(model):
    """The layers sparsify-linear prunes by default: every linear but lm_head and the MoE routers, and the 3-D
    expert weights; (name, parameter) in the y = x @ W.T orientation (experts: (E, N, K))."""
    return [(n, p) for n, p in model.named_parameters()
            if (p.dim() == 2 and n.endswith("_proj.weight")) or p.dim() == 3]


def _inputs_of_linears(model, ids):
    """Each pruned nn.Linear's input rows (rows, K) in the dense model over `ids` (the one-shot oracle's data)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith("_proj"):
            hooks.append(m.register_forward_pre_hook(
                lambda m, a, name=name: seen.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {f"{k}.weight": torch.cat(v) for k, v in seen.items()}


def _prune_eagerly(model, method, pattern, ids=None, sparsity=0.5):
    """The oracle: the model with each pruned layer's weight replaced by our functions' result, computed on an
    nn.Module copy (one-shot: every layer's statistics from the dense model's activations on `ids`)."""
    p = parse_pattern(pattern, "oracle")
    inputs = _inputs_of_linears(model, ids) if ids is not None else {}
    with torch.no_grad():
        for name, w in _pruned_layers(model):
            if method == "magnitude":
                ws = list(w) if w.dim() == 3 else [w]
                new = [wi * magnitude_mask(wi, p, sparsity) for wi in ws]
                w.copy_(torch.stack(new) if w.dim() == 3 else new[0])
            elif method == "wanda":
                w.mul_(wanda_mask(w, inputs[name].square().sum(0), p, sparsity))
            else:
                acc = HessianAccumulator(w.shape[1])
                acc.add(inputs[name])
                w.copy_(sparsegpt_prune(w, acc.hessian, p, sparsity=sparsity).weight)
    return model


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
@pytest.mark.parametrize("method,pattern", [("magnitude", "2:4"), ("magnitude", "unstructured"), ("wanda", "2:4"),
                                            ("sparsegpt", "unstructured"), ("sparsegpt", "4:8")])
def test_compiled_pruned_model_matches_the_model_pruned_eagerly(method, pattern, lowering, tmp_path):
    # Windows of the example's shape: the graph's static (2, 11) is what the calibration run feeds, unchanged.
    ids, cal = example_ids(), _calibration(n=4, seq=11)
    with torch.no_grad():
        dense = main_output(tiny_model("llama")(ids))
        expected = main_output(_prune_eagerly(tiny_model("llama"), method, pattern,
                                              cal if method != "magnitude" else None)(ids))
    options = {"lowering": lowering, "report": str(tmp_path / "r.json"),
               "passes": _passes(method=method, pattern=pattern, sequential=False)}
    if method != "magnitude":
        options.update(calibration=cal, calibration_samples=4, calibration_seq_len=11)
    with torch.no_grad():
        out = main_output(_compile(tiny_model("llama"), options)(ids))
    # The same pruned weights: only float32 sum order differs (the calibration statistics are accumulated chunk by
    # chunk in the graph, at once in the oracle).
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert sqnr_db(dense, out) < 40  # and pruning did change the model
    rec = _record(tmp_path / "r.json")
    assert rec["stats"][f"{pattern} {method}"] == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_every_row_of_a_2of4_layer_has_two_nonzeros_in_each_group_of_four(tmp_path):
    graphs = []
    options = {"lowering": "eager", "calibration": _calibration(), "calibration_samples": 6,
               "calibration_seq_len": 24, "passes": _passes(method="sparsegpt", pattern="2:4")}
    with torch.no_grad():
        _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))(example_ids())
    stored = _stored(graphs[0])
    assert len(stored) == 14
    for name, w in stored.items():
        n, k = w.shape
        nonzero = (w != 0).reshape(n, k // 4, 4).sum(-1)
        assert (nonzero == 2).all(), f"{name}: {nonzero.unique().tolist()}"


def test_sequential_mode_prunes_on_the_pruned_models_activations():
    cal = _calibration()
    stored = {}
    for sequential in (True, False):
        graphs: list = []
        options = {"lowering": "eager", "calibration": cal, "calibration_samples": 6, "calibration_seq_len": 24,
                   "passes": _passes(method="sparsegpt", pattern="2:4", sequential=sequential)}
        with torch.no_grad():
            _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx, g=graphs: g.append(a))(example_ids())
        stored[sequential] = _stored(graphs[0])
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(stored[True][first], stored[False][first])  # nothing pruned before the first layer
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(stored[True][down], stored[False][down])


def test_mixtral_experts_are_pruned_per_expert_and_routers_stay_dense(tmp_path):
    """3-D expert weights (E, N, K): each expert pruned 2:4 along its own K, like the eager oracle does."""
    ids = example_ids()
    with torch.no_grad():
        expected = main_output(_prune_eagerly(tiny_model("mixtral"), "magnitude", "2:4")(ids))
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"), "passes": _passes(method="magnitude",
                                                                                         pattern="2:4")}
    graphs = []
    with torch.no_grad():
        out = main_output(_compile(tiny_model("mixtral"), options, on_graph=lambda b, a, ctx: graphs.append(a))(ids))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    rec = _record(tmp_path / "r.json")
    assert rec["stats"]["2:4 magnitude"] == 2 * (4 + 2)  # per layer: q, k, v, o and the two expert tensors
    assert rec["stats"]["left dense: skip pattern"] == 3  # lm_head and the two routers
    dense = [d for d in rec["decisions"] if d["sparsity"]["pattern"] == "dense"]
    assert sorted(d["layer"] for d in dense) == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    experts = [w for n, w in _stored(graphs[0]).items() if w.dim() == 3]
    assert len(experts) == 4
    for w in experts:  # stored as the grouped matmul takes it, (E, K, N): groups of 4 run along dim 1
        e, k, n = w.shape
        assert ((w != 0).transpose(1, 2).reshape(e, n, k // 4, 4).sum(-1) == 2).all()


def test_mixtral_experts_are_calibrated_one_by_one(tmp_path):
    cal = torch.randint(2, VOCAB, (16, 32), generator=torch.Generator().manual_seed(5))
    outs = {}
    with torch.no_grad():
        dense = main_output(tiny_model("mixtral")(cal[:4]))
    for method in ("magnitude", "sparsegpt"):
        options = {"lowering": "eager", "calibration": cal, "calibration_samples": 16, "calibration_seq_len": 32,
                   "strict": True, "report": str(tmp_path / f"{method}.json"),
                   "passes": _passes(method=method, pattern="2:4")}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", CalibrationWarning)  # every expert got enough rows
            outs[method] = main_output(_compile(tiny_model("mixtral"), options)(cal[:4]))
        rec = _record(tmp_path / f"{method}.json")
        assert rec["stats"][f"2:4 {method}"] == 12
        experts = [d["sparsity"] for d in rec["decisions"] if len(d["sparsity"].get("shape", ())) == 3]
        assert len(experts) == 4 and all(s["method"] == method and s["achieved"] == 0.5 for s in experts)
    assert sqnr_db(dense, outs["sparsegpt"]) > sqnr_db(dense, outs["magnitude"]) + 1.0


def test_recompiles_reuse_the_pruned_weights(tmp_path):
    report = tmp_path / "r.json"
    options = {"lowering": "eager", "calibration": _calibration(), "calibration_samples": 6,
               "calibration_seq_len": 24, "report": str(report), "passes": _passes(method="sparsegpt", pattern="2:4")}
    graphs = []
    compiled = _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))
    with torch.no_grad():
        compiled(example_ids(seq=11))
        compiled(example_ids(seq=7))  # a new sequence length: Dynamo recompiles
    assert len(graphs) == 2
    second = _record(report, 1)
    assert second["stats"]["calibrated: cached"] == 14 and "calibration tokens" not in second["stats"]
    first, again = _stored(graphs[0]), _stored(graphs[1])
    assert first.keys() == again.keys()
    assert all(again[n] is first[n] for n in first)  # the same tensors: nothing pruned again


def test_a_new_model_with_the_same_weights_loads_the_pruned_weights_from_disk(tmp_path):
    """Calibrated results persist (the joint mode's dict: masked weight, bool mask, codes, scales, zeros): a fresh
    copy of the model misses the in-memory cache and loads them instead of calibrating, bitwise the same."""
    outs, records = [], []
    for i in range(2):
        options = {"lowering": "eager", "calibration": _calibration(), "calibration_samples": 6,
                   "calibration_seq_len": 24, "report": str(tmp_path / f"{i}.json"),
                   "passes": _passes(method="sparsegpt", pattern="2:4", quantize="w4a16", group_size=32)}
        with torch.no_grad():
            outs.append(main_output(_compile(tiny_model("llama"), options)(example_ids())))
        graph = json.loads((tmp_path / f"{i}.json").read_text())["graphs"][0]
        records.append((graph["derived_weights"], next(p for p in graph["passes"] if p["name"] == "sparsify-linear")))
    (first, _), (second, rec) = records
    assert first["disk_writes"] == 14 and first["not_persisted"] == 0
    assert second["disk_hits"] == 14 and second["misses"] == 0
    assert rec["stats"]["calibrated: cached"] == 14 and "calibration tokens" not in rec["stats"]
    assert torch.equal(outs[0], outs[1])


def test_report_says_pattern_achieved_sparsity_bytes_kernel_and_time(tmp_path):
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": _passes(method="magnitude", pattern="unstructured", sparsity=0.7)}
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:58] = 0  # 58 of 64 rows zero already: 0.906 > 0.7
        _compile(model, options)(example_ids())
    rec = _record(tmp_path / "r.json")
    pruned = {d["layer"]: d["sparsity"] for d in rec["decisions"] if d["sparsity"]["pattern"] != "dense"}
    assert len(pruned) == 14
    assert abs(pruned.pop("model.layers.0.self_attn.q_proj")["achieved"] - 58 / 64) < 1e-6  # counted, not assumed
    for s in pruned.values():
        assert s["pattern"] == "unstructured" and s["method"] == "magnitude" and s["target"] == 0.7
        assert abs(s["achieved"] - 0.7) < 1e-3
        assert s["kernel"] == "dense (masked)" and "no kernel for this pattern pays" in s["reason"]
        assert s["stored_bytes"] == s["dense_bytes"] == 4 * s["shape"][0] * s["shape"][1]
        assert s["predicted"]["pruned_s"] > 0 and s["predicted"]["dense_s"] > 0
    (head,) = [d for d in rec["decisions"] if d["sparsity"]["pattern"] == "dense"]
    assert head["layer"] == "lm_head" and head["sparsity"]["reason"] == "skip pattern"


def test_overrides_and_skip_patterns(tmp_path):
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": _passes(method="magnitude", pattern="2:4", skip=["lm_head", "*.v_proj"],
                                 overrides={"*.mlp.*": {"pattern": "unstructured", "sparsity": 0.25}})}
    with torch.no_grad():
        _compile(tiny_model("llama"), options)(example_ids())
    rec = _record(tmp_path / "r.json")
    by_layer = {d["layer"]: d["sparsity"] for d in rec["decisions"]}
    assert by_layer["model.layers.0.self_attn.v_proj"]["pattern"] == "dense"
    assert by_layer["model.layers.1.self_attn.q_proj"]["pattern"] == "2:4"
    assert by_layer["model.layers.1.mlp.up_proj"]["pattern"] == "unstructured"
    assert abs(by_layer["model.layers.1.mlp.up_proj"]["achieved"] - 0.25) < 1e-3
    # An override to N:M does not inherit the pass's unstructured sparsity (N:M fixes its own).
    options["passes"] = _passes(method="magnitude", sparsity=0.6, overrides={"*.q_proj": {"pattern": "4:8"}})
    with torch.no_grad():
        _compile(tiny_model("llama"), options)(example_ids())
    by_layer = {d["layer"]: d["sparsity"] for d in _record(tmp_path / "r.json", -1)["decisions"]}
    assert by_layer["model.layers.0.self_attn.q_proj"]["pattern"] == "4:8"
    assert by_layer["model.layers.0.self_attn.k_proj"]["target"] == 0.6


# --- composition with quantize-linear ---------------------------------------------------------------------------


def _w4_weights(gm):
    """{layer: dequantized int4 weight} of the quantized linears of a compiled graph."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and "linear_w4a16" in str(n.target):
            qw, sc, ze = (getattr(gm, a.target) for a in n.args[1:4])
            out[n.meta["llmcompress.linear"]] = formats.dequantize_int4(qw, sc, ze, n.args[4])
    return out


def test_sparsify_then_quantize_rtn_keeps_pruned_weights_zero():
    graphs = []
    passes = {"canonicalize": {}, "sparsify-linear": {"method": "magnitude", "pattern": "2:4"},
              "quantize-linear": {"scheme": "w4a16", "method": "rtn", "group_size": 32}}
    with torch.no_grad():
        _compile(tiny_model("llama"), {"lowering": "eager", "passes": passes},
                 on_graph=lambda b, a, ctx: graphs.append(a))(example_ids())
    deq = _w4_weights(graphs[0])
    assert len(deq) == 14
    dense = dict(tiny_model("llama").named_parameters())
    for name, w in deq.items():
        keep = magnitude_mask(dense[name], parse_pattern("2:4", "t"), 0.5)
        assert (w[~keep] == 0).all(), name  # 0 is exactly representable: the zero point is an integer
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_orders_that_do_not_compose_say_which_order_to_use():
    quantize_first = {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 32},
                      "sparsify-linear": {"method": "magnitude", "pattern": "2:4"}}
    _raises(OptionError, "list sparsify-linear before quantize-linear",
            lambda: _compile(tiny_model("llama"), {"lowering": "eager", "passes": quantize_first})(example_ids()))
    gptq_after = {"canonicalize": {}, "sparsify-linear": {"method": "magnitude", "pattern": "2:4"},
                  "quantize-linear": {"scheme": "w4a16", "method": "gptq", "group_size": 32}}
    _raises(OptionError, "sparse-2of4-w4a16",
            lambda: _compile(tiny_model("llama"), {"lowering": "eager", "passes": gptq_after,
                                                   "calibration": _calibration()})(example_ids()))


def test_joint_recipe_stores_2of4_int4_values(tmp_path):
    """sparse-2of4-w4a16 with group 32 (tiny-llama's K = 64 has no group of 128): the stored weights are 2:4 and,
    per group of 32 along K, take at most 16 distinct values (int4 codes dequantized)."""
    recipe = load_recipe("sparse-2of4-w4a16")
    opts = dict(next(s for s in recipe.passes if s.name == "sparsify-linear").options)
    assert opts == {"method": "sparsegpt", "pattern": "2:4", "quantize": "w4a16", "group_size": 128}
    graphs = []
    options = {"lowering": "eager", "calibration": _calibration(), "calibration_samples": 6,
               "calibration_seq_len": 24, "passes": _passes(**{**opts, "group_size": 32})}
    with torch.no_grad():
        _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))(example_ids())
    stored = _stored(graphs[0])
    assert len(stored) == 14
    for w in stored.values():
        n, k = w.shape
        assert ((w != 0).reshape(n, k // 4, 4).sum(-1) <= 2).all()
        for g in w.reshape(n, k // 32, 32).unbind(1):
            assert all(len(row.unique()) <= 16 for row in g)


def _ops_of(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.llmcompress.linear_2of4.default, torch.ops.llmcompress.linear_2of4_w4a16.default)]


def test_2of4_layers_run_the_packed_op_where_the_cost_model_says_it_wins(tmp_path):
    """Planned for an H100 with our Triton lowering, every 2:4 layer runs llmcompress::linear_2of4 on the packed
    values + metadata (its CPU kernel is the reference here) and gives the eagerly pruned model's outputs."""
    ids = example_ids()
    with torch.no_grad():
        expected = main_output(_prune_eagerly(tiny_model("llama"), "magnitude", "2:4")(ids))
    graphs = []
    options = {"lowering": "triton", "hardware": "h100-sxm", "report": str(tmp_path / "r.json"),
               "passes": _passes(method="magnitude", pattern="2:4")}
    with torch.no_grad():
        out = main_output(_compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))(ids))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    ops = _ops_of(graphs[0])
    assert len(ops) == 14 and all(n.target == torch.ops.llmcompress.linear_2of4.default for n in ops)
    assert all(n.args[-2] >= 1 for n in ops)  # the GEMV takes decode
    pruned = [d["sparsity"] for d in _record(tmp_path / "r.json")["decisions"] if d["sparsity"]["pattern"] != "dense"]
    assert len(pruned) == 14
    for sp in pruned:
        assert sp["kernel"].startswith("linear_2of4 (GEMV"), sp
        # float32 values (N, K/2) + one metadata byte per 8 inputs: about 0.53 of the dense bytes.
        assert sp["stored_bytes"] < 0.55 * sp["dense_bytes"] and sp["ranges"][0][2] == "gemv"


def test_recompiles_reuse_the_packed_2of4_weights():
    """The packed form is a derived weight: a recompile (new sequence length) reads the same tensors."""
    graphs = []
    options = {"lowering": "triton", "hardware": "h100-sxm", "passes": _passes(method="magnitude", pattern="2:4")}
    compiled = _compile(tiny_model("llama"), options, on_graph=lambda b, a, ctx: graphs.append(a))
    with torch.no_grad():
        compiled(example_ids(seq=11))
        compiled(example_ids(seq=7))
    assert len(graphs) == 2

    def packed(gm):
        return [getattr(gm, a.target) for n in _ops_of(gm) for a in n.args[1:3]]

    first, again = packed(graphs[0]), packed(graphs[1])
    assert len(first) == 28 and all(x is y for x, y in zip(first, again, strict=True))


def test_joint_2of4_int4_layers_run_the_packed_int4_op(tmp_path):
    ids, cal = example_ids(), _calibration()
    graphs = []
    base = {"calibration": cal, "calibration_samples": 6, "calibration_seq_len": 24, "hardware": "h100-sxm",
            "passes": _passes(method="sparsegpt", pattern="2:4", quantize="w4a16", group_size=32)}
    with torch.no_grad():
        reference = main_output(_compile(tiny_model("llama"), {**base, "lowering": "eager"})(ids))
        out = main_output(_compile(tiny_model("llama"), {**base, "lowering": "triton"},
                                   on_graph=lambda b, a, ctx: graphs.append(a))(ids))
    ops = _ops_of(graphs[0])
    assert len(ops) == 14 and all(n.target == torch.ops.llmcompress.linear_2of4_w4a16.default for n in ops)
    assert all(n.args[5] == 32 for n in ops)  # the joint sweep's group size
    # The same int4 codes: packed (op) against dequantized into the masked dense weight (eager lowering).
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_on_a_cpu_2of4_layers_keep_the_masked_dense_weight(tmp_path):
    """The op's CPU path is its reference (unpack + float32 matmul): never faster than dense, so not used."""
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": _passes(method="magnitude", pattern="2:4")}
    with torch.no_grad():
        _compile(tiny_model("llama"), options)(example_ids())
    pruned = [d["sparsity"] for d in _record(tmp_path / "r.json")["decisions"] if d["sparsity"]["pattern"] != "dense"]
    assert len(pruned) == 14
    for sp in pruned:
        assert sp["kernel"] == "dense (masked)" and "reference" in sp["reason"], sp


def test_recipes_are_built_in():
    for name, pattern in (("sparse-50", "unstructured"), ("sparse-2of4", "2:4"), ("sparse-2of4-w4a16", "2:4")):
        assert name in builtin_recipes()
        spec = next(s for s in load_recipe(name).passes if s.name == "sparsify-linear")
        assert spec.options["method"] == "sparsegpt" and spec.options["pattern"] == pattern


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts,match", [
    ({"sparsity": 1.5}, r"fraction in \(0, 1\)"),
    ({"sparsity": 0.0}, r"fraction in \(0, 1\)"),
    ({"pattern": "2:4", "sparsity": 0.5}, "sparsity applies to pattern 'unstructured'"),
    ({"pattern": "4:2"}, "0 < N < M"),
    ({"method": "sparsgpt"}, "did you mean 'sparsegpt'"),
    ({"method": "wanda", "quantize": "w4a16"}, "method must be 'sparsegpt'"),
    ({"overrides": {"*.q_proj": {"sparsty": 0.3}}}, "unknown key 'sparsty'"),
    ({"fallback": "rtn"}, "'fallback' got 'rtn'.*'magnitude'"),
])
def test_bad_options_say_what_is_allowed(opts, match):
    _raises(OptionError, match, lambda: _compile(tiny_model("llama"), {"lowering": "eager",
                                                                     "passes": _passes(**opts)})(example_ids()))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_need_data_or_the_fallback(method, tmp_path):
    _raises(OptionError, "needs calibration data.*fallback: magnitude",
            lambda: _compile(tiny_model("llama"), {"lowering": "eager", "passes": _passes(method=method)})(
                example_ids()))
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": _passes(method=method, fallback="magnitude")}
    with torch.no_grad(), pytest.warns(CalibrationWarning, match="pruned by magnitude instead"):
        _compile(tiny_model("llama"), options)(example_ids())
    rec = _record(tmp_path / "r.json")
    assert rec["stats"]["unstructured magnitude"] == 14
    assert rec["stats"]["fallback: magnitude (no calibration data)"] == 14


class _Odd(torch.nn.Module):
    """A linear whose K (6) is not a multiple of 4, one whose K is, and an int32 linear."""

    def __init__(self):
        super().__init__()
        self.odd = torch.nn.Linear(6, 8)
        self.even = torch.nn.Linear(8, 5)
        self.register_buffer("int_weight", torch.randint(-3, 4, (3, 8), dtype=torch.int32))

    def forward(self, x, xi):
        return self.even(self.odd(x)), torch.nn.functional.linear(xi, self.int_weight)


def test_unprunable_layers_are_left_dense_with_a_warning(tmp_path):
    model = _Odd().eval().requires_grad_(False)
    x, xi = torch.randn(3, 6), torch.randint(-3, 4, (3, 8), dtype=torch.int32)
    options = {"lowering": "eager", "report": str(tmp_path / "r.json"),
               "passes": _passes(method="magnitude", pattern="2:4", skip=["nothing_like_this"])}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, out_i = _compile(model, options)(x, xi)
    messages = [str(w.message) for w in caught]
    assert any("left odd dense: shape: pattern 2:4 needs K (in features) a multiple of 4, got K=6" in m
               for m in messages), messages
    assert any("left int_weight dense: weight dtype torch.int32" in m for m in messages), messages
    assert any("pattern 'nothing_like_this' matches no layer" in m for m in messages), messages
    rec = _record(tmp_path / "r.json")
    assert rec["stats"]["2:4 magnitude"] == 1
    assert torch.equal(out_i, torch.nn.functional.linear(xi, model.int_weight))
    h = model.odd(x)
    w = model.even.weight * magnitude_mask(model.even.weight, parse_pattern("2:4", "t"), 0.5)
    torch.testing.assert_close(out, torch.nn.functional.linear(h, w, model.even.bias))
