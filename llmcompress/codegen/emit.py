"""Group -> Triton source text, by expression inlining.

Entry point: `generate(group) -> Generated` (the module source and the run-time integer arguments it takes).

The row model: a group is evaluated over rows x columns. Columns index each node's last dim; rows are the product of
the group's leading dims (every node's leading dims right-aligned and broadcast; a size-1 or missing dim has stride
0). One program handles BLOCK_R rows and BLOCK_C columns; when the group reduces, BLOCK_C covers the whole row and
`tl.sum`/`tl.max` over the column axis give one value per row, broadcast back along the columns.

`Emitter.value(node, cols)` returns a Triton variable of shape (BLOCK_R, BLOCK_C) (or broadcastable to it) holding the
node at those columns, memoized per (node, columns). Loads use each input's run-time strides and offset (views of an
input are folded into its load), so views, transposes and broadcast inputs need no copy; slice and cat of the last
dim are column arithmetic. Every size is a run-time argument: the source depends on ranks, dtypes and which dims are
statically 1, never on sizes, so dynamic shapes reuse it with a new BLOCK_C at most.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from llmcompress.codegen.group import Group, static_one
from llmcompress.codegen.ops import RULES, TL_DTYPE, bind, compute_dtype, op_name, tl_compute
from llmcompress.fx_utils import val

GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ColVar:
    """A column index: the name of a (1, BLOCK_C) Triton variable, or '' for column 0 (a broadcast last dim)."""

    name: str
    may_be_negative: bool = False


ZERO = ColVar("")
BASE = ColVar("cols")

IntArg = Callable[[Any], int]
"""Computes one run-time integer argument from a `runtime.Plan` (the sizes and strides of one call)."""


@dataclasses.dataclass
class Generated:
    source: str
    int_args: list[tuple[str, IntArg]]
    ops: list[str]


# Helpers the kernel may call. On a GPU they are libdevice's; the Triton interpreter cannot call libdevice, so CPU
# tests use plain-tl versions accurate to a few float32 ulps.
_HELPERS = {
    "_round_bf16": ("""\
    @triton.jit
    def _round_bf16(x):
        return x.to(tl.bfloat16).to(tl.float32)
""", """\
    @triton.jit
    def _round_bf16(x):
        # Round to nearest even on the bits: the interpreter's float32 -> bfloat16 cast truncates.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, r.to(tl.float32, bitcast=True))
"""),
    "_tanh": ("""\
    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)
""", """\
    @triton.jit
    def _tanh(x):
        # Odd Taylor series below 0.55 (terms fall by (2x/pi)^2 < 0.13), (1 - e^-2|x|) / (1 + e^-2|x|) above.
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        x2 = x * x
        p = -929569.0 / 638512875.0
        p = p * x2 + 21844.0 / 6081075.0
        p = p * x2 - 1382.0 / 155925.0
        p = p * x2 + 62.0 / 2835.0
        p = p * x2 - 17.0 / 315.0
        p = p * x2 + 2.0 / 15.0
        p = p * x2 - 1.0 / 3.0
        small = x + x * x2 * p
        return tl.where(ax < 0.55, small, tl.where(x < 0, -big, big))
"""),
    "_pow": ("""\
    @triton.jit
    def _pow(x, y):
        return libdevice.pow(x, y)
""", """\
    @triton.jit
    def _pow(x, y):
        # exp(y log|x|), negative x only for integral y (NaN otherwise, as pow).
        ay = tl.abs(y)
        r = tl.exp(y * tl.log(tl.abs(x)))
        odd = tl.floor(ay * 0.5) * 2.0 != ay
        r = tl.where((x < 0) & odd, -r, r)
        r = tl.where((x < 0) & (tl.floor(y) != y), float("nan"), r)
        return tl.where(y == 0, 1.0, r)
