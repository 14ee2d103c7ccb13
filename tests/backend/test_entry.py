"""The backend is found by name without importing llmcompress; the compile report counts graphs, breaks, recompiles."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch


def test_found_by_name_without_import(tmp_path):
    # Random x and a random (N, K) = (3, 4) frozen weight: a transposed, permuted or misplaced operand changes the
    # result (with all-ones inputs every such error gives the same numbers), checked against float64.
    report = tmp_path / "r.json"
    code = textwrap.dedent(f"""
        import sys, torch
        assert "llmcompress" not in sys.modules
        torch.manual_seed(0)
        linear, x = torch.nn.Linear(4, 3, bias=False).eval(), torch.randn(2, 4)
        f = torch.compile(linear, backend="llmcompress", options={{"lowering": "eager", "report": {str(report)!r}}})
        with torch.no_grad():
            out = f(x)
        torch.testing.assert_close(out.double(), x.double() @ linear.weight.double().T, atol=1e-6, rtol=1e-6)
        assert "llmcompress" in sys.modules
        assert "llmcompress" in torch._dynamo.list_backends()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    (graph,) = json.loads(report.read_text())["graphs"]
    assert graph["passes"][0]["name"] == "canonicalize" and graph["passes"][0]["stats"]["linear"] == 1


def test_registered_on_import():
    from torch._dynamo.backends.registry import lookup_backend

    import llmcompress  # noqa: F401

    assert lookup_backend("llmcompress") is llmcompress.llmcompress_backend


def test_backend_rejects_unknown_keyword():
    from llmcompress import OptionError, llmcompress_backend

    with pytest.raises(OptionError, match="unexpected argument 'dynamic'"):
        llmcompress_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [torch.ones(1)], dynamic=True)


def _graph_break(x):
    x = torch.sin(x) + 1
    torch._dynamo.graph_break()
    return torch.cos(x) * 2


def test_report_counts_graph_breaks_and_recompiles(tmp_path):
    report = tmp_path / "sub" / "report.json"
    f = torch.compile(_graph_break, backend="llmcompress", options={"lowering": "eager", "report": str(report)})
    with torch.no_grad():
        for n in (3, 5, 7):
            torch.testing.assert_close(f(torch.ones(n)), _graph_break(torch.ones(n)))
    data = json.loads(report.read_text())
    assert data["summary"]["graphs"] == 4  # two graphs per break, compiled static then dynamic
    assert data["summary"]["graph_breaks"] == 2
    assert data["summary"]["recompiles"] == 2
    assert {"device", "versions", "graphs", "report_version"} <= set(data)
    first = data["graphs"][0]
    assert first["graph_break"] and "graph_break" in first["graph_break_reason"]
    assert first["passes"][0]["name"] == "canonicalize" and first["passes"][0]["status"] == "unchanged"
    for key in ("compile_id", "frame", "lowering", "compile_time_s", "nodes_in", "nodes_out", "frozen_weights"):
        assert key in first, key


def test_debug_logging(caplog):
    with caplog.at_level(logging.DEBUG, logger="llmcompress"):
        f = torch.compile(lambda x: x * 2, backend="llmcompress", options={"lowering": "eager"})
        with torch.no_grad():
            f(torch.ones(2))
    assert any("pass canonicalize" in r.getMessage() for r in caplog.records)


def test_log_env_switch():
    code = "import llmcompress, logging; print(logging.getLogger('llmcompress').level)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "LLMCOMPRESS_LOG": "debug"})
    assert result.stdout.strip() == str(logging.DEBUG), result.stderr[-2000:]
