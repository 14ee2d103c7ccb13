"""The backend is found by name without importing llmcompress; the compile report counts graphs, breaks, recompiles."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch


def test_found_by_name_without_import():
    code = textwrap.dedent("""
        import sys, torch
        assert "llmcompress" not in sys.modules
        f = torch.compile(lambda x: torch.nn.functional.linear(x, torch.ones(3, 4)), backend="llmcompress",
                          options={"lowering": "eager"})
        with torch.no_grad():
            out = f(torch.ones(2, 4))
        assert torch.equal(out, torch.full((2, 3), 4.0)), out
        assert "llmcompress" in sys.modules
        assert "llmcompress" in torch._dynamo.list_backends()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


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