"""),
}


class Emitter:
    def __init__(self, group: Group) -> None:
        self.group = group
        self.lines: list[str] = []
        self.memo: dict[Any, Any] = {}
        self.int_args: dict[str, IntArg] = {}
        self.col_groups: dict[str, list[torch.fx.Node]] = {}
        self.counter = 0
        self.index = {n: i for i, n in enumerate(group.nodes)}
        self.input_index = {x: i for i, x in enumerate(group.inputs)}

    # -- small builders ------------------------------------------------------------------------------------------

    def tmp(self, expr: str, prefix: str = "t") -> str:
        name = f"{prefix}{self.counter}"
        self.counter += 1
        self.lines.append(f"{name} = {expr}")
        return name

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def int_arg(self, name: str, fn: IntArg) -> str:
        self.int_args.setdefault(name, fn)
        return name

    def node_id(self, x: torch.fx.Node) -> str:
        return f"x{self.input_index[x]}" if x in self.input_index else f"n{self.index[x]}"

    def literal(self, v: Any, dtype: torch.dtype, tensor: bool = False) -> str:
        """A python scalar as a value of `dtype`'s compute type (a (1, 1) tensor when `tensor` or when a python
        literal would be typed narrower than the compute type)."""
        cdt = compute_dtype(dtype)
        if cdt is torch.bool:
            return f"tl.full((1, 1), {int(bool(v))}, tl.int1)"
        if cdt.is_floating_point:
            f = float(v)
            text = repr(f) if math.isfinite(f) else f"float('{f}')"
            if tensor or cdt is torch.float64:
                return f"tl.full((1, 1), {text}, {TL_DTYPE[cdt]})"
            return text
        i = int(v)
        return f"tl.full((1, 1), {i}, {TL_DTYPE[cdt]})" if tensor or cdt is not torch.int32 and \
            not -2**31 <= i < 2**31 else repr(i)

    def ncols(self, x: torch.fx.Node) -> str:
        """The run-time size of x's last dim."""
        if static_one(x):
            return "1"
        # Nodes whose last dims are the same int or symbol share one argument (the plan checks they still agree).
        canon = str(val(x).shape[-1])
        if canon not in self.col_groups:
            self.col_groups[canon] = []
            self.int_arg(f"ncols{len(self.col_groups) - 1}", lambda p, xs=self.col_groups[canon]: p.common_cols(xs))
        if x not in self.col_groups[canon]:
            self.col_groups[canon].append(x)
        return f"ncols{list(self.col_groups).index(canon)}"

    def base_cols(self, x: Any) -> ColVar:
        return ZERO if static_one(x) else BASE

    def col_mask(self, x: torch.fx.Node, cols: ColVar) -> str | None:
        """Columns of `cols` that exist in x (None: all do)."""
        if cols is ZERO or static_one(x):
            return None
        mask = f"({cols.name} < {self.ncols(x)})"
        return f"({mask} & ({cols.name} >= 0))" if cols.may_be_negative else mask

    def materialize(self, cols: ColVar) -> ColVar:
        """Column 0 as a variable, for column arithmetic on a node of last dim 1."""
        if cols is not ZERO:
            return cols
        return self.cached(("cols", "zero"), lambda: ColVar(self.tmp("tl.zeros((1, 1), dtype=tl.int32)", "col")))

    def shift(self, cols: ColVar, offset: str, step: int = 1) -> ColVar:
        """cols * step + offset, as a new column variable (offset may be negative: cat pieces)."""
        cols = self.materialize(cols)
        key = ("cols", cols.name, offset, step)
        if key not in self.memo:
            scaled = cols.name if step == 1 else f"{cols.name} * {step}"
            negative = cols.may_be_negative or offset.startswith("-")
            self.memo[key] = ColVar(self.tmp(f"{scaled} + {offset}", "col"), negative)
        return self.memo[key]

    def convert(self, v: str, src: torch.dtype, dst: torch.dtype) -> str:
        """A value held in src's compute type as dst's compute type, rounding like aten's cast src -> dst."""
        s, d = compute_dtype(src), compute_dtype(dst)
        if d is torch.bool:
            return v if s is torch.bool else f"({v} != 0)"
        if dst is torch.float16 and s is torch.float64:
            return f"{v}.to(tl.float16).to(tl.float32)"  # one rounding, not two through float32
        if dst is torch.bfloat16 and s is torch.float64:
            return f"_round_bf16({v}.to(tl.float32))"  # rounds twice: a tie may differ from aten by one ulp
        return v if s is d else f"{v}.to({TL_DTYPE[d]})"

    def operand(self, x: Any, cols: ColVar, dtype: torch.dtype) -> str:
        """A node or python scalar argument at `cols`, in dtype's compute type."""
        if isinstance(x, torch.fx.Node):
            return self.convert(self.value(x, cols), val(x).dtype, dtype)
        return self.literal(x, dtype)

    # -- rows and loads ------------------------------------------------------------------------------------------

    def row_offset(self, x: torch.fx.Node, kind: str, strides: Callable[[Any], tuple[int, ...]]) -> str | None:
        """sum_d i_d * stride_d over x's leading dims, right-aligned to the group's; None when x has none."""
        v = val(x)
        lead = list(v.shape[:-1]) if v.dim() else []
        terms = []
        for j, size in enumerate(lead):
            if isinstance(size, int) and size == 1:
                continue  # a broadcast dim: stride 0
            d = self.group.rank - len(lead) + j
            name = self.int_arg(f"{kind}_{self.node_id(x)}_{d}",
                                lambda p, x=x, j=j, f=strides: 0 if p.shape(x)[j] == 1 else f(p)[j])
            terms.append(f"i{d} * {name}")
        return " + ".join(terms) if terms else None

    def load(self, x: torch.fx.Node, cols: ColVar) -> str:
        base = self.group.load_base[x]
        is_view = x not in self.input_index
        ptr = f"in{base}"
        if is_view:
            ptr += " + " + self.int_arg(f"off_{self.node_id(x)}", lambda p, x=x: p.meta(x).storage_offset())
        rows = self.cached(("rowoff", x), lambda: self.row_offset(x, "s", lambda p, x=x: p.meta(x).stride()[:-1]))
        masks = []
        if rows is not None:
            ptr += f" + {rows}"
            masks.append("rmask")
        cols = ZERO if static_one(x) else cols
        if cols is not ZERO:
            stride = self.int_arg(f"sc_{self.node_id(x)}", lambda p, x=x: p.meta(x).stride()[-1])
            ptr += f" + {cols.name} * {stride}"
            masks.append(self.col_mask(x, cols))
        mask = " & ".join(m for m in masks if m)
        load = f"tl.load({ptr}, mask={mask}, other=0)" if mask else f"tl.load({ptr})"
        return self.tmp(f"{load}.to({tl_compute(val(x).dtype)})", "v")

    # -- values --------------------------------------------------------------------------------------------------

    def value(self, x: torch.fx.Node, cols: ColVar) -> str:
        """x at `cols`, in the compute type of x's dtype, rounded to x's dtype."""
        if static_one(x):
            cols = ZERO
        key = (x, cols.name)
        if key in self.memo:
            return self.memo[key]
        if x in self.group.load_base:
            out = self.load(x, cols)
        else:
            out = self.tmp(self.round(self.compute(x, cols), val(x).dtype), "v")
        self.memo[key] = out
        return out

    def round(self, expr: str, dtype: torch.dtype) -> str:
        if dtype is torch.bfloat16:
            return f"_round_bf16({expr})"
        if dtype is torch.float16:
            return f"({expr}).to(tl.float16).to(tl.float32)"
        return f"({expr}).to({tl_compute(dtype)})"

    def compute(self, x: torch.fx.Node, cols: ColVar) -> str:
        g = self.group
        if x.target is operator.getitem:
            parent, index = x.args
            return RULES[parent.target].emit(self, parent, bind(parent), index, cols)
        args = bind(x)
        src = args.get("self")
        if x in g.identity_views:
            return self.value(src, cols)
        if x in g.column_slices:
            bounds = (args["start"], args["end"], args["step"])
            start = self.int_arg(f"start_{self.node_id(x)}",
                                 lambda p, src=src, b=bounds: slice(*b).indices(p.cols(src))[0])
            return self.value(src, self.shift(cols, start, args["step"] or 1))
        if x.target is torch.ops.aten.cat.default:
            return self.cat(x, args["tensors"], cols)
        return RULES[x.target].emit(self, x, args, cols)

    def cat(self, x: torch.fx.Node, pieces: list[torch.fx.Node], cols: ColVar) -> str:
        dtype = val(x).dtype
        cols = self.materialize(cols)
        offsets = [self.int_arg(f"cat_{self.node_id(x)}_{k}", lambda p, t=tuple(pieces[:k]): sum(p.cols(y) for y in t))
                   for k in range(1, len(pieces))]
        values = [self.operand(pieces[0], cols, dtype)]
        values += [self.operand(t, self.shift(cols, f"-{off}"), dtype) for t, off in zip(pieces[1:], offsets)]
        out = values[-1]
        for v, off in zip(reversed(values[:-1]), reversed(offsets)):
            out = f"tl.where({cols.name} < {off}, {v}, {out})"
        return out

    # -- the kernel ----------------------------------------------------------------------------------------------

    def store(self, k: int, x: torch.fx.Node) -> None:
        v = self.value(x, BASE)
        cols = ZERO if static_one(x) else BASE
        rows = self.row_offset(x, "o", lambda p, k=k: p.out_strides[k][:-1])
        ptr = f"out{k} + " + (rows if rows is not None else "rows * 0")
        mask = "rmask"
        if cols is not ZERO:
            stride = self.int_arg(f"oc_{k}", lambda p, k=k: p.out_strides[k][-1])
            ptr += f" + cols * {stride}"
            mask += f" & (cols < {self.ncols(x)})"
        self.lines.append(f"tl.store({ptr}, ({v}).to({TL_DTYPE[val(x).dtype]}), mask={mask})")


