"""`llmcompress_backend`: what `torch.compile(model, backend="llmcompress", mode=..., options=...)` calls."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from llmcompress.backend.pipeline import GraphHook, compile_graph
from llmcompress.config import CompileConfig
from llmcompress.errors import OptionError


def llmcompress_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                        options: Mapping[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """Dynamo backend: validate the options, then compile one graph (`backend/pipeline.py`)."""
    return _backend(gm, example_inputs, mode, options, kwargs, None)


def make_backend(on_graph: GraphHook | None = None) -> Callable[..., Callable[..., Any]]:
    """The llmcompress backend with a hook: ``torch.compile(model, backend=make_backend(on_graph=f), options=...)``
    calls ``f(before, after, ctx)`` for each graph with the captured aten graph before and after the passes and the
    `PassContext` they ran with. Cost reports read the graphs this way; the hook changes nothing it is shown."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                options: Mapping[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
        return _backend(gm, example_inputs, mode, options, kwargs, on_graph)

    return backend


def _backend(gm, example_inputs, mode, options, kwargs, on_graph):
    if kwargs:
        raise OptionError(f"llmcompress backend: unexpected argument {next(iter(kwargs))!r}; it takes mode= and options=")
    config = CompileConfig.from_options(options, mode)
    return compile_graph(gm, list(example_inputs), config, on_graph)


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
