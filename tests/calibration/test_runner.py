"""Tests for llmcompress/calibration/runner.py's `run_sequential`: each target sees the activations the
quantized layers before it produce, and with `float_inputs` also the float model's."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from llmcompress.calibration.runner import run_sequential


class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(24, 16, generator=g) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(8, 24, generator=g) / 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.w1)) * 2.0, self.w2)


def _run(float_inputs: bool):
    gm = torch.fx.symbolic_trace(_TwoLayers())
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    feeds = [[torch.randn(5, 16, generator=torch.Generator().manual_seed(i))] for i in range(3)]
    seen = []

    def quantize(node, calls, floats=None):
        seen.append((node, [args[0].clone() for args, _ in calls], floats))
        w = getattr(gm, node.args[1].target)
        return lambda x, w_float: F.linear(x, w.detach().round())  # coarse "quantization": the values differ

    run_sequential(gm, feeds, linears, quantize, float_inputs=float_inputs)
    return gm, feeds, seen


def test_second_layer_sees_the_quantized_first_layer():
    gm, feeds, seen = _run(float_inputs=False)
    assert [s[0].args[1].target for s in seen] == ["w1", "w2"]
    assert all(s[2] is None for s in seen)
    for x, got in zip(feeds, seen[1][1]):
        expected = torch.relu(F.linear(x[0], gm.w1.detach().round())) * 2.0
        torch.testing.assert_close(got, expected)


def test_float_inputs_are_the_unquantized_graphs_activations():
    gm, feeds, seen = _run(float_inputs=True)
    first, second = seen
    assert first[2] is None  # nothing quantized before it: the same inputs
    for x, got, floats in zip(feeds, second[1], second[2]):
        torch.testing.assert_close(floats, torch.relu(F.linear(x[0], gm.w1.detach())) * 2.0)
        torch.testing.assert_close(got, torch.relu(F.linear(x[0], gm.w1.detach().round())) * 2.0)
        assert not torch.allclose(got, floats)
