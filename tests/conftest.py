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


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache_dir(tmp_path_factory):
    """Generated kernels go to a temporary cache folder, never the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("llmcompress-cache")))
    yield
    patch.undo()


@pytest.fixture
def cpu_only_seed():
    torch.manual_seed(0)
