"""Derived-weight keys: one helper (`Pass.cache_key`) over a uuid that covers every module a pass's result depends on;
`FrozenWeights.derive` refuses any other key; a weight derived from several is keyed on all of them."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from llmcompress.calibration import hessian
from llmcompress.passes import base
from llmcompress.passes.quantize import gptq
from llmcompress.passes.quantize.quantize_linear import QuantizeLinearPass
from llmcompress.passes.weights import DerivedKey, FrozenWeight, FrozenWeights

QUANTIZE = "llmcompress.passes.quantize.quantize_linear"


def _with_source(monkeypatch, tmp_path, module, edit):
    """Point the source reader of `module` at an edited copy of its file."""
    path, is_package = base.module_file(module.__name__)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    edited = edit(source)
    assert edited != source
    copy = tmp_path / f"{module.__name__}.py"
    copy.write_text(edited, encoding="utf-8")
    real = base.module_file
    monkeypatch.setattr(base, "module_file", lambda name: (str(copy), is_package) if name == module.__name__
                        else real(name))


def test_key_changes_with_a_quantization_helper_source(monkeypatch, tmp_path):
    p = QuantizeLinearPass({"scheme": "w4a16", "method": "gptq"})
    assert gptq.__name__ in base.module_dependencies(QUANTIZE)  # imported lazily, inside a function
    uuid, key = p.uuid(), p.cache_key("w4a16", "gptq", 128, 0.5, "calib")
    assert p.uuid() == uuid and p.cache_key("w4a16", "gptq", 128, 0.5, "calib") == key  # stable

    # One more damping retry before GPTQ gives up (in the Hessian service GPTQ imports, shared with SparseGPT): what
    # it computes may change, so must the key.
    assert hessian.__name__ in base.module_dependencies(QUANTIZE)
    _with_source(monkeypatch, tmp_path, hessian, lambda s: s.replace("DAMP_RETRIES = (", "DAMP_RETRIES = (1e4, ", 1))
    assert p.uuid() != uuid
    assert p.cache_key("w4a16", "gptq", 128, 0.5, "calib") != key

    monkeypatch.undo()
    assert p.uuid() == uuid  # the real file again


def test_key_ignores_modules_the_pass_does_not_import(monkeypatch, tmp_path):
    from llmcompress.report import cost_report

    p = QuantizeLinearPass()
    uuid = p.uuid()
    assert cost_report.__name__ not in base.module_dependencies(QUANTIZE)
    _with_source(monkeypatch, tmp_path, cost_report, lambda s: s + "\n# edited\n")
    assert p.uuid() == uuid


def test_key_changes_with_options_and_parts():
    a, b = QuantizeLinearPass({"damp": 0.01}), QuantizeLinearPass({"damp": 0.02})
    assert a.uuid() != b.uuid()
    assert a.cache_key("x", 1) != a.cache_key("x", 2) != b.cache_key("x", 2)


@pytest.fixture
def frozen():
    """A graph with two frozen (4, 3) weights g, u as get_attr constants, and the FrozenWeights over them."""
    gen = torch.Generator().manual_seed(0)
    g, u = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    nodes = []
    for name, t in (("g", g), ("u", u)):
        gm.register_buffer(name, t)
        nodes.append(gm.graph.get_attr(name))
    gm.graph.output(tuple(nodes))
    weights = FrozenWeights(gm, [FrozenWeight("g", "mlp.gate.weight", g), FrozenWeight("u", "mlp.up.weight", u)])
    return weights, nodes, (g, u)


def test_derive_refuses_keys_not_built_by_cache_key(frozen):
    weights, (g_node, _), (g, _) = frozen
    p = QuantizeLinearPass()
    calls = []

    def fn(w):
        calls.append(1)
        return w * 2

    for key in [(p.uuid(), "scale"),  # hand-built tuple
                ("gate-up-cat", g.data_ptr(), g._version),  # an address
                "scale", 3]:
        with pytest.raises(TypeError, match="DerivedKey made by the pass's cache_key"):
            weights.derive(g_node, key, fn)
        with pytest.raises(TypeError, match="DerivedKey made by the pass's cache_key"):
            weights.cached(g_node, key)
    assert calls == []
    with pytest.raises(TypeError, match="not a plain value"):
        p.cache_key("scale", g)  # a tensor hashes by identity
    with pytest.raises(TypeError, match="16 hex digits"):
        DerivedKey("not-a-uuid", ("scale",))
    torch.testing.assert_close(weights.derive(g_node, p.cache_key("scale"), fn), g * 2, rtol=0, atol=0)
    assert calls == [1]


def test_weight_derived_from_several_is_keyed_on_each(frozen):
    weights, (g_node, u_node), (g, u) = frozen
    key = QuantizeLinearPass().cache_key("gate-up-cat")

    def cat(gu):
        return torch.cat(gu, dim=0)

    torch.testing.assert_close(weights.derive([g_node, u_node], key, cat), torch.cat([g, u]), rtol=0, atol=0)

    # Another up weight of the same version under the same gate (as after a reload, maybe at the freed one's
    # address): a new entry, not the first one's.
    u2 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    assert u2._version == u._version
    gm2 = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm2.register_buffer("g", g)
    gm2.register_buffer("u", u2)
    n_g, n_u = gm2.graph.get_attr("g"), gm2.graph.get_attr("u")
    gm2.graph.output((n_g, n_u))
    weights2 = FrozenWeights(gm2, [FrozenWeight("g", "mlp.gate.weight", g), FrozenWeight("u", "mlp.up.weight", u2)])
    torch.testing.assert_close(weights2.derive([n_g, n_u], key, cat), torch.cat([g, u2]), rtol=0, atol=0)

    with torch.no_grad():
        u.mul_(-3.0)  # a new version of the second weight only
    torch.testing.assert_close(weights.derive([g_node, u_node], key, cat), torch.cat([g, u]), rtol=0, atol=0)
