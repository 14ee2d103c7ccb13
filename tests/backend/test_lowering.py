"""Lowering: custom ops that passes insert run under both lowerings; mode maps onto Inductor's settings."""

from __future__ import annotations

import pytest
import torch

import llmcompress.kernels  # noqa: F401 - registers torch.ops.llmcompress.*
from llmcompress.kernels.rms_norm import rms_norm_reference


class NormThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm_weight = torch.nn.Parameter(torch.rand(48, generator=g) + 0.5)
        self.w = torch.nn.Parameter(torch.randn(20, 48, generator=g))

    def forward(self, x):
        h = torch.ops.llmcompress.rms_norm(x, self.norm_weight, 1e-6)
        return torch.nn.functional.linear(h, self.w)


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_custom_op_in_both_lowerings(lowering):
    model = NormThenLinear()
    x = torch.randn(2, 7, 48)
    compiled = torch.compile(model, backend="llmcompress", options={"lowering": lowering, "strict": True})
    with torch.no_grad():
        expected = torch.nn.functional.linear(rms_norm_reference(x, model.norm_weight, 1e-6), model.w)
        torch.testing.assert_close(compiled(x), expected)


def test_max_autotune_mode_compiles_on_cpu():
    model = NormThenLinear()
    x = torch.randn(3, 48)
    compiled = torch.compile(model, backend="llmcompress", mode="max-autotune-no-cudagraphs")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
