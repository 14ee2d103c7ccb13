"""Lowering of a graph the `early-exit` pass split (`gm.meta["llmcompress.split"]`, `passes/early_exit/split.py`):
each piece is lowered as any graph is (Inductor, eager or Triton), and the returned callable chooses between them
at run time: segment 1, then skip 1 if its gate is open, else segment 2 … else the rest.

The choice reads each gate on the host (one `bool()` per exit reached per decode step), so this form is not captured
in a CUDA graph as one piece: with `mode="reduce-overhead"` each piece may be, the choice between them is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from llmcompress.errors import LLMCompressError
from llmcompress.passes.early_exit.split import META_KEY, Branches, graph_signature


def split_of(gm: torch.fx.GraphModule) -> Branches | None:
    """The pieces the early-exit pass cut `gm` into, or None; raises when a later pass changed the graph."""
    branches = gm.meta.get(META_KEY)
    if branches is None:
        return None
    if branches.signature != graph_signature(gm):
        raise LLMCompressError("early-exit: the graph changed after the pass cut it into pieces (a pass edited the graph "
                               "instead of its pieces)")
    return branches


def _own_tracing_context() -> Any:
    """A fresh tracing context on the same fake mode: Inductor records a graph's output strides in the current
    one, once per context, so every piece but the last compiles in its own."""
    tracing = torch._guards.TracingContext.try_get()
    if tracing is None:
        return contextlib.nullcontext()
    return torch._guards.tracing(torch._guards.TracingContext(tracing.fake_mode))


def lower_branches(branches: Branches, lower_one: Callable[[torch.fx.GraphModule, Sequence[Any]], Callable[[list], Any]]
                   ) -> Callable[[list], Any]:
    """A boxed callable over the graph's placeholders that runs the pieces (each lowered by `lower_one`)."""
    for piece in [*branches.segments, *branches.skips]:
        with _own_tracing_context():
            piece.fn = lower_one(piece.gm, piece.example_inputs())
    # the rest returns the graph's outputs as the whole graph would: it records their strides in Dynamo's context
    branches.rest.fn = lower_one(branches.rest.gm, branches.rest.example_inputs())
    segments, skips, rest = branches.segments, branches.skips, branches.rest
    names, counts = branches.placeholders, branches.counts

    def call(piece, env: dict[str, Any]) -> Any:
        return piece.fn([env[n] for n in piece.inputs])

    def run(args: list) -> Any:
        env = dict(zip(names, args))
        args.clear()
        for exit_layer, seg, skip in zip(branches.exits, segments, skips):
            out = call(seg, env)
            env.update(zip(seg.outputs, out))
            if bool(out[-1]):
                counts[exit_layer] = counts.get(exit_layer, 0) + 1
                return call(skip, env)
        counts[0] = counts.get(0, 0) + 1
        return call(rest, env)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
