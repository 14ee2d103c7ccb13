"""`verify=True`: run the compiled and the uncompiled graph on the example inputs and compare the outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from llmcompress.config import CompileConfig
from llmcompress.errors import VerificationError


def _fresh(inputs: list[Any]) -> list[Any]:
    """Clones of the inputs that a graph may write (caches); parameters are shared, never written."""
    return [
        x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)
        else x.node.hint if isinstance(x, torch.SymInt) else x
        for x in inputs
    ]


def compare(reference: torch.fx.GraphModule, compiled: Callable[..., Any], example_inputs: list[Any],
            config: CompileConfig) -> dict[str, Any]:
    with torch.no_grad():
        expected = pytree.tree_leaves(reference(*_fresh(example_inputs)))
        actual = pytree.tree_leaves(compiled(*_fresh(example_inputs)))
    if len(expected) != len(actual):
        raise VerificationError(f"verify: compiled graph returned {len(actual)} outputs, expected {len(expected)}")
    worst = 0.0
    for i, (e, a) in enumerate(zip(expected, actual)):
        if not isinstance(e, torch.Tensor):
            if e != a:
                raise VerificationError(f"verify: output {i} is {a!r}, expected {e!r}")
            continue
        if e.shape != a.shape or e.dtype != a.dtype:
            raise VerificationError(
                f"verify: output {i} has shape {tuple(a.shape)} {a.dtype}, expected {tuple(e.shape)} {e.dtype}")
        if not e.is_floating_point():
            if not torch.equal(e, a):
                raise VerificationError(f"verify: output {i} ({e.dtype}) differs from the uncompiled graph")
            continue
        atol, rtol = config.tolerance(str(e.dtype).removeprefix("torch."))
        diff = (a.double() - e.double()).abs()
        allowed = atol + rtol * e.double().abs()
        excess = (diff - allowed).max().item() if diff.numel() else 0.0
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
        if excess > 0:
            raise VerificationError(
                f"verify: output {i} differs from the uncompiled graph: max abs diff {diff.max().item():.3g} beyond "
                f"atol={atol:g}, rtol={rtol:g} ({int((diff > allowed).sum())} of {diff.numel()} elements)")
    return {"outputs": len(expected), "max_abs_diff": worst}
