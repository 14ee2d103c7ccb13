"""Compiled fusion groups: the source cache, the launcher, the `llmcompress::fused` custom op and the registry.

Entry points: `compile_group(nodes) -> FusedKernel`, `get_kernel(key)`, and the op
`torch.ops.llmcompress.fused(key, inputs) -> list[Tensor]` that rewritten graphs call.

Sources are cached on disk (`kernels/` in the cache folder, `cache_dir.cache_root()`: `$LLMCOMPRESS_CACHE_DIR`,
default `~/.cache/llmcompress`) under the sha256 of everything that determines them, and imported from there so
Triton's JIT reads a real file. The op runs the Triton kernel on CUDA, and on the CPU under TRITON_INTERPRET=1 (so CPU
tests exercise the generated code end to end); elsewhere it runs the group's reference GraphModule, which is also its
fake implementation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import operator
import os
import pathlib
import re
import sys
import types
import warnings
from typing import Any

import sympy
import torch
import torch.fx
import triton
from torch._subclasses.fake_tensor import unset_fake_temporarily
from triton.runtime.jit import JITFunction

from llmcompress.cache_dir import cache_root
from llmcompress.codegen.emit import GENERATOR_VERSION, generate
from llmcompress.codegen.group import MAX_REDUCTION_COLS, CodegenError, Group, analyze
from llmcompress.codegen.ops import RULES, val
from llmcompress.cost.roofline import io_bytes, nbytes, numel, register_cost
from llmcompress.version import __version__

aten = torch.ops.aten

# Elements per program: 4096 values keep a 2-D block in registers at 4 warps (32 per thread) and give the Triton
# interpreter blocks large enough that CPU tests stay fast. Not tuned on a GPU yet.
_TILE = 4096
# Column tile of a group without reductions (it need not hold whole rows).
_MAX_TILE_COLS = 1024

_REGISTRY: dict[str, FusedKernel] = {}
_MODULES: dict[str, types.ModuleType] = {}


def default_cache_dir() -> pathlib.Path:
    return cache_root() / "kernels"


def get_kernel(key: str) -> FusedKernel:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"no fused kernel {key!r} in this process: the graph calling it was made by compile_group in "
                       "another process (compiled graphs are not cached across processes)") from None


class Plan:
    """Sizes, strides and launch parameters of one call, computed once per input shapes/strides by running the
    reference on meta tensors (so output shapes and layouts follow aten exactly)."""

    def __init__(self, kernel: FusedKernel, tensors: list[torch.Tensor]) -> None:
        group = kernel.group
        with unset_fake_temporarily():
            metas = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in tensors]
            interp = torch.fx.Interpreter(group.reference, garbage_collect_values=False)
            outs = interp.run(*metas)
            self._vals = {x: interp.env[r] for x, r in group.ref_nodes.items() if r in interp.env}
            alloc = [torch.empty_like(o) for o in outs]
        self.out_shapes = [tuple(a.shape) for a in alloc]
        self.out_strides = [tuple(a.stride()) for a in alloc]
        evaluated = group.evaluated
        lead = [1] * group.rank
        for x in evaluated:
            shape = self.shape(x)[:-1]
            for j, size in enumerate(shape):
                d = group.rank - len(shape) + j
                if size != 1 and lead[d] not in (1, size):
                    raise CodegenError(f"fused kernel {kernel.key}: {x.name} has leading dims {shape}, which do not "
                                       f"broadcast with the group's {tuple(lead)}")
                lead[d] = size if size != 1 else lead[d]
        self.lead = tuple(lead)
        self.rows = math.prod(lead)
        self.max_cols = max(self.cols(x) for x in evaluated)
        # What runs instead of the kernel: "" none, "empty" (no output has elements), "reference" (no rows or no
        # columns to launch over, but an output broadcast over them has elements), or a reason to warn about.
        self.fallback = ""
        if all(0 in s for s in self.out_shapes):
            self.fallback = "empty"
        elif self.rows == 0 or self.max_cols == 0:
            self.fallback = "reference"
        elif group.has_reduction and self.max_cols > MAX_REDUCTION_COLS:
            self.fallback = f"rows of {self.max_cols} columns with a reduction (at most {MAX_REDUCTION_COLS})"
        if self.fallback:
            return
        self.ints = tuple(int(fn(self)) for _, fn in kernel.int_args)
        block_c = triton.next_power_of_2(self.max_cols)
        if not group.has_reduction:
            block_c = min(block_c, _MAX_TILE_COLS)
        block_r = max(1, min(triton.next_power_of_2(self.rows), _TILE // block_c))
        self.blocks = {"BLOCK_R": block_r, "BLOCK_C": block_c,
                       "num_warps": 16 if block_r * block_c >= 16384 else 8 if block_r * block_c >= 8192 else 4}
        self.grid = (triton.cdiv(self.rows, block_r), triton.cdiv(self.max_cols, block_c))

    def meta(self, x: torch.fx.Node) -> torch.Tensor:
        return self._vals[x]

    def shape(self, x: torch.fx.Node) -> tuple[int, ...]:
        return tuple(self._vals[x].shape)

    def common_cols(self, xs: list[torch.fx.Node]) -> int:
        sizes = {x.name: self.cols(x) for x in xs}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"fused kernel: last dims {sizes} were equal when the kernel was compiled; a kernel "
                             "compiled from a static graph needs them equal (compile from a dynamic graph instead)")
        return next(iter(sizes.values()))

    def cols(self, x: torch.fx.Node) -> int:
        s = self._vals[x].shape
        return s[-1] if len(s) else 1



class FusedKernel:
    """One compiled fusion group. `kernel(*tensors)` launches it on tensors like `inputs`' values."""

    def __init__(self, key: str, group: Group, source: str, source_path: pathlib.Path, module: types.ModuleType,
                 int_args: list, name: str) -> None:
        self.key = key
        self.group = group
        self.inputs = list(group.inputs)
        self.outputs = list(group.outputs)
        self.source = source
        self.source_path = source_path
        self.reference = group.reference
        self.module = module
        self.int_args = int_args
        self.name = name
        self.compiled = isinstance(module.fused_kernel, JITFunction)
        self._plans: dict[tuple, Plan] = {}
        self._warned: set[str] = set()
        self.flops = _group_flops(group)
        self.bytes = sum((nbytes(val(x)) for x in group.inputs), sympy.Integer(0)) + \
            sum((nbytes(val(x), stored=False) for x in group.outputs), sympy.Integer(0))

    def __repr__(self) -> str:
        return f"FusedKernel({self.key}, {self.name}, {len(self.inputs)} inputs, {len(self.outputs)} outputs)"

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return self.run(list(tensors))

    def _check_types(self, tensors: list[torch.Tensor]) -> None:
        """ValueError unless the inputs are what the kernel was generated for: count, dtype, rank, one device."""
        if len(tensors) != len(self.inputs):
            raise ValueError(f"fused kernel {self.key}: takes {len(self.inputs)} tensors, got {len(tensors)}")
        device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
        for i, (t, x) in enumerate(zip(tensors, self.inputs)):
            v = val(x)
            if not isinstance(t, torch.Tensor) or t.dtype != v.dtype or t.dim() != v.dim() or t.device != device:
                raise ValueError(f"fused kernel {self.key}: input {i} must be a {v.dim()}-d {v.dtype} tensor on "
                                 f"{device} (as {x.name} it was compiled for), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                                 f"{' on ' + str(t.device) if isinstance(t, torch.Tensor) else ''}")

    def _check(self, tensors: list[torch.Tensor]) -> None:
        self._check_types(tensors)
        for i, (t, x) in enumerate(zip(tensors, self.inputs)):
            for j, s in enumerate(val(x).shape):
                if isinstance(s, int) and s == 1 and t.shape[j] != 1:
                    raise ValueError(f"fused kernel {self.key}: input {i} was compiled with size 1 at dim {j} "
                                     f"(broadcast), got shape {tuple(t.shape)}")

    def plan(self, tensors: list[torch.Tensor]) -> Plan:
        # Checked on every call (a cached plan must not let another dtype through: the generated source is typed),
        # and keyed by all that changes the launch.
        self._check(tensors)
        sig = tuple((t.dtype, t.device, tuple(t.shape), t.stride()) for t in tensors)
        plan = self._plans.get(sig)
        if plan is None:
            plan = self._plans[sig] = Plan(self, tensors)
        return plan

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        plan = self.plan(tensors)
        device = tensors[0].device
        use_triton = device.type != "cpu" or not self.compiled
        if plan.fallback not in ("", "empty") or not use_triton:
            if plan.fallback not in ("", "empty", "reference") and plan.fallback not in self._warned:
                self._warned.add(plan.fallback)
                warnings.warn(f"fused kernel {self.key} ({self.name}): {plan.fallback}; running its aten reference",
                              stacklevel=2)
            return [_fresh(o) for o in self.reference(*tensors)]
        outs = self._outputs(plan, device)
        if plan.fallback == "empty":
            return outs
        self.module.fused_kernel[plan.grid](*tensors, *outs, *plan.ints, **plan.blocks)
        return outs

    def _outputs(self, plan: Plan, device: torch.device) -> list[torch.Tensor]:
        return [torch.empty_strided(s, st, dtype=val(x).dtype, device=device)
                for s, st, x in zip(plan.out_shapes, plan.out_strides, self.outputs)]

    def launch_args(self, tensors: list[torch.Tensor]) -> tuple:
        """(kernel, grid, args, meta-parameters) of the launch `run` makes on these inputs, outputs allocated on
        their device (meta tensors too): what testing/gpu_compile.py compiles ahead of time."""
        plan = self.plan(tensors)
        if plan.fallback:
            raise ValueError(f"fused kernel {self.key}: no kernel launch on these inputs ({plan.fallback})")
        outs = self._outputs(plan, tensors[0].device)
        return self.module.fused_kernel, plan.grid, (*tensors, *outs, *plan.ints), dict(plan.blocks)

    def fake(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the op returns, on fake (or meta) tensors: fresh tensors in the layout of aten's results. Inputs the
        kernel would refuse are refused here too, while tracing (sizes are not compared: they may be symbolic)."""
        self._check_types(tensors)
        return [torch.empty_like(o) for o in self.reference(*tensors)]


def _fresh(o: torch.Tensor) -> torch.Tensor:
    """The reference's result as a new tensor in the layout `fake` promises (a custom op may not return an alias)."""
    out = torch.empty_like(o)
    out.copy_(o)
    return out


def _group_flops(group: Group) -> Any:
    """Elementwise work of the group as the roofline counts it: one FLOP per output element of a pointwise op, one
    per input element of a reduction, nothing for views and copies."""
    total = sympy.Integer(0)
    for n in group.nodes:
        if n in group.load_base or n in group.identity_views or n in group.column_slices or \
                n.target is operator.getitem:
            continue
        kind = RULES[n.target].kind
        if kind in ("reduction", "multi"):
            total += numel(val(n.args[0]))
        elif kind == "pointwise" and n.target not in (aten._to_copy.default, aten.clone.default):
            total += numel(val(n))
    return total


def _versions() -> str:
    return f"torch={torch.__version__} triton={triton.__version__} llmcompress={__version__} " \
        f"generator={GENERATOR_VERSION}"


def _load(key: str, path: pathlib.Path) -> types.ModuleType:
    if key in _MODULES:
        return _MODULES[key]
    name = f"llmcompress_fused_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _MODULES[key] = module
    return module


def _write_once(path: pathlib.Path, text: str) -> None:
    """Write `text` unless the file already holds it (atomically: concurrent compiles may race)."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _default_name(group: Group) -> str:
    ops = [RULES[n.target].kind != "view" and n.target.overloadpacket.__name__ for n in group.nodes
           if n.target is not operator.getitem and n not in group.load_base]
    name = "_".join(dict.fromkeys(o.strip("_") for o in ops if o))
    return name[:48].rstrip("_") or "fused"


def compile_group(nodes: list[torch.fx.Node], *, name_hint: str = "", dump_dir: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None) -> FusedKernel:
    """Generate, cache, import and register the Triton kernel computing a fusion group.

    nodes: call_function nodes of one graph forming a group; inputs of the group are the nodes outside it they read
    (kernel arguments, in order of first use), outputs the group nodes read outside it. Raises `CodegenError` with the
    reason when the group cannot be generated. `dump_dir` receives a readable copy of the source
    (`fused_003_<name>.py`, headed by the FX nodes it came from).
    """
    group = analyze(list(nodes))
    gen = generate(group)
    signature = [(str(val(x).dtype), val(x).dim(), tuple(isinstance(s, int) and s == 1 for s in val(x).shape))
                 for x in group.inputs]
    device = {val(x).device.type for x in group.inputs + group.outputs}
    material = "\n".join([gen.source, group.reference.code, repr(signature), repr(sorted(device)), _versions()])
    key = hashlib.sha256(material.encode()).hexdigest()[:32]
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"fused_{key}.py"
    _write_once(path, gen.source)
    module = _load(key, path)
    name = re.sub(r"\W", "_", name_hint) or _default_name(group)
    kernel = FusedKernel(key, group, gen.source, path, module, gen.int_args, name)
    _REGISTRY[key] = kernel
    if dump_dir is not None:
        _dump(kernel, pathlib.Path(dump_dir))
    return kernel


def _dump(kernel: FusedKernel, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    taken = {int(m.group(1)) for p in folder.glob("fused_*.py") if (m := re.match(r"fused_(\d+)_", p.name))}
    index = max(taken, default=-1) + 1
    header = [f"# key {kernel.key}; cached at {kernel.source_path}", "# FX nodes:"]
    header += [f"#   {n.format_node()}" for n in kernel.group.nodes]
    header += [f"# inputs: {', '.join(x.name for x in kernel.inputs)}",
               f"# outputs: {', '.join(x.name for x in kernel.outputs)}", ""]
    path = folder / f"fused_{index:03d}_{kernel.name}.py"
    path.write_text("\n".join(header) + kernel.source)
    return path


@torch.library.custom_op("llmcompress::fused", mutates_args=())
def _fused_op(key: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return get_kernel(key).run(list(inputs))


@_fused_op.register_fake
def _fused_fake(key: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return get_kernel(key).fake(list(inputs))


@register_cost(torch.ops.llmcompress.fused.default)
def _fused_cost(node: torch.fx.Node) -> tuple[Any, Any]:
    """The group's elementwise FLOPs; its inputs read once and outputs written once."""
    kernel = _REGISTRY.get(node.args[0])
    return (kernel.flops if kernel is not None else 0), io_bytes(node)
