"""Pass plugins (`passes/registry.py`): discovery through the `llmcompress.passes` entry-point group, the example
plugin `fold-scalar-mul` (examples/llmcompress-example-pass) in a real compile, and a plugin that fails to import.

The example plugin must be installed: ``pip install -e ".[dev]" -e examples/llmcompress-example-pass``. This module
never imports it: it is reached by name only, as a user would.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmcompress
from llmcompress.errors import OptionError
from llmcompress.passes import registry
from llmcompress.passes.registry import PluginWarning

EXAMPLE = "fold-scalar-mul"
EXAMPLE_MODULE = "llmcompress_example_pass"
INSTALL = 'pip install -e ".[dev]" -e examples/llmcompress-example-pass'
PASSES = ["canonicalize", EXAMPLE]


@pytest.fixture
def example_plugin() -> importlib.metadata.EntryPoint:
    """The example plugin's entry point. Fails, never skips, when the package is not installed."""
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    if EXAMPLE not in eps:
        pytest.fail(
            f"the example pass plugin is not installed (no {EXAMPLE!r} entry point in group "
            f"{registry.ENTRY_POINT_GROUP!r}); from the repository root run: {INSTALL}",
            pytrace=False,
        )
    return eps[EXAMPLE]


@pytest.fixture
def registry_state(monkeypatch):
    """The registry's globals replaced by copies for the test; the originals come back after it."""
    registry.registered_passes()  # built-ins and plugins into the real registry first, so the copy holds them
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    monkeypatch.setattr(registry, "plugin_errors", dict(registry.plugin_errors))
    monkeypatch.setattr(registry, "_plugins_loaded", registry._plugins_loaded)


class ScaledLinear(nn.Module):
    """`F.linear(x, W, b) * 0.5`: the pattern fold-scalar-mul folds. x: (..., 24) -> (..., 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 24))
        self.bias = nn.Parameter(torch.randn(12))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 0.5


class LinearRelu(ScaledLinear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias).relu()


class GatedLinear(ScaledLinear):
    """linear * tensor (a gate, not a scale): not the pattern."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * torch.sigmoid(x[..., :12])


class ScaledNoBias(ScaledLinear):
    def forward(self, x):
        return F.linear(x, self.weight) * 0.3


class ScaledConv1D(nn.Module):
    """GPT-2's Conv1D: weight stored (K, N), `addmm(b, x, W) * c`; canonicalize gives linear(x, t(W), b)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 12))
        self.bias = nn.Parameter(torch.randn(12))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, 24), self.weight).reshape(*x.shape[:-1], 12) * -3.0


class SharedOutput(ScaledLinear):
    """The linear's output is read twice: folding the scale into W would change the other read."""

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y * 0.5 + y


