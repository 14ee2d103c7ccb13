"""The op table of the code generator: which aten overloads a fusion group may hold, and the Triton expression each
one becomes.

Entry points: `fusible(node)` (None or the reason a node cannot be a group member), `is_reduction(node)`,
`is_input_view(node)`, and `RULES` (aten overload -> `Rule`), read by `emit.py`.

Numerics follow aten op by op: operands are converted to the compute type of the node's own dtype (float32 for
float16/bfloat16/float32, float64 for float64; integers and bool as themselves), the op is computed, and the result
is rounded to the node's dtype (`Emitter.value` does the rounding). Output dtypes are read from `meta["val"]`, never
re-derived, so aten's type promotion holds by construction.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from llmcompress.fx_utils import VIEW_OPS, tensors_in, val

# The emitter and column expressions of `emit.py`, which sits above this table (it imports it): named, not imported.
Emitter = Any
ColVar = Any

aten = torch.ops.aten

# torch dtype -> Triton dtype of the stored value, and the type a value of that dtype is computed in.
TL_DTYPE = {
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.bool: "tl.int1", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
    torch.int16: "tl.int16", torch.int32: "tl.int32", torch.int64: "tl.int64",
}
COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return COMPUTE_DTYPE.get(dtype, dtype)


def tl_compute(dtype: torch.dtype) -> str:
    return TL_DTYPE[compute_dtype(dtype)]


def op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def bind(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def result_type(x: Any, y: Any) -> torch.dtype:
    """aten's promoted dtype of two operands (a 0-dim tensor ranks below a dimensioned one, a scalar below both)."""

    def stand_in(a: Any) -> Any:
        v = val(a)
        return torch.empty((1,) * min(v.dim(), 1), dtype=v.dtype) if isinstance(v, torch.Tensor) else v

    return torch.result_type(stand_in(x), stand_in(y))


def _is_last(dim: Any, x: Any) -> bool:
    rank = val(x).dim()
    return isinstance(dim, int) and rank > 0 and dim % rank == rank - 1


def _reduced_dims(dims: Any) -> list[Any] | None:
    if dims is None:
        return None
    return list(dims) if isinstance(dims, (list, tuple)) else [dims]