def generate(group: Group) -> Generated:
    e = Emitter(group)
    rank = group.rank
    # Row index -> leading multi-index; sizes are run-time arguments so a new batch or sequence length reuses the
    # kernel.
    e.lines += [
        "rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
        "cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]",
        "rmask = rows < n_rows",
    ]
    if rank:
        e.lines.append("r = rows")
        for d in reversed(range(rank)):
            if d == 0:
                e.lines.append("i0 = r")
            else:
                size = e.int_arg(f"L{d}", lambda p, d=d: p.lead[d])
                e.lines.append(f"i{d} = r % {size}")
                e.lines.append(f"r = r // {size}")
    for k, x in enumerate(group.outputs):
        e.store(k, x)

    int_names = ["n_rows", *e.int_args]
    params = [f"in{i}" for i in range(len(group.inputs))] + [f"out{k}" for k in range(len(group.outputs))] + \
        int_names + ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"]
    ops = [op_name(n.target) for n in group.nodes if n.target is not operator.getitem]
    out = [
        f"# Generated by llmcompress.codegen (generator {GENERATOR_VERSION}): {len(group.nodes)} nodes,",
        f"# {', '.join(dict.fromkeys(o.removeprefix('aten.') for o in ops))}.",
        f"# Inputs: {', '.join(_describe(x) for x in group.inputs)}",
        f"# Outputs: {', '.join(_describe(x) for x in group.outputs)}",
        "import triton",
        "import triton.language as tl",
        "from triton.runtime.jit import JITFunction",
        "",
    ]
    helpers = sorted(h for h in _HELPERS if any(f"{h}(" in line for line in e.lines))
    if helpers:
        out += ["", "@triton.jit", "def _probe():", "    pass", "", "",
                "if isinstance(_probe, JITFunction):",
                "    from triton.language.extra import libdevice", ""]
        out += [_HELPERS[h][0] for h in helpers]
        out += ["else:"]
        out += [_HELPERS[h][1] for h in helpers]
    out += ["", "@triton.jit", f"def fused_kernel({', '.join(params)}):"]
    out += [f"    {line}" for line in e.lines]
    source = "\n".join(out) + "\n"
    int_args = [("n_rows", lambda p: p.rows)] + list(e.int_args.items())
    return Generated(source, int_args, ops)


def _describe(x: torch.fx.Node) -> str:
    v = val(x)
    shape = "x".join("s" if not isinstance(s, int) else str(s) for s in v.shape)
    return f"{str(v.dtype).removeprefix('torch.')}[{shape}]"
