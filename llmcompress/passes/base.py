"""The pass API: `Pass`, its `PassResult`, and the `PassContext` every pass receives.

A pass rewrites the captured, functional aten-level graph in place (`gm.graph`) and returns a `PassResult`.
Rules every pass keeps are in `passes/README.md`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llmcompress import options as _options
from llmcompress.passes.weights import DerivedKey
from llmcompress.version import __version__

if TYPE_CHECKING:
    from llmcompress.calibration.service import Calibration
    from llmcompress.config import CompileConfig
    from llmcompress.cost.hardware import Hardware
    from llmcompress.passes.weights import FrozenWeights


SPLIT_KEY = "llmcompress.split"
"""`gm.meta[SPLIT_KEY]`: what a pass cut `gm` into (the early-exit cascade's `Branches`; any object whose `graphs()`
lists the pieces' GraphModules). The passes after it run on each piece (`PassManager.run`) and lowering lowers the
pieces, so `gm` itself stays the graph they were cut from."""


def split_graphs(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule] | None:
    """The pieces a pass cut `gm` into, or None."""
    split = gm.meta.get(SPLIT_KEY)
    return None if split is None else list(split.graphs())


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
    calibration: Calibration | None = None
    """This graph's calibration data and the runs on it (`calibration/service.py`): feeds, the sequential run with
    the float shadow, activation statistics, hidden states, MoE routing. None only where no backend built one."""
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("llmcompress.passes"))
    pipeline: tuple[str, ...] = ()
    """The names of the passes this graph runs, in order (set by `PassManager.run`): a pass that lowers differently
    when another follows (lowrank-split keeps plain linears for quantize-linear) reads it here."""


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
        """Hash of this pass's name, options and the source of its module and of every llmcompress module that one
        imports, transitively (`source_digest`): what the pass computes can change with any of them (a quantizing
        pass calls its helpers and formats). The root of every key of what is cached from its output."""
        module = type(self).__module__
        sources = source_digest(module) if module_file(module) else type(self).__qualname__
        payload = json.dumps(
            {"name": self.name, "options": _options.as_dict(self.options), "version": getattr(self.Options, "version", 1),
             "sources": sources, "llmcompress": __version__},
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def cache_key(self, *parts: Hashable) -> DerivedKey:
        """The key of a weight this pass derives (`ctx.weights.derive(node, self.cache_key(...), fn)`): its
        `uuid()` and `parts`, plain values (numbers, strings, dtypes, tuples of them) telling one derived weight of
        the pass from another. The only key `FrozenWeights.derive` and `cached` take."""
        return DerivedKey(self.uuid(), tuple(parts), name=self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


# --- the sources a pass's result depends on ---------------------------------------------------------------------

_ROOT = "llmcompress"
# module name -> (file, is package) or None when it is not a module with a Python source; fixed within a process.
_FILES: dict[str, tuple[str, bool] | None] = {}
# file -> ((mtime_ns, size), digest of its source, the llmcompress modules it imports): re-read when the file changes.
_PARSED: dict[str, tuple[tuple[int, int], str, frozenset[str]]] = {}


def module_file(name: str) -> tuple[str, bool] | None:
    """(source file, is a package) of module `name`, or None when it has no Python source (or is no module)."""
    if name not in _FILES:
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None) if module is not None else None
        if spec is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError, AttributeError):  # `pkg.module.attr`, or a parent that fails to import
                spec = None
        origin = getattr(spec, "origin", None)
        _FILES[name] = (origin, spec.submodule_search_locations is not None) \
            if origin and origin.endswith(".py") else None
    return _FILES[name]


def _ours(name: str | None) -> bool:
    return bool(name) and (name == _ROOT or name.startswith(_ROOT + "."))


# An import statement at the start of a line: `from <base> import <names>` (names maybe in parentheses over several
# lines) or `import <modules>`. A regex rather than `ast.parse`, which costs tens of ms a file; an import spelled in
# a docstring counts too, which only makes the key cover more.
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)|import[ \t]+([^\n#;]*))",
                     re.MULTILINE)


def _imported(name: str, source: str, is_package: bool) -> frozenset[str]:
    """The llmcompress modules `source` (module `name`) imports anywhere: at the top, in functions (lazy imports),
    under TYPE_CHECKING. `from a import b` names module `a.b` when that is a module, else `a`."""
    out: set[str] = set()
    for base, names, modules in _IMPORT.findall(source.replace("\\\n", " ")):
        if modules:
            out.update(m for m in (part.split()[0] for part in modules.split(",") if part.strip()) if _ours(m))
            continue
        level = len(base) - len(base.lstrip("."))
        if level:  # relative: from the module's package, one level up per extra dot
            package = name if is_package else name.rpartition(".")[0]
            for _ in range(level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base[level:]}" if base[level:] else package
        if not _ours(base):
            continue
        for part in names.strip("()").split(","):
            a = part.split()[0] if part.strip() else ""
            if a:
                sub = f"{base}.{a}"
                out.add(sub if a != "*" and module_file(sub) is not None else base)
    return frozenset(out)


def _parsed(name: str) -> tuple[str, frozenset[str]] | None:
    """(digest of module `name`'s source, the llmcompress modules it imports), read again when its file changed."""
    found = module_file(name)
    if found is None:
        return None
    path, is_package = found
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    entry = _PARSED.get(path)
    if entry is None or entry[0] != stamp:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        entry = (stamp, hashlib.sha256(source.encode()).hexdigest(), _imported(name, source, is_package))
        _PARSED[path] = entry
    return entry[1], entry[2]


def module_dependencies(name: str) -> dict[str, str]:
    """{module: digest of its source} for module `name` and every llmcompress module it imports, transitively."""
    out: dict[str, str] = {}
    todo = [name]
    while todo:
        m = todo.pop()
        if m in out:
            continue
        parsed = _parsed(m)
        if parsed is None:
            continue
        out[m] = parsed[0]
        todo.extend(i for i in parsed[1] if i not in out)
    return out


def source_digest(name: str) -> str:
    """One hash of the sources of module `name` and of every llmcompress module it imports, transitively."""
    deps = module_dependencies(name)
    return hashlib.sha256(json.dumps(sorted(deps.items())).encode()).hexdigest()