# ---------------------------------------------------------------------------------------------------------------
# Rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the generator computes one aten overload.

    kind: 'pointwise' (value at a column from operands at that column), 'reduction' (over the last dim, keepdim),
    'view' (moves no data: a load of a group input, or an identity over the rows), 'multi' (tuple outputs, read by
    getitem), 'slice', 'cat' (last-dim column arithmetic).
    emit(e, node, args, cols) -> Triton expression in the node's compute type, before rounding to its dtype.
    check(node, args) -> reason the node cannot be generated, or None.
    """

    kind: str
    emit: Callable[..., str] | None = None
    check: Callable[[torch.fx.Node, dict[str, Any]], str | None] | None = None


RULES: dict[Any, Rule] = {}


def _rule(targets: Any, kind: str, check: Callable | None = None) -> Callable:
    def register(fn: Callable | None) -> Callable | None:
        for t in targets if isinstance(targets, (list, tuple)) else [targets]:
            RULES[t] = Rule(kind, fn, check)
        return fn

    return register


def _float_only(node: torch.fx.Node, args: dict[str, Any]) -> str | None:
    if not val(node).dtype.is_floating_point:
        return f"{op_name(node.target)} on {val(node).dtype} (floating point only)"
    return None


def _unary(expr: str) -> Callable:
    def emit(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
        x = e.operand(a["self"], cols, val(node).dtype)
        return expr.format(x=x)

    return emit


_UNARY = {
    aten.exp.default: "tl.exp({x})", aten.log.default: "tl.log({x})", aten.sin.default: "tl.sin({x})",
    aten.cos.default: "tl.cos({x})", aten.sqrt.default: "tl.sqrt_rn({x})", aten.rsqrt.default: "tl.rsqrt({x})",
    aten.sigmoid.default: "tl.sigmoid({x})", aten.tanh.default: "_tanh({x})", aten.erf.default: "tl.erf({x})",
    aten.reciprocal.default: "1.0 / {x}", aten.floor.default: "tl.floor({x})", aten.ceil.default: "tl.ceil({x})",
    aten.silu.default: "{x} / (1.0 + tl.exp(-{x}))",
}
for _t, _expr in _UNARY.items():
    _rule(_t, "pointwise", _float_only)(_unary(_expr))
_rule(aten.neg.default, "pointwise")(_unary("-{x}"))
_rule(aten.abs.default, "pointwise")(_unary("tl.abs({x})"))
_rule(aten.relu.default, "pointwise")(_unary("tl.where({x} < 0, 0, {x})"))
_rule(aten.square.default, "pointwise")(_unary("{x} * {x}"))


def _check_gelu(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    if a["approximate"] not in ("none", "tanh"):
        return f"gelu approximate={a['approximate']!r} (none or tanh)"
    return _float_only(node, a)


@_rule(aten.gelu.default, "pointwise", _check_gelu)
def _gelu(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    x = e.operand(a["self"], cols, val(node).dtype)
    if a["approximate"] == "tanh":
        inner = e.tmp(f"{math.sqrt(2 / math.pi)!r} * ({x} + 0.044715 * {x} * {x} * {x})")
        return f"0.5 * {x} * (1.0 + _tanh({inner}))"
    return f"0.5 * {x} * (1.0 + tl.erf({x} * {math.sqrt(0.5)!r}))"


def _check_clamp(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    if isinstance(a["min"], torch.fx.Node) or isinstance(a["max"], torch.fx.Node):
        return "clamp with tensor bounds"
    return None


@_rule(aten.clamp.default, "pointwise", _check_clamp)
def _clamp(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    x = e.operand(a["self"], cols, dt)
    # where(), not minimum/maximum: a NaN passes through as in aten.
    if a["min"] is not None:
        x = e.tmp(f"tl.where({x} < {e.literal(a['min'], dt)}, {e.literal(a['min'], dt)}, {x})")
    if a["max"] is not None:
        x = f"tl.where({x} > {e.literal(a['max'], dt)}, {e.literal(a['max'], dt)}, {x})"
    return x


# aten specialises these exponents (pow_tensor_scalar_optimized_kernel); the others go through pow().
_POW = {1: "{x}", 2: "{x} * {x}", 3: "{x} * {x} * {x}", 0.5: "tl.sqrt_rn({x})",
        -0.5: "tl.rsqrt({x})", -1: "1.0 / {x}", -2: "1.0 / ({x} * {x})"}


def _check_pow(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    e = a["exponent"]
    if isinstance(e, torch.fx.Node):
        return "pow with a symbolic exponent"
    if not val(node).dtype.is_floating_point and not (isinstance(e, int) and 0 <= e <= 3):
        return f"integer pow with exponent {e!r} (0..3)"
    return None


@_rule(aten.pow.Tensor_Scalar, "pointwise", _check_pow)
def _pow_scalar(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    x = e.operand(a["self"], cols, dt)
    exp = a["exponent"]
    key = float(exp) if not isinstance(exp, bool) else int(exp)
    if key == 0:
        return e.literal(1, dt, tensor=True)
    if key in _POW and (dt.is_floating_point or key == int(key)):
        return _POW[key].format(x=x)
    return f"_pow({x}, {e.literal(exp, dt, tensor=True)})"


@_rule(aten.pow.Tensor_Tensor, "pointwise", _float_only)
def _pow_tensor(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    return f"_pow({e.operand(a['self'], cols, dt)}, {e.operand(a['exponent'], cols, dt)})"


def _check_alpha(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    if isinstance(a.get("alpha"), torch.fx.Node) or isinstance(a.get("other"), torch.fx.Node) and \
            not isinstance(val(a["other"]), torch.Tensor):
        return "symbolic scalar argument"
    return None


def _binary(op: str, swap: bool = False) -> Callable:
    def emit(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
        dt = val(node).dtype
        x, y = e.operand(a["self"], cols, dt), e.operand(a["other"], cols, dt)
        alpha = a.get("alpha", 1)
        if alpha is not None and alpha != 1:
            y = f"({e.literal(alpha, dt)} * {y})"
        if swap:
            x, y = y, x
        return f"{x} {op} {y}"

    return emit


_rule([aten.add.Tensor, aten.add.Scalar], "pointwise", _check_alpha)(_binary("+"))
_rule([aten.sub.Tensor, aten.sub.Scalar], "pointwise", _check_alpha)(_binary("-"))
_rule([aten.rsub.Scalar, aten.rsub.Tensor], "pointwise", _check_alpha)(_binary("-", swap=True))
_rule([aten.mul.Tensor, aten.mul.Scalar], "pointwise", _check_alpha)(_binary("*"))


def _check_div(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    return _check_alpha(node, a) or _float_only(node, a)


_rule([aten.div.Tensor, aten.div.Scalar], "pointwise", _check_div)(_binary("/"))


def _minmax(fn: str) -> Callable:
    def emit(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
        dt = val(node).dtype
        x, y = e.operand(a["self"], cols, dt), e.operand(a["other"], cols, dt)
        nan = ", propagate_nan=tl.PropagateNan.ALL" if dt.is_floating_point else ""
        return f"tl.{fn}({x}, {y}{nan})"

    return emit


_rule(aten.maximum.default, "pointwise")(_minmax("maximum"))
_rule(aten.minimum.default, "pointwise")(_minmax("minimum"))


def _compare(op: str) -> Callable:
    def emit(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
        dt = result_type(a["self"], a["other"])
        return f"{e.operand(a['self'], cols, dt)} {op} {e.operand(a['other'], cols, dt)}"

    return emit


for _name, _op in (("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">=")):
    _packet = getattr(aten, _name)
    _rule([_packet.Tensor, _packet.Scalar], "pointwise", _check_alpha)(_compare(_op))


def _logical(op: str) -> Callable:
    def emit(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
        x, y = e.operand(a["self"], cols, torch.bool), e.operand(a["other"], cols, torch.bool)
        return f"{x} {op} {y}"

    return emit


_rule(aten.logical_and.default, "pointwise")(_logical("&"))
_rule(aten.logical_or.default, "pointwise")(_logical("|"))
_rule(aten.logical_xor.default, "pointwise")(_logical("^"))


@_rule(aten.logical_not.default, "pointwise")
def _logical_not(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    return f"{e.operand(a['self'], cols, torch.bool)} == 0"


def _check_bitwise(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    if val(node).dtype.is_floating_point:
        return "bitwise op on floating point"
    return _check_alpha(node, a)


for _name, _op in (("bitwise_and", "&"), ("bitwise_or", "|"), ("bitwise_xor", "^")):
    _packet = getattr(aten, _name)
    _rule([_packet.Tensor, _packet.Scalar], "pointwise", _check_bitwise)(_binary(_op))


def _check_where(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    for k, v in a.items():
        if isinstance(v, torch.fx.Node) and not isinstance(val(v), torch.Tensor):
            return "symbolic scalar argument"
    return None


@_rule([aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar], "pointwise",
       _check_where)
def _where(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    c = e.operand(a["condition"], cols, torch.bool)
    return f"tl.where({c}, {e.operand(a['self'], cols, dt)}, {e.operand(a['other'], cols, dt)})"


@_rule([aten.masked_fill.Scalar, aten.masked_fill.Tensor], "pointwise", _check_where)
def _masked_fill(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    m = e.operand(a["mask"], cols, torch.bool)
    return f"tl.where({m}, {e.operand(a['value'], cols, dt)}, {e.operand(a['self'], cols, dt)})"


@_rule(aten.scalar_tensor.default, "pointwise")
def _scalar_tensor(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    return e.literal(a["s"], val(node).dtype, tensor=True)


def _check_to_copy(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    src = val(a["self"])
    if not isinstance(src, torch.Tensor):
        return "_to_copy of a non-tensor"
    if a.get("layout") not in (None, torch.strided):
        return f"_to_copy to layout {a['layout']}"
    if a.get("device") is not None and torch.device(a["device"]) != src.device:
        return f"_to_copy between devices ({src.device} -> {a['device']})"
    return None


@_rule(aten._to_copy.default, "pointwise", _check_to_copy)
def _to_copy(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    return e.operand(a["self"], cols, val(node).dtype)


@_rule(aten.clone.default, "pointwise")
def _clone(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    return e.operand(a["self"], cols, val(node).dtype)


# ---------------------------------------------------------------------------------------------------------------
# Reductions over the last dimension (keepdim): one row of the block is one reduction.


def _check_reduce(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    dims = _reduced_dims(a.get("dim"))
    x = a["self"]
    if dims is None or len(dims) != 1:
        return f"{op_name(node.target)} over dims {a.get('dim')!r} (only the last dim)"
    if not _is_last(dims[0], x):
        return f"reduction over dim {dims[0]} of a {val(x).dim()}-d tensor (only the last dim)"
    if not a.get("keepdim", False):
        return "reduction without keepdim"
    return None


def _reduce_input(e: Emitter, x: Any, dt: torch.dtype) -> tuple[str, str | None]:
    """x at the base columns in dt, and the mask of its valid columns (None when it has one column)."""
    cols = e.base_cols(x)
    v, mask = e.operand(x, cols, dt), e.col_mask(x, cols)
    # A row of one column may have loaded as a scalar (nothing varies): give the reduction its column axis.
    return (v, mask) if mask else (e.tmp(f"tl.broadcast_to({v}, (BLOCK_R, 1))"), None)


@_rule([aten.sum.dim_IntList, aten.mean.dim], "reduction", _check_reduce)
def _sum_mean(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    x, mask = _reduce_input(e, a["self"], dt)
    masked = f"tl.where({mask}, {x}, 0)" if mask else x
    s = f"tl.sum({masked}, axis=1)[:, None]"
    if node.target is aten.mean.dim:
        return f"{s} / {e.ncols(a['self'])}"
    return s


def _extreme(e: Emitter, x: str, mask: str | None, dt: torch.dtype, largest: bool) -> str:
    """Row max/min; a NaN anywhere in the row makes it NaN, as aten's amax/amin."""
    fill = ("-" if largest else "") + "float('inf')" if dt.is_floating_point else \
        (torch.iinfo(dt).min if largest else torch.iinfo(dt).max) if dt is not torch.bool else int(not largest)
    masked = e.tmp(f"tl.where({mask}, {x}, {fill})" if mask else x)
    red = e.tmp(f"tl.{'max' if largest else 'min'}({masked}, axis=1)[:, None]")
    if dt.is_floating_point:
        nan = e.tmp(f"tl.max(({masked} != {masked}).to(tl.int32), axis=1)[:, None]")
        red = f"tl.where({nan} > 0, float('nan'), {red})"
    return red


