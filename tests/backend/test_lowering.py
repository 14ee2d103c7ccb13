"""Lowering: custom ops that passes insert run under both lowerings; mode maps onto Inductor's settings; the Triton
lowering is refused where our Triton kernels cannot run, and the report says which lowering ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import llmcompress.kernels  # noqa: F401 - registers torch.ops.llmcompress.*
from llmcompress.backend.pipeline import FallbackWarning
from llmcompress.errors import OptionError
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


def _root_cause(exc):
    while getattr(exc, "inner_exception", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return exc


_REFUSAL = "our Triton kernels cannot run on cpu here"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_triton_lowering_is_refused_where_triton_cannot_run(monkeypatch, tmp_path, grad):
    """A CPU without the interpreter: our ops would run their PyTorch references, so the lowering is refused with
    what to use instead, before anything could fall back (with gradients required it would run eager)."""
    import llmcompress.kernels.linear_common as common

    monkeypatch.setattr(common, "INTERPRETED", False)
    report = tmp_path / "r.json"
    compiled = torch.compile(NormThenLinear(), backend="llmcompress", options={"lowering": "triton",
                                                                               "report": str(report)})
    with pytest.raises(Exception) as info, torch.set_grad_enabled(grad):
        compiled(torch.randn(2, 7, 48))
    cause = _root_cause(info.value)
    assert isinstance(cause, OptionError), repr(cause)
    assert _REFUSAL in str(cause) and "use lowering='inductor' or 'eager'" in str(cause)
    assert not report.exists()  # no graph claimed


def test_triton_lowering_without_the_interpreter_in_a_fresh_process():
    """The real condition (conftest sets TRITON_INTERPRET=1 for this process, before triton is imported)."""
    script = textwrap.dedent("""
        import torch
        from llmcompress.errors import OptionError

        compiled = torch.compile(torch.nn.Linear(48, 20), backend="llmcompress", options={"lowering": "triton"})
        try:
            with torch.no_grad():
                compiled(torch.randn(3, 48))
        except Exception as e:
            while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
                e = getattr(e, "inner_exception", None) or e.__cause__
            print(type(e).__name__, e)
        else:
            print("ran")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("OptionError") and _REFUSAL in out.stdout, out.stdout


def test_triton_lowering_reports_what_ran(tmp_path):
    """Where Triton runs (here: the interpreter), the report says triton; a graph that falls back says eager."""
    model, x = NormThenLinear(), torch.randn(2, 7, 48)
    report = tmp_path / "r.json"
    compiled = torch.compile(model, backend="llmcompress", options={"lowering": "triton", "report": str(report)})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    graph = json.loads(report.read_text())["graphs"][0]
    assert graph["lowering"] == "triton" and "fallback" not in graph
    assert any(p["name"] == "fuse-linear-epilogue" and p["status"] == "changed" for p in graph["passes"])
    torch._dynamo.reset()
    fell_back = tmp_path / "fell_back.json"
    compiled = torch.compile(model, backend="llmcompress", options={"lowering": "triton", "report": str(fell_back)})
    with pytest.warns(FallbackWarning, match="gradients are required"):
        torch.testing.assert_close(compiled(x), model(x))  # grad mode on, the parameters require grad
    graph = json.loads(fell_back.read_text())["graphs"][0]
    assert graph["lowering"] == "eager" and "gradients are required" in graph["fallback"]
