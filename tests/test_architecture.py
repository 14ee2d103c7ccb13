"""The one-way layering of `llmcompress/` (pyproject.toml's import-linter contracts, docs/architecture.md): the
contracts hold, no module imports itself through others, and the check does fail on a back-edge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    # import-linter's `lint-imports` command, run by this interpreter (whatever its scripts folder is on PATH).
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, "--no-cache", "--config", "pyproject.toml"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("llmcompress", exclude_type_checking_imports=False, cache_dir=None)
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if not imported.startswith(module + "."):  # a package re-exporting its own children is no cycle
                edges.add_edge(module, imported)
    cycles = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert cycles == []


@pytest.mark.parametrize("module, back_edge", [
    ("cost/roofline.py", "from llmcompress.passes.base import Pass"),        # a service importing a pass
    ("passes/quantize/gptq.py", "from llmcompress.passes.fusion import fold"),  # one family importing another
    ("kernels/rms_norm.py", "import llmcompress.backend.pipeline"),            # below the backend, importing it
])
def test_a_back_edge_breaks_the_contract(tmp_path, module, back_edge):
    shutil.copytree(ROOT / "llmcompress", tmp_path / "llmcompress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "llmcompress" / module
    path.write_text(path.read_text() + f"\n\ndef _back_edge():\n    {back_edge}\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout or "broken" in result.stdout