@_rule(aten.amax.default, "reduction", _check_reduce)
def _amax(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    x, mask = _reduce_input(e, a["self"], val(node).dtype)
    return _extreme(e, x, mask, val(node).dtype, True)


@_rule(aten.amin.default, "reduction", _check_reduce)
def _amin(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    x, mask = _reduce_input(e, a["self"], val(node).dtype)
    return _extreme(e, x, mask, val(node).dtype, False)


def _check_softmax(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    if not _is_last(a["dim"], a["self"]):
        return f"softmax over dim {a['dim']} of a {val(a['self']).dim()}-d tensor (only the last dim)"
    return _float_only(node, a)


def _softmax_parts(e: Emitter, node: torch.fx.Node, x: Any, dt: torch.dtype) -> tuple[str, str]:
    """(row max, row sum of exp(x - max)), shared by every column the softmax is evaluated at."""

    def build() -> tuple[str, str]:
        xv, mask = _reduce_input(e, x, dt)
        m = e.tmp(f"tl.max(tl.where({mask}, {xv}, -float('inf')), axis=1)[:, None]" if mask else xv)
        ex = f"tl.exp({xv} - {m})"
        s = e.tmp(f"tl.sum(tl.where({mask}, {ex}, 0.0), axis=1)[:, None]" if mask else ex)
        return m, s

    return e.cached((node, "softmax"), build)


@_rule([aten._softmax.default, aten.softmax.int], "reduction", _check_softmax)
def _softmax(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    m, s = _softmax_parts(e, node, a["self"], dt)
    return f"tl.exp({e.operand(a['self'], cols, dt)} - {m}) / {s}"


@_rule([aten._log_softmax.default, aten.log_softmax.int], "reduction", _check_softmax)
def _log_softmax(e: Emitter, node: torch.fx.Node, a: dict[str, Any], cols: ColVar) -> str:
    dt = val(node).dtype
    m, s = _softmax_parts(e, node, a["self"], dt)
    return f"{e.operand(a['self'], cols, dt)} - {m} - tl.log({s})"


def _check_layer_norm(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    shape = a["normalized_shape"]
    if len(shape) != 1:
        return f"native_layer_norm over {len(shape)} dims (only the last dim)"
    if val(a["input"]).dim() == 0:
        return "native_layer_norm of a 0-d tensor"
    if isinstance(a["eps"], torch.fx.Node):
        return "symbolic scalar argument"
    if not val(a["input"]).dtype.is_floating_point:
        return f"native_layer_norm on {val(a['input']).dtype} (floating point only)"
    return None


def _layer_norm_stats(e: Emitter, node: torch.fx.Node, a: dict[str, Any]) -> tuple[str, str]:
    """(mean, rstd) of the row in the compute type: two passes over the row held in registers."""

    def build() -> tuple[str, str]:
        dt = val(a["input"]).dtype
        xv, mask = _reduce_input(e, a["input"], dt)
        n = e.ncols(a["input"])
        mean = e.tmp(f"tl.sum(tl.where({mask}, {xv}, 0.0), axis=1)[:, None] / {n}" if mask else xv)
        d = e.tmp(f"tl.where({mask}, {xv} - {mean}, 0.0)" if mask else f"{xv} - {mean}")
        var = e.tmp(f"tl.sum({d} * {d}, axis=1)[:, None] / {n}")
        return mean, e.tmp(f"tl.rsqrt({var} + {e.literal(a['eps'], dt)})")

    return e.cached((node, "layer_norm"), build)


def _layer_norm(e: Emitter, node: torch.fx.Node, a: dict[str, Any], index: int, cols: ColVar) -> str:
    mean, rstd = _layer_norm_stats(e, node, a)
    if index == 1:
        return mean
    if index == 2:
        return rstd
    dt = val(node)[0].dtype
    y = f"({e.operand(a['input'], cols, dt)} - {mean}) * {rstd}"
    if a["weight"] is not None:
        y = f"{y} * {e.operand(a['weight'], cols, dt)}"
    if a["bias"] is not None:
        y = f"{y} + {e.operand(a['bias'], cols, dt)}"
    return y


RULES[aten.native_layer_norm.default] = Rule("multi", _layer_norm, _check_layer_norm)


# ---------------------------------------------------------------------------------------------------------------
# Column arithmetic and views.


def _check_slice(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    for k in ("start", "end", "step"):
        if isinstance(a[k], torch.fx.Node):
            return f"slice with a symbolic {k}"
    if a["step"] is not None and a["step"] < 1:
        return f"slice with step {a['step']}"
    return None


RULES[aten.slice.Tensor] = Rule("slice", None, _check_slice)


def _check_cat(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    if not a["tensors"]:
        return "cat of nothing"
    rank = val(node).dim()
    if any(val(t).dim() != rank for t in a["tensors"]):
        return "cat of tensors of different ranks (a legacy empty 1-d piece)"
    if not _is_last(a["dim"], node):
        return f"cat along dim {a['dim']} of a {rank}-d tensor (only the last dim)"
    return None


RULES[aten.cat.default] = Rule("cat", None, _check_cat)


def _check_view(node: torch.fx.Node, a: dict[str, Any]) -> str | None:
    for v in list(node.args[1:]) + list(node.kwargs.values()):
        items = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(i, torch.fx.Node) for i in items):
            return f"{op_name(node.target)} with symbolic sizes"
    return None


# The view table's ops (`fx_utils.VIEW_OPS`) but: reshape (a copy where the strides allow no view, so its layout is
# not its input's), slice (column arithmetic, above), and as_strided, unflatten, view_as_real / view_as_complex,
# which the generator has no tests for (the last two change dtype to or from complex, which it does not generate).
_NOT_GENERATED_VIEWS = {aten.reshape.default, aten.slice.Tensor, aten.as_strided.default, aten.unflatten.int,
                        aten.view_as_real.default, aten.view_as_complex.default}
for _t in VIEW_OPS - _NOT_GENERATED_VIEWS:
    RULES[_t] = Rule("view", None, _check_view)

SUPPORTED_DTYPES = tuple(TL_DTYPE)


def fusible(node: torch.fx.Node) -> str | None:
    """None if the code generator can compute `node` as a member of a fusion group, else a short reason.

    View ops (`is_input_view`) are fusible; inside a group they must either read a group input (they become part of
    its load) or leave the rows as they are (add/drop leading size-1 dims, broadcast), else `compile_group` refuses
    them.
    """
    if node.op != "call_function":
        return f"{node.op} node"
    if node.target is operator.getitem:
        parent = node.args[0]
        if not isinstance(parent, torch.fx.Node) or RULES.get(parent.target, Rule("")).kind != "multi":
            return "getitem of an op the generator does not compute"
        return None
    rule = RULES.get(node.target)
    if rule is None:
        return f"unsupported op {op_name(node.target)}"
    out = node.meta.get("val")
    outs = tensors_in(out)
    if not outs or (not isinstance(out, torch.Tensor) and rule.kind != "multi"):
        return f"{op_name(node.target)} without a tensor value"
    for t in outs + [t for a in node.all_input_nodes for t in tensors_in(a.meta.get("val"))]:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} (supported: float16, bfloat16, float32, float64, bool, int8-64, uint8)"
        if t.layout is not torch.strided:
            return f"layout {t.layout}"
    for a in node.all_input_nodes:
        v = a.meta.get("val")
        if not isinstance(v, torch.Tensor) and not (rule.kind == "multi" and isinstance(v, torch.SymInt)):
            return f"non-tensor input {a.name} ({type(v).__name__})"
    args = bind(node)
    return rule.check(node, args) if rule.check else None


def is_reduction(node: torch.fx.Node) -> bool:
    """Whether the node reduces the last dim (softmax, layer norm, sum, mean, amax, ...)."""
    rule = RULES.get(node.target)
    return rule is not None and rule.kind in ("reduction", "multi")


def is_input_view(node: torch.fx.Node) -> bool:
    """Whether the node is a view op: in a group it becomes part of a group input's load (strides and offset) or,
    applied to a value computed in the group, must leave the rows unchanged."""
    rule = RULES.get(node.target)
    return rule is not None and rule.kind == "view"
