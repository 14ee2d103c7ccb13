"""quantize-linear on the CPU: w8a16 / w4a16 layers become the packed CPU ops (torch's kernels) on weights packed once
at compile time; shapes torch's kernels refuse keep the reference op, counted; the numerics match the eager model
quantized the same way; with release_weights the packed tensors are the only copy left."""

from __future__ import annotations

import warnings

import pytest
import torch

from llmcompress.backend import make_backend
from llmcompress.formats import quantized as formats
from llmcompress.passes.weights import DERIVED, is_released
from llmcompress.testing.models import example_ids, main_output, tiny_model
from llmcompress.testing.numerics import fake_quantize_linears, sqnr_db

CPU_OPS = {"w8a16": torch.ops.llmcompress.linear_w8a16_cpu.default,
           "w4a16": torch.ops.llmcompress.linear_w4a16_cpu.default}
REF_OPS = {"w8a16": torch.ops.llmcompress.linear_w8a16.default,
           "w4a16": torch.ops.llmcompress.linear_w4a16.default}


def _compile(model, options):
    seen = []
    backend = make_backend(on_graph=lambda before, after, ctx: seen.append((after, ctx)))
    return torch.compile(model, backend=backend, options=options), seen




def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op)


def _passes(scheme):
    return {"canonicalize": {}, "quantize-linear": {"scheme": scheme, "group_size": 32}}


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_cpu_graph_runs_packed_ops(scheme, lowering):
    ids = example_ids()
    model = tiny_model("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = main_output(fake_quantize_linears(tiny_model("llama", dtype=torch.bfloat16), scheme).double()(ids))
        compiled, seen = _compile(model, {"passes": _passes(scheme), "lowering": lowering, "strict": True})
        out = main_output(compiled(ids))
    (gm, _ctx), = seen
    assert _count(gm, CPU_OPS[scheme]) == 14 and _count(gm, REF_OPS[scheme]) == 0  # lm_head stays dense
    # against the bf16 model fake-quantized, run in float64: what differs is bf16 rounding, not the scheme
    assert sqnr_db(expected.float(), out.float()) > 35.0


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_float32_activations_keep_the_reference_op(scheme, tmp_path):
    """torch's packed CPU kernels are slow for float32 activations (cpu_path.FAST_DTYPES): the reference op stays,
    counted with its reason, and matches the fake-quantized model."""
    import json

    ids = example_ids()
    report = tmp_path / "r.json"
    with torch.no_grad():
        expected = main_output(fake_quantize_linears(tiny_model("llama"), scheme)(ids))
        compiled, seen = _compile(tiny_model("llama"), {"passes": _passes(scheme), "lowering": "eager",
                                                        "report": str(report)})
        out = main_output(compiled(ids))
    (gm, _), = seen
    assert _count(gm, REF_OPS[scheme]) == 14 and _count(gm, CPU_OPS[scheme]) == 0
    rec = next(p for p in json.loads(report.read_text())["graphs"][0]["passes"] if p["name"] == "quantize-linear")
    assert rec["stats"]["cpu: reference (dtype)"] == 14
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scheme,min_db", [("w8a16", 30.0), ("w4a16", 12.0)])
def test_bfloat16_model_within_the_scheme_sqnr(scheme, min_db):
    ids = example_ids()
    model = tiny_model("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        dense = main_output(model(ids)).float()
        expected = main_output(fake_quantize_linears(tiny_model("llama", dtype=torch.bfloat16), scheme)(ids)).float()
        compiled, seen = _compile(model, {"passes": _passes(scheme), "lowering": "inductor", "strict": True})
        out = main_output(compiled(ids)).float()
    (gm, _), = seen
    assert _count(gm, CPU_OPS[scheme]) == 14
    assert sqnr_db(dense, out) > min_db
    assert sqnr_db(expected, out) > 35.0  # what differs from fake quantization is bf16 rounding, not the scheme


class _Odd(torch.nn.Module):
    """Linears torch's CPU kernels take, and two they refuse: N = 40 (int4 needs N % 16), K = 40 (int8 needs
    K % 16; int4 skips it anyway: group_size 32 does not divide 40)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)
        self.odd = torch.nn.Linear(64, 40)
        self.odd8 = torch.nn.Linear(40, 32)

    def forward(self, x):
        return self.odd8(self.odd(self.b(self.a(x))))


@pytest.mark.parametrize("scheme,packed,refused", [("w8a16", 3, "odd8"), ("w4a16", 2, "odd")])
def test_refused_shapes_keep_the_reference_op_and_are_counted(scheme, packed, refused, tmp_path):
    import json

    model = _Odd().eval().to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    report = tmp_path / "r.json"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int4 leaves odd8 dense (group size), with a warning
        compiled, seen = _compile(model, {"passes": {"canonicalize": {}, "quantize-linear": {
            "scheme": scheme, "group_size": 32, "skip": []}}, "lowering": "eager", "report": str(report)})
        out = compiled(x)
        dense = model(x)
    (gm, _), = seen
    assert _count(gm, CPU_OPS[scheme]) == packed and _count(gm, REF_OPS[scheme]) == 1
    rec = next(p for p in json.loads(report.read_text())["graphs"][0]["passes"] if p["name"] == "quantize-linear")
    assert rec["stats"]["cpu: packed"] == packed and rec["stats"]["cpu: reference (shape)"] == 1
    (ref_node,) = [n for n in gm.graph.nodes if n.target is REF_OPS[scheme]]
    assert ref_node.meta["llmcompress.linear"] == f"{refused}.weight"
    assert sqnr_db(dense.float(), out.float()) > (30 if scheme == "w8a16" else 12)


def test_triton_lowering_keeps_our_ops():
    with torch.no_grad():
        compiled, seen = _compile(tiny_model("llama"), {"passes": _passes("w8a16"), "lowering": "triton"})
        compiled(example_ids())
    (gm, _), = seen
    assert _count(gm, REF_OPS["w8a16"]) == 14 and _count(gm, CPU_OPS["w8a16"]) == 0


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_release_weights_leaves_only_the_packed_copy(scheme, monkeypatch):
    """After compile: every quantized original is freed (and the heap trimmed, so the process gives the memory back),
    and the derived-weight cache holds exactly the packed tensors the graph reads (no unpacked codes, no float
    copy)."""
    import llmcompress.passes.weights as store

    trims = []
    monkeypatch.setattr(store, "trim_heap", lambda: trims.append(1) or True)
    model = tiny_model("llama", dtype=torch.bfloat16)
    linears = {n: m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    dense_bytes = sum(w.numel() * w.element_size() for w in linears.values())
    DERIVED._entries.clear()
    with torch.no_grad():
        compiled, seen = _compile(model, {"passes": _passes(scheme), "lowering": "inductor",
                                          "release_weights": True})
        compiled(example_ids())
    (gm, _ctx), = seen
    assert all(is_released(w) for w in linears.values()) and trims
    graph_tensors = {id(getattr(gm, n.target)): getattr(gm, n.target) for n in gm.graph.nodes
                     if n.op == "get_attr" and any(u.target is CPU_OPS[scheme] for u in n.users)}
    cached = [t for entry in DERIVED._entries.values() for t in entry[1] if isinstance(t, torch.Tensor)]
    assert {id(t) for t in cached} == set(graph_tensors)
    packed_bytes = sum(t.untyped_storage().nbytes() for t in graph_tensors.values())
    # bfloat16 activations: int8 codes + a bf16 scale per row; int4 codes + [scale, zero] per group of 32 in bf16
    shapes = [w.shape for w in linears.values()]
    expected = sum(n * k + 2 * n for n, k in shapes) if scheme == "w8a16" else \
        sum(n * k // 2 + (k // 32) * n * 2 * 2 for n, k in shapes)
    assert packed_bytes == expected and expected < dense_bytes * (0.52 if scheme == "w8a16" else 0.32)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_a_later_graph_reuses_the_packed_weights_after_release(scheme):
    """generate's prefill graph, then its decode graph: the originals were released by the first compile, and the
    second quantizes from the cached packed tensors (its shapes from the graph) instead of failing."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    reference = fake_quantize_linears(tiny_model("llama", dtype=torch.bfloat16), scheme).double()
    options = {"passes": {"canonicalize": {}, "quantize-linear": {"scheme": scheme, "group_size": 32,
                                                                    "embedding": "int8"}},
               "lowering": "eager", "release_weights": True, "strict": True}
    compiled, seen = _compile(model, options)
    with torch.no_grad():
        compiled(example_ids(seq=11))
        assert is_released(model.model.layers[0].mlp.up_proj.weight)
        out = main_output(compiled(example_ids(seq=3))).float()  # a new static shape: a second graph
        table = reference.get_input_embeddings().weight
        table.data = formats.dequantize_int8(*formats.quantize_int8_per_channel(table.data.bfloat16())).double()
        expected = main_output(reference(example_ids(seq=3))).float()
    assert len(seen) == 2 and _count(seen[1][0], CPU_OPS[scheme]) == 14
    assert sqnr_db(expected, out) > 35.0  # bf16 rounding, not the scheme
