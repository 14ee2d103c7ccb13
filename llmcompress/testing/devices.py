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


def dots_on_stored_dtype(monkeypatch) -> list[str]:
    """Launch the linear kernels with UPCAST off, so tl.dot takes fp16 operands as loaded (a GPU's tensor-core
    numerics) under the interpreter too, which otherwise upcasts them to fp32 (`linear_common.dot_fp32`). Only
    for fp16: the Triton 3.9 interpreter multiplies bf16 operands as their raw bits.

    Returns:
        The names of the kernels launched from then on, in order.
    """
    from llmcompress.kernels import linear_common

    launched: list[str] = []
    launch = linear_common.launch

    def launch_without_upcast(kernel, tuned, grid, args, interp_config, **constexprs):
        launched.append(kernel.__name__)
        launch(kernel, tuned, grid, args, interp_config, **{**constexprs, "UPCAST": False})

    monkeypatch.setattr(linear_common, "launch", launch_without_upcast)
    return launched
