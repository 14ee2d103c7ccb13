"""The quantize-linear pass: where it fires, the numerics of what it inserts (against a fake-quantized eager model),
calibration (AWQ, GPTQ, SmoothQuant) through the graph, cached reuse across graphs, MoE experts, released weights,
the compile report, and the errors and warnings for bad input."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from llmcompress.backend import make_backend
from llmcompress.calibration.data import CalibrationWarning
from llmcompress.errors import OptionError
from llmcompress.formats import quantized as formats
from llmcompress.testing.models import VOCAB, example_ids, main_output, tiny_model
from llmcompress.testing.numerics import fake_quantize_linears, sqnr_db

QUANT_OPS = {"linear_w4a16", "linear_w8a16", "linear_w8a8", "linear_fp8", "grouped_linear_w4a16",
             "grouped_linear_w8a16"}


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


def _compile(model, options, on_graph=None):
    return torch.compile(model, backend="llmcompress" if on_graph is None else make_backend(on_graph=on_graph),
                         options=options)


def _report(tmp_path, model, ids, options):
    path = tmp_path / "report.json"
    with torch.no_grad():
        out = main_output(_compile(model, {**options, "report": str(path)})(ids))
    return out, json.loads(path.read_text())


def _pass_record(report, name="quantize-linear"):
    (graph,) = report["graphs"]
    return next(p for p in graph["passes"] if p["name"] == name)




@pytest.mark.parametrize("lowering", ["eager", "inductor"])
@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_weight_only_rtn_matches_fake_quantized_eager(scheme, lowering, tmp_path):
    ids = example_ids()
    model = tiny_model("llama")
    with torch.no_grad():
        dense = main_output(model(ids))
        expected = main_output(fake_quantize_linears(tiny_model("llama"), scheme)(ids))
    passes = {"canonicalize": {}, "quantize-linear": {"scheme": scheme, "group_size": 32}}
    out, report = _report(tmp_path, model, ids, {"passes": passes, "lowering": lowering})
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert sqnr_db(dense, out) > (30 if scheme == "w8a16" else 12)
    rec = _pass_record(report)
    # 2 layers x (q, k, v, o, gate, up, down); lm_head skipped by the default pattern.
    assert rec["stats"][f"{scheme} rtn"] == 14
    assert rec["stats"]["skipped: skip pattern"] == 1
    quantized = [d for d in rec["decisions"] if "scheme" in d]
    assert len(quantized) == 14 and all(d["quantized_bytes"] < d["dense_bytes"] for d in quantized)
    assert all("kernel" in d and "method" in d for d in quantized)
    for d in quantized:  # the report prices every layer before and after, at the example's sizes
        assert d["predicted"]["quantized_bytes"] < d["predicted"]["dense_bytes"]
        assert 0 < d["predicted"]["quantized_s"] <= d["predicted"]["dense_s"]


def test_graph_has_quantized_ops_and_cost_model_prices_them():
    seen = []
    with torch.no_grad():
        _compile(tiny_model("llama"), {"lowering": "eager", "passes": {
            "canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 32}}},
            on_graph=lambda b, a, ctx: seen.append((a, ctx)))(example_ids())
    (gm, ctx), = seen
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and "llmcompress" in str(n.target)]
    assert len(ops) == 14 and all("linear_w4a16" in str(n.target) for n in ops)
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 1  # lm_head
    cost = ctx.cost_model.estimate(ops[0], ctx.sizes)
    w = ops[0].args[1].meta["val"]
    assert cost.kind == "custom" and cost.bytes >= w.numel()  # packed codes (uint8) counted at their real size
    dense = ctx.cost_model.estimate(linears[0], ctx.sizes)
    assert dense.kind == "matmul"


def test_kernel_thresholds_come_from_the_cost_model():
    from llmcompress.cost.hardware import resolve
    from llmcompress.cost.roofline import CostModel
    from llmcompress.passes.quantize.quantize_linear import _choose_kernels

    class Ctx:
        cost_model = CostModel(resolve("h100-sxm"))

    q = formats.quantize_int4_rtn(torch.randn(4096, 4096), 128)
    gemv_max, dense_min, priced = _choose_kernels(Ctx, 4096, 4096, torch.bfloat16, q)
    # Both stream the packed weight once: memory-bound ties up to 16 rows go to the GEMV (its design limit).
    assert gemv_max == 16
    assert priced["m=1"]["gemv_s"] == priced["m=1"]["gemm_s"]
    assert priced["m=1"]["dequant_cublas_s"] > 2 * priced["m=1"]["gemm_s"]  # writes + reads a dense copy
    assert dense_min > 8192  # the roofline never prefers writing a dense copy of the weight


def _calibration_ids(n=6, seq=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n, seq), generator=g)


@pytest.mark.parametrize("method,scheme", [("awq", "w4a16"), ("gptq", "w4a16"), ("smoothquant", "w8a8")])
def test_calibrated_methods_run_through_the_graph(method, scheme, tmp_path):
    ids = example_ids()
    model = tiny_model("llama")
    with torch.no_grad():
        dense = main_output(model(ids))
    passes = {"canonicalize": {}, "quantize-linear": {"scheme": scheme, "method": method, "group_size": 32}}
    options = {"passes": passes, "lowering": "eager", "calibration": _calibration_ids(), "calibration_samples": 6,
               "calibration_seq_len": 24}
    out, report = _report(tmp_path, model, ids, options)
    rec = _pass_record(report)
    assert rec["stats"][f"{scheme} {method}"] == 14
    # The graph is static (2, 11): calibration cuts the 6 x 24 tokens into 2 x 11 windows.
    assert rec["stats"]["calibration tokens"] == 132
    assert sqnr_db(dense, out) > (20 if scheme == "w8a8" else 12)


def test_gptq_beats_round_to_nearest_on_the_logits(tmp_path):
    ids = example_ids(seed=5)
    model = tiny_model("llama", seed=2)
    with torch.no_grad():
        dense = main_output(model(ids))
    base = {"lowering": "eager", "calibration": torch.cat([ids, example_ids(seed=6)]).reshape(-1),
            "calibration_samples": 4, "calibration_seq_len": 11}
    outs = {}
    for method in ("rtn", "gptq"):
        torch._dynamo.reset()
        passes = {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "method": method, "group_size": 32}}
        with torch.no_grad():
            outs[method] = main_output(_compile(model, {**base, "passes": passes})(ids))
    assert sqnr_db(dense, outs["gptq"]) > sqnr_db(dense, outs["rtn"]) + 1.0


def _quantized_codes(gm, ctx) -> dict[str, torch.Tensor]:
    """Layer name -> the int4 codes (packed as `formats.pack_int4`) a graph's linear_w4a16 ops read, or its
    linear_w4a16_cpu ops (unpacked from torch's CPU layout)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from llmcompress.formats import cpu_packed

    codes = {}
    for n in gm.graph.nodes:
        if n.target is torch.ops.llmcompress.linear_w4a16.default:
            codes[n.meta["llmcompress.linear"]] = ctx.weights.value(n.args[1])
        elif n.target is torch.ops.llmcompress.linear_w4a16_cpu.default:
            packed = ctx.weights.value(n.args[1])
            with unset_fake_temporarily():  # the hook runs in the graph's fake mode
                unpacked = cpu_packed.unpack_int4_for_cpu(packed, packed.shape[0], packed.shape[1] * 2)
                codes[n.meta["llmcompress.linear"]] = formats.pack_int4(unpacked)
    return codes


def test_calibrated_weights_are_reused_by_graphs_that_cannot_calibrate(tmp_path):
    """A decode step (static cache) cannot be fed from token windows: it reuses the prefill graph's calibration."""
    from transformers import StaticCache

    model = tiny_model("llama")
    report = tmp_path / "r.json"
    options = {"lowering": "eager", "calibration": _calibration_ids(), "calibration_samples": 6,
               "calibration_seq_len": 24, "report": str(report),
               "passes": {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "method": "gptq",
                                                                   "group_size": 32}}}
    codes = []
    compiled = _compile(model, options, on_graph=lambda before, after, ctx: codes.append(_quantized_codes(after, ctx)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        compiled(example_ids())  # plain forward: calibrates and caches
        cache = StaticCache(config=model.config, max_cache_len=16)
        compiled(example_ids(batch=1, seq=4), past_key_values=cache, use_cache=True,
                 cache_position=torch.arange(4))
        compiled(example_ids(batch=1, seq=1), past_key_values=cache, use_cache=True,
                 cache_position=torch.tensor([4]))
    data = json.loads(report.read_text())
    assert data["summary"]["fallbacks"] == 0
    records = [next(p for p in g["passes"] if p["name"] == "quantize-linear") for g in data["graphs"]]
    assert len(records) == len(codes) >= 2
    assert records[0]["stats"]["calibration tokens"] > 0
    for rec in records:
        assert rec["stats"]["w4a16 gptq"] == 14 and "calibration: rtn instead" not in rec["stats"], rec["stats"]
    for rec in records[1:]:
        assert "calibration tokens" not in rec["stats"]  # nothing calibrated again
    # Every later graph reads the prefill graph's GPTQ codes, which are not round to nearest's.
    prefill = codes[0]
    assert len(prefill) == 14
    for later in codes[1:]:
        assert later.keys() == prefill.keys()
        for name in prefill:
            assert torch.equal(later[name], prefill[name]), f"{name}: not the prefill graph's codes"
    dense = dict(model.named_parameters())
    rtn = {name: formats.quantize_int4_rtn(dense[name].detach(), 32)[0] for name in prefill}
    assert sum(not torch.equal(rtn[name], prefill[name]) for name in prefill) == 14


def test_uncalibratable_graph_without_cache_warns_and_uses_rtn():
    from transformers import StaticCache

    model = tiny_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(example_ids(batch=1, seq=4), past_key_values=cache, use_cache=True, cache_position=torch.arange(4))
    options = {"lowering": "eager", "calibration": _calibration_ids(), "calibration_samples": 6,
               "calibration_seq_len": 24,
               "passes": {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "method": "awq",
                                                                   "group_size": 32}}}
    with torch.no_grad(), pytest.warns(CalibrationWarning, match="decode step.*round to nearest"):
        _compile(model, options)(example_ids(batch=1, seq=1), past_key_values=cache, use_cache=True,
                                 cache_position=torch.tensor([4]))


def test_graph_break_second_graph_warns(tmp_path):
    """After a graph break the second graph takes hidden states, not token ids: it is quantized by RTN with a
    warning, and the report says so."""

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model("llama")
            self.head = torch.nn.Linear(VOCAB, 64)

        def forward(self, ids):
            logits = self.inner(ids).logits
            torch._dynamo.graph_break()
            return self.head(logits)

    options = {"lowering": "eager", "calibration": _calibration_ids(), "calibration_samples": 6,
               "calibration_seq_len": 24, "report": str(tmp_path / "r.json"),
               "passes": {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "method": "gptq",
                                                                   "group_size": 32}}}
    with torch.no_grad(), pytest.warns(CalibrationWarning, match="no input is a .* token ids"):
        _compile(Broken().eval(), options)(example_ids())
    report = json.loads((tmp_path / "r.json").read_text())
    first, second = (next(p for p in g["passes"] if p["name"] == "quantize-linear") for g in report["graphs"])
    assert first["stats"]["w4a16 gptq"] == 14
    assert second["stats"]["w4a16 rtn"] == 1 and second["stats"]["calibration: rtn instead"] == 1


