"""The compile report: what the backend did to each graph Dynamo handed it, written as JSON to `options["report"]`.

One report per path accumulates every graph compiled with that option in this process (graph breaks give several
graphs, recompiles give new versions of one), and is rewritten after each graph so that it is complete at any time.
Keys are documented in docs/architecture.md ("The compile report").
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPORT_VERSION = 1
_REPORTS: dict[str, CompileReport] = {}
_LOCK = threading.Lock()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "llmcompress"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    return out


class CompileReport:
    def __init__(self, path: str) -> None:
        self.path = path
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.graphs: list[dict[str, Any]] = []

    def add_graph(self, entry: dict[str, Any]) -> None:
        with _LOCK:
            self.graphs.append(entry)
            self.write()

    def summary(self) -> dict[str, Any]:
        return {
            "graphs": len(self.graphs),
            "graph_breaks": sum(1 for g in self.graphs if g.get("graph_break")),
            "recompiles": sum(1 for g in self.graphs if g.get("recompile")),
            "fallbacks": sum(1 for g in self.graphs if g.get("fallback")) + sum(
                1 for g in self.graphs for p in g.get("passes", []) if p["status"] == "failed"
            ),
            "compile_time_s": round(sum(g.get("compile_time_s", 0.0) for g in self.graphs), 4),
        }

    def to_json(self) -> dict[str, Any]:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        return {
            "report_version": REPORT_VERSION,
            "created": self.created,
            "device": device,
            "versions": _versions(),
            "summary": self.summary(),
            "graphs": self.graphs,
        }

    def write(self) -> None:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        tmp.replace(path)


def report_for(path: str | None) -> CompileReport | None:
    """The report accumulating at `path` in this process (None when no report was asked for)."""
    if path is None:
        return None
    key = os.path.abspath(path)
    with _LOCK:
        if key not in _REPORTS:
            _REPORTS[key] = CompileReport(key)
        return _REPORTS[key]


def reset_reports() -> None:
    """Forget accumulated reports (the next graph starts a fresh file); for tests and long-lived processes."""
    with _LOCK:
        _REPORTS.clear()


def dynamo_graph_info(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """Compile id, frame and graph-break reason Dynamo attached to its graph (absent outside Dynamo)."""
    compile_id = gm.meta.get("dynamo_compile_id") or torch._guards.CompileContext.current_compile_id()
    info: dict[str, Any] = {"compile_id": str(compile_id) if compile_id is not None else None}
    if compile_id is not None:
        info["recompile"] = getattr(compile_id, "frame_compile_id", 0) > 0
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None:
        info["graph_break"] = bool(reason.graph_break)
        if reason.graph_break:
            info["graph_break_reason"] = str(reason.reason).split("\n")[0]
        stack = getattr(reason, "user_stack", None) or []
        if stack:
            info["frame"] = f"{stack[-1].name} ({os.path.basename(stack[-1].filename)}:{stack[-1].lineno})"
    return info
