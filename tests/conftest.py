"""Test setup: the Triton interpreter on machines without a CUDA GPU (set before anything imports triton)."""

from __future__ import annotations

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")

# Under pytest-xdist (the README's `-n auto`) every worker would otherwise start one intra-op thread per core, so two
# workers on 2 cores ran 4 busy threads; a share of the cores each keeps them from preempting one another.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, and compile reports do not leak between tests."""
    from llmcompress.backend.compile_report import reset_reports

    torch._dynamo.reset()
    reset_reports()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Generated kernels and derived weights go to a temporary cache folder, never the user's ~/.cache; one per
    test, so that a test counting calibration runs never loads what another test's same-seed model wrote."""
    monkeypatch.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("llmcompress-cache")))
    monkeypatch.delenv("LLMCOMPRESS_DISK_CACHE", raising=False)


@pytest.fixture
def cpu_only_seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def reduced_gpu_rows(tmp_path_factory):
    """rows(families): `llmcompress.testing.gpu_compile.run_reduced`'s rows, compiled once per test run. Under
    pytest-xdist a module's tests land on both workers, and its module-scoped fixture compiled the whole reduced set
    on each (two 40-60 s compiles of the same kernels); the workers now share one result through a file in the run's
    shared temp folder, named by the run's id and guarded by a lock. Skips where the compile cannot run here."""
    import json

    from filelock import FileLock

    from llmcompress.testing.gpu_compile import run_reduced, unsupported

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")

    def rows(families: str) -> list[dict]:
        if unsupported():
            pytest.skip(unsupported())
        if run_id is None:  # one process: a module-scoped fixture already compiles once
            return run_reduced(families, tmp_path_factory.mktemp("gpu_compile"))
        out = tmp_path_factory.getbasetemp().parent / f"gpu_compile-{run_id}-{families}.json"
        with FileLock(f"{out}.lock"):
            if not out.is_file():
                out.write_text(json.dumps(run_reduced(families, tmp_path_factory.mktemp("gpu_compile"))))
        return json.loads(out.read_text())

    return rows