def _fake_quant_mixtral(model, group_size=32):
    """The eager Mixtral with every weight quantize-linear quantizes by default replaced by its RTN
    quantized-dequantized value: each expert of the 3-D expert tensors (E, N, K) on its own, and the attention
    linears; the LM head and the routers (`*.gate`) stay dense."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:
                p.copy_(torch.stack([formats.dequantize_int4(*formats.quantize_int4_rtn(w, group_size), group_size)
                                     for w in p]))
            elif p.dim() == 2 and name.endswith("_proj.weight"):
                p.copy_(formats.dequantize_int4(*formats.quantize_int4_rtn(p, group_size), group_size))
    return model


def test_mixtral_experts_become_grouped_quantized_ops(tmp_path):
    ids = example_ids()
    model = tiny_model("mixtral")
    with torch.no_grad():
        dense = main_output(model(ids))
        expected = main_output(_fake_quant_mixtral(tiny_model("mixtral"))(ids))
    passes = {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 32}}
    out, report = _report(tmp_path, model, ids, {"passes": passes, "lowering": "eager"})
    # The same quantized weights in eager: only fp32 sum order differs (and routing, were a top-2 choice that close).
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert sqnr_db(dense, out) > 10
    rec = _pass_record(report)
    grouped = [d for d in rec["decisions"] if str(d.get("kernel", "")).startswith("grouped")]
    assert len(grouped) == 4  # 2 layers x (gate_up, down)
    assert rec["stats"]["w4a16 rtn"] == 2 * (4 + 2)  # per layer: q, k, v, o and the two expert tensors
    assert rec["stats"]["skipped: skip pattern"] == 3  # lm_head and the two routers


def test_release_weights_frees_the_dense_originals():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        reference = fake_quantize_linears(tiny_model("llama"), "w8a16")
        table = reference.get_input_embeddings().weight  # the w8a16 recipe stores the embedding as int8 rows too
        table.data = formats.dequantize_int8(*formats.quantize_int8_per_channel(table.data))
        expected = main_output(reference(example_ids()))
        out = main_output(_compile(model, {"recipe": "w8a16", "lowering": "eager", "release_weights": True})(
            example_ids()))
    assert q.untyped_storage().nbytes() == 0
    assert model.get_input_embeddings().weight.untyped_storage().nbytes() == 0
    assert model.lm_head.weight.untyped_storage().nbytes() > 0  # skipped: still used dense
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_fp8_on_a_cpu_is_a_clear_error():
    from llmcompress.kernels.fp8_linear import FP8UnsupportedError

    with torch.no_grad():
        _raises(FP8UnsupportedError, "8.9", lambda: _compile(tiny_model("llama"), {"recipe": "fp8",
                                                                                    "lowering": "eager"})(example_ids()))


@pytest.mark.parametrize("options,message", [
    ({"passes": {"quantize-linear": {"scheme": "w3a16"}}}, "scheme"),
    ({"passes": {"quantize-linear": {"scheme": "w8a16", "method": "gptq"}}}, "does not apply"),
    ({"passes": {"quantize-linear": {"group_size": 48}}}, "group_size"),
    ({"passes": {"quantize-linear": {"scheme": "w8a8", "method": "smoothquant", "alpha": 1.5}}}, "alpha"),
    ({"passes": {"quantize-linear": {"overrides": {"*.q_proj": {"bits": 3}}}}}, "unknown key 'bits'"),
    ({"recipe": "w4a16-gptq", "calibration": [1, 2, 3]}, "calibration"),
    ({"recipe": "w4a16-gptq", "calibration": torch.randn(4, 8)}, "int64"),
    ({"recipe": "w4a16-gptq", "calibration": torch.arange(10), "calibration_seq_len": 0}, "calibration_seq_len"),
])
def test_bad_options(options, message):
    with torch.no_grad():
        _raises(OptionError, message, lambda: _compile(tiny_model("llama"), {"lowering": "eager", **options})(
            example_ids()))


def test_calibration_errors():
    def run(**options):
        torch._dynamo.reset()
        model = tiny_model("llama")
        passes = {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "method": "awq", "group_size": 32}}
        with torch.no_grad():
            _compile(model, {"passes": passes, "lowering": "eager", **options})(example_ids())

    _raises(OptionError, r"give options\['calibration'\]", run)
    _raises(OptionError, "fewer than one window", lambda: run(calibration=torch.arange(10), calibration_seq_len=512))
    _raises(OptionError, "tokenizer", lambda: run(calibration="README.md"))


def test_group_size_that_does_not_divide_k_is_skipped_with_a_warning(tmp_path):
    # hidden 64 and intermediate 96: group 128 divides neither; every linear is left dense, and said so.
    passes = {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 128}}
    with pytest.warns(UserWarning, match="group_size 128 does not divide K=64"):
        _, report = _report(tmp_path, tiny_model("llama"), example_ids(), {"passes": passes, "lowering": "eager"})
    rec = _pass_record(report)
    assert rec["stats"]["skipped: group size"] == 14
    assert rec["status"] == "unchanged"


def test_pattern_matching_nothing_warns_and_overrides_apply(tmp_path):
    passes = {"canonicalize": {}, "quantize-linear": {
        "scheme": "w4a16", "group_size": 32, "skip": ["lm_head", "*.nothing_here"],
        "overrides": {"*.mlp.down_proj": {"scheme": "w8a16"}, "*.self_attn.o_proj": {"skip": True}}}}
    with pytest.warns(UserWarning, match="'\\*.nothing_here' matches no layer"):
        _, report = _report(tmp_path, tiny_model("llama"), example_ids(), {"passes": passes, "lowering": "eager"})
    stats = _pass_record(report)["stats"]
    assert stats["w8a16 rtn"] == 2 and stats["w4a16 rtn"] == 10 and stats["skipped: skip pattern"] == 3


def test_non_floating_model_is_left_dense():
    class IntLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.randint(-3, 3, (8, 8), dtype=torch.int64))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight)

    x = torch.randint(-3, 3, (2, 8))
    module = IntLinear()
    with torch.no_grad(), pytest.warns(UserWarning, match="activation dtype torch.int64"):
        out = _compile(module, {"lowering": "eager", "passes": {
            "canonicalize": {}, "quantize-linear": {"scheme": "w8a16"}}})(x)
    assert torch.equal(out, torch.nn.functional.linear(x, module.weight))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_mixtral_experts_are_calibrated_one_by_one(tmp_path, method):
    calibration = torch.randint(2, VOCAB, (16, 32), generator=torch.Generator().manual_seed(5))
    outs = {}
    for m in ("rtn", method):
        model = tiny_model("mixtral")
        with torch.no_grad():
            dense = main_output(model(calibration[:4]))
        passes = {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 32, "method": m}}
        options = {"passes": passes, "lowering": "eager", "report": str(tmp_path / f"{m}.json")}
        if m != "rtn":
            options["calibration"] = calibration
        with torch.no_grad():
            outs[m] = main_output(_compile(model, options)(calibration[:4]))
        rec = _pass_record(json.loads((tmp_path / f"{m}.json").read_text()))
        grouped = [d for d in rec["decisions"] if str(d.get("kernel", "")).startswith("grouped")]
        assert len(grouped) == 4 and all(d["method"] == m for d in grouped)
    # Calibrated experts fit the calibration tokens better than round to nearest (measured SQNR: 20.7 dB RTN,
    # 23.7 GPTQ, 23.8 AWQ).
    assert sqnr_db(dense, outs[method]) > sqnr_db(dense, outs["rtn"]) + 1.0


def test_rarely_routed_experts_fall_back_to_rtn_with_a_warning():
    calibration = torch.randint(2, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))  # 16 routings, 4 experts
    passes = {"canonicalize": {}, "quantize-linear": {"scheme": "w4a16", "group_size": 32, "method": "gptq"}}
    with torch.no_grad(), pytest.warns(CalibrationWarning, match="fewer than 16 calibration rows"):
        _compile(tiny_model("mixtral"), {"passes": passes, "lowering": "eager", "calibration": calibration,
                                         "calibration_seq_len": 8})(calibration)
