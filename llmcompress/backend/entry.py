"""`llmcompress_backend`: what `torch.compile(model, backend="llmcompress", mode=..., options=...)` calls."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import CompileConfig
from ..errors import OptionError
from .pipeline import compile_graph


def llmcompress_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                        options: Mapping[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """Dynamo backend: validate the options, then compile one graph (`backend/pipeline.py`)."""
    if kwargs:
        raise OptionError(f"llmcompress backend: unexpected argument {next(iter(kwargs))!r}; it takes mode= and options=")
    config = CompileConfig.from_options(options, mode)
    return compile_graph(gm, list(example_inputs), config)


def register() -> None:
    """Register the backend name with Dynamo, unless Dynamo is about to load it from our entry point."""
    from torch._dynamo.backends import registry

    pending = getattr(registry, "_BACKENDS", {}).get("llmcompress")
    if "llmcompress" in getattr(registry, "_COMPILER_FNS", {}) or pending is not None:
        return
    try:
        registry.register_backend(llmcompress_backend, name="llmcompress")
    except AssertionError:  # registered meanwhile (duplicate name): nothing to do
        pass
