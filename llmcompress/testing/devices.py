"""Where the kernel tests can run: on a CUDA GPU, or on CPU through the Triton interpreter.

Import after tests/conftest.py has run: it sets TRITON_INTERPRET=1 on machines without a CUDA GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"

needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a CUDA GPU or TRITON_INTERPRET=1")
needs_compiled_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU without TRITON_INTERPRET")