def compile_and_run(model_cls: type[nn.Module], report_path, passes=PASSES):
    """Compile a fresh seeded model with eager lowering; returns (compiled output, eager output, report graph)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(3, 5, 24)
    compiled = torch.compile(model, backend="llmcompress",
                             options={"passes": passes, "lowering": "eager", "report": str(report_path)})
    with torch.no_grad():
        out, expected = compiled(x), model(x)
    return out, expected, json.loads(report_path.read_text())["graphs"][-1]


def pass_record(graph: dict, name: str) -> dict:
    records = [p for p in graph["passes"] if p["name"] == name]
    assert len(records) == 1, f"pass {name!r} ran {len(records)} times: {graph['passes']}"
    return records[0]


def check_folds_once(tmp_path, model_cls=ScaledLinear, removed=None) -> None:
    out, expected, graph = compile_and_run(model_cls, tmp_path / "fold.json")
    torch.testing.assert_close(out, expected)
    assert "fallback" not in graph
    assert [p["name"] for p in graph["passes"]] == PASSES
    record = pass_record(graph, EXAMPLE)
    assert record["status"] == "changed", record
    assert record["stats"] == {"folded": 1}
    assert [d["decision"] for d in record["decisions"]] == ["folded"]
    # The product is gone (with the weight's view, if any); the original constants were swapped for scaled ones,
    # so the get_attr count does not change.
    assert record["ops_removed"] == (removed or {"aten.mul.Tensor": 1})
    assert record["ops_added"] == {}


def test_example_plugin_is_discovered_through_its_entry_point(example_plugin, registry_state, monkeypatch):
    assert example_plugin.value == EXAMPLE_MODULE
    # As in a fresh process: module not imported, pass not registered, plugins not loaded yet.
    monkeypatch.delitem(sys.modules, EXAMPLE_MODULE, raising=False)
    registry.unregister_pass(EXAMPLE)
    monkeypatch.setattr(registry, "_plugins_loaded", False)

    cls = llmcompress.get_pass(EXAMPLE)

    assert cls.__module__ == EXAMPLE_MODULE and EXAMPLE_MODULE in sys.modules
    assert issubclass(cls, llmcompress.Pass) and cls.name == EXAMPLE
    assert cls.after == ("canonicalize",)


def test_example_pass_folds_scalar_mul_into_linear(example_plugin, tmp_path):
    check_folds_once(tmp_path)


@pytest.mark.parametrize(
    ("model_cls", "removed"),
    [
        (ScaledNoBias, {"aten.mul.Tensor": 1}),
        (ScaledConv1D, {"aten.mul.Tensor": 1, "aten.t.default": 1}),  # t(W) * c is the new (N, K) constant
    ],
    ids=["no-bias-scale-0.3", "conv1d-scale-minus-3"],
)
def test_example_pass_folds_other_spellings(example_plugin, tmp_path, model_cls, removed):
    check_folds_once(tmp_path, model_cls, removed)


@pytest.mark.parametrize("model_cls", [LinearRelu, GatedLinear], ids=["linear-relu", "linear-times-gate"])
def test_example_pass_leaves_graph_without_pattern_unchanged(example_plugin, tmp_path, model_cls):
    out, expected, graph = compile_and_run(model_cls, tmp_path / "no_pattern.json")
    torch.testing.assert_close(out, expected)
    record = pass_record(graph, EXAMPLE)
    assert record["status"] == "unchanged", record
    assert record["stats"] == {} and record["decisions"] == []
    assert record["ops_added"] == {} and record["ops_removed"] == {}


@pytest.mark.parametrize(
    ("model_cls", "passes", "reason"),
    [
        (SharedOutput, PASSES, "linear output used elsewhere"),
        (ScaledLinear, {"canonicalize": {}, EXAMPLE: {"max_abs_scale": 0.25}}, "scale above max_abs_scale"),
    ],
    ids=["shared-output", "max-abs-scale"],
)
def test_example_pass_skips_with_reason(example_plugin, tmp_path, model_cls, passes, reason):
    out, expected, graph = compile_and_run(model_cls, tmp_path / "skip.json", passes)
    torch.testing.assert_close(out, expected)
    record = pass_record(graph, EXAMPLE)
    assert record["status"] == "unchanged", record
    assert record["stats"] == {f"skipped: {reason}": 1}
    assert [d["decision"] for d in record["decisions"]] == [f"skipped: {reason}"]
    assert record["ops_added"] == {} and record["ops_removed"] == {}


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), "big"])
def test_example_pass_rejects_bad_max_abs_scale(example_plugin, value):
    with pytest.raises(OptionError, match="max_abs_scale"):
        llmcompress.get_pass(EXAMPLE)({"max_abs_scale": value})


def test_broken_plugin_warns_and_the_others_still_run(example_plugin, registry_state, monkeypatch, tmp_path):
    broken = importlib.metadata.EntryPoint(
        name="broken-pass", value="llmcompress_no_such_plugin_module", group=registry.ENTRY_POINT_GROUP
    )
    real_entry_points = importlib.metadata.entry_points

    # registry.load_plugins calls importlib.metadata.entry_points(group=ENTRY_POINT_GROUP).
    def entry_points(**params):
        eps = real_entry_points(**params)
        if params.get("group") == registry.ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints((*eps, broken))
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    with pytest.warns(PluginWarning, match=r"'broken-pass' \(llmcompress_no_such_plugin_module\) failed to load"):
        registry.load_plugins(force=True)

    assert llmcompress.get_pass("canonicalize").name == "canonicalize"
    assert llmcompress.get_pass(EXAMPLE).name == EXAMPLE
    with pytest.raises(OptionError, match=r"'broken-pass' failed to load: ModuleNotFoundError"):
        llmcompress.get_pass("broken-pass")
    check_folds_once(tmp_path)



def test_folded_weight_is_frozen_for_later_passes(example_plugin, tmp_path):
    """What fold-scalar-mul adds with ctx.weights.add is a frozen weight to the passes after it."""
    from llmcompress.testing.probe import ProbeGraphPass

    ProbeGraphPass.seen.clear()
    out, expected, graph = compile_and_run(ScaledLinear, tmp_path / "r.json",
                                           passes=["canonicalize", "fold-scalar-mul", "probe-graph"])
    torch.testing.assert_close(out, expected)
    assert pass_record(graph, "fold-scalar-mul")["stats"] == {"folded": 1}
    assert ProbeGraphPass.seen[-1]["linear_weights_constant"] == [True]
