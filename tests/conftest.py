"""Test setup: the Triton interpreter on machines without a CUDA GPU (set before anything imports triton)."""

from __future__ import annotations

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")


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
