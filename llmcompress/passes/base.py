"""The pass API: `Pass`, its `PassResult`, and the `PassContext` every pass receives.

A pass rewrites the captured, functional aten-level graph in place (`gm.graph`) and returns a `PassResult`.
Rules every pass keeps are in `passes/README.md`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llmcompress import options as _options

if TYPE_CHECKING:
    from llmcompress.config import CompileConfig
    from llmcompress.cost.hardware import Hardware
    from llmcompress.passes.weights import FrozenWeights


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""

    version: ClassVar[int] = 1


@dataclasses.dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Counters of what the pass did and why it skipped (``{"linear": 14, "skipped: dynamic weight": 1}``)."""
    decisions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per-node decisions with their reasons, copied into the compile report."""


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the graph."""

    example_inputs: Sequence[Any]
    """Fake values (FakeTensor / SymInt) of the graph's placeholders, in order."""
    weights: FrozenWeights
    """The frozen constants of this graph and the cache of weights derived from them."""
    hardware: Hardware
    config: CompileConfig
    fake_mode: Any
    """The FakeTensorMode the graph's `node.meta["val"]` live in; run shape logic under it."""
    graph_id: str = "0"
    cost_model: Any = None
    """The roofline `cost.roofline.CostModel` for `hardware` (with the device's calibration profile if stored)."""
    sizes: dict[Any, Any] = dataclasses.field(default_factory=dict)
    """Symbol -> value in the example inputs: `ctx.cost_model.estimate(node, ctx.sizes)` costs a node there."""
    input_names: list[str] = dataclasses.field(default_factory=list)
    """A name per placeholder: Dynamo's (`L_input_ids_`, `s0`) or, for a buffer the graph writes, its module path."""
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("llmcompress.passes"))


class Pass:
    """Base of every pass. Subclass, set the class attributes, implement `run`, decorate with `@register_pass`.

    Class attributes:
        name: kebab-case registry name (``"quantize-linear"``).
        description: one line shown by ``llmcompress passes`` and in reports.
        Options: a frozen dataclass of typed options (validated from the recipe's dict), with a ``version``
            ClassVar to bump when the meaning of the options changes.
        after / before: names of passes this one must run after / before when both are in a pipeline.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None) -> None:
        if isinstance(options, self.Options):
            self.options = options
        else:
            self.options = _options.build(self.Options, options, f"pass {self.name!r}")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def uuid(self) -> str:
        """Hash of this pass's source and options: the key for anything cached from its output."""
        try:
            source = inspect.getsource(inspect.getmodule(type(self)) or type(self))
        except (OSError, TypeError):
            source = type(self).__qualname__
        payload = json.dumps(
            {"name": self.name, "options": _options.as_dict(self.options), "version": getattr(self.Options, "version", 1)},
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha256((source + payload).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
