"""`run_benchmark`: run a script in benchmarks/ as a user runs it, for the smoke tests of its JSON."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmcompress.testing.fixtures import fixtures_dir

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: object, interpret: bool = False, timeout: int = 900) -> None:
    """python benchmarks/<script> args… from the checkout, with this checkout's package first on PYTHONPATH (the
    script's own folder, benchmarks/, comes first on its sys.path), the fixtures where the tests find them, and
    TRITON_INTERPRET=1 for scripts that run Triton kernels on this CPU; a failure shows the script's stderr."""
    env = {**os.environ, "LLMCOMPRESS_FIXTURES": str(fixtures_dir()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *map(str, args)], check=False, cwd=ROOT, env=env,
                          timeout=timeout, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"benchmarks/{script} exited {done.returncode}:\n{done.stderr[-4000:]}")


@pytest.fixture
def run_benchmark():
    return _run
