"""The roofline cost model: FLOPs, bytes, intensity, bound and predicted time per FX node, symbolic in sizes.

Entry points: `CostModel(hardware, profile=None)` with `.node_cost(node)`, `.estimate(node_or_graph, sizes=None)`,
`.lowered_cost(nodes, lowering, sizes)` (nodes as a lowering runs them), `.candidate_cost(target, args, fake_mode)`
(a kernel not in the graph yet), `.kernel_time(...)`, `.compare(before, after, sizes=None)`; `register_cost(op)`
declares the cost of a custom op next to the op.

Counting rules (docs/architecture.md, "The cost model"):
* bytes: every tensor input read once at its stored dtype (a broadcast input counts its stored elements only),
  every output written once; views, reshapes and getitem move nothing and launch nothing.
* FLOPs: 2·M·N·K for a matmul (+M·N for a bias); attention 4·B·H·L·S·E (halved when causal and L == S); one FLOP
  per output element for pointwise ops and per input element for reductions; 0 for data movement.
* time = max(FLOPs / attainable FLOP/s, bytes / attainable bandwidth) + one launch overhead per kernel node.
  Attainable = the hardware table's peaks, or with a calibration profile the measured bandwidth and the measured
  matmul efficiency at the nearest M.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sympy
import torch
import torch.fx

from llmcompress.cost.hardware import Hardware
from llmcompress.fx_utils import MULTI_VIEW_OPS, VIEW_OPS, fake_value, grouped_matmul_ops, tensors_in, val

aten = torch.ops.aten
Expr = sympy.Expr

# Ops that move no data and launch no kernel: views (`fx_utils.VIEW_OPS`), getitem, size queries and SymInt
# arithmetic, and the copy AOT lifts a constant with.
FREE_OPS = VIEW_OPS | MULTI_VIEW_OPS | {
    aten.lift_fresh_copy.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv,
}
MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
              aten.matmul.default}
ATTENTION_OPS = {
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default, aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
# Position of is_causal in each attention op's arguments.
_CAUSAL_ARG = {
    aten._scaled_dot_product_flash_attention.default: 4, aten._scaled_dot_product_flash_attention_for_cpu.default: 4,
    aten._scaled_dot_product_efficient_attention.default: 6, aten.scaled_dot_product_attention.default: 5,
    aten._scaled_dot_product_cudnn_attention.default: 6,
}
REDUCTION_OPS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
                 aten.amin.default, aten.max.dim, aten.min.dim, aten.var_mean.correction, aten.var.correction,
                 aten.argmax.default, aten._softmax.default, aten._log_softmax.default, aten.softmax.int,
                 aten.cumsum.default, aten.topk.default, aten.sort.default, aten.any.dims, aten.all.dim}
MOVE_OPS = {aten.clone.default, aten._to_copy.default, aten.copy.default, aten.copy_.default, aten.cat.default,
            aten.stack.default, aten.index.Tensor, aten.index_select.default, aten.gather.default,
            aten.index_put.default, aten.index_copy.default, aten.scatter.src, aten.embedding.default,
            aten.constant_pad_nd.default, aten.new_zeros.default, aten.full.default, aten.zeros.default,
            aten.ones.default, aten.arange.default, aten.arange.start, aten.empty.memory_format, aten.full_like.default,
            aten.zeros_like.default,
            aten.new_ones.default, aten.new_empty.default, aten.ones_like.default, aten.where.self, aten.masked_fill.Scalar,
            aten.slice_scatter.default, aten.select_scatter.default, aten.repeat.default, aten.tril.default,
            aten.triu.default, aten.flip.default, aten.roll.default}

# Functional scatters into a tensor: Inductor re-inplaces them when the base is dead after (the KV cache update),
# so they move the updated values, not the whole base. The copy_ that writes such a result back is then free.
SCATTER_OPS = {aten.index_copy.default, aten.index_put.default, aten.slice_scatter.default,
               aten.select_scatter.default, aten.scatter.src}

# Lowerings that fuse pointwise ops, reductions and data movement around the kernels of `EXTERN_KINDS` (Inductor, and
# our Triton lowering, whose fuse-pointwise generates a kernel per such group), and those kernels' kinds.
FUSING_LOWERINGS = ("inductor", "triton")
EXTERN_KINDS = frozenset({"matmul", "attention", "custom"})

CostFn = Callable[[torch.fx.Node], tuple[Any, Any]]
_CUSTOM_COSTS: dict[Any, CostFn] = {}


def register_cost(op: Any) -> Callable[[CostFn], CostFn]:
    """Declare `fn(node) -> (flops, bytes)` as the cost of `op` (an OpOverload or OpOverloadPacket).

    Kernels register theirs next to the op (e.g. a quantized linear counts its packed weight, scales and zeros).
    """

    def register(fn: CostFn) -> CostFn:
        _CUSTOM_COSTS[op] = fn
        return fn

    return register


def sym(x: Any) -> Expr:
    """An int or SymInt as a sympy expression (symbols are Dynamo's s0, s1 ...)."""
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    if isinstance(x, torch.SymFloat):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def numel(t: torch.Tensor) -> Expr:
    return sympy.Mul(*[sym(s) for s in t.shape]) if t.dim() else sympy.Integer(1)


def stored_numel(t: torch.Tensor) -> Expr:
    """Elements actually stored: a broadcast (stride 0) dimension counts once."""
    dims = [sym(s) for s, st in zip(t.shape, t.stride()) if not (isinstance(st, int) and st == 0)]
    return sympy.Mul(*dims) if dims else sympy.Integer(1)


def nbytes(t: torch.Tensor, stored: bool = True) -> Expr:
    return (stored_numel(t) if stored else numel(t)) * t.element_size()


def io_bytes(node: torch.fx.Node) -> Expr:
    """Bytes of every distinct tensor input read once plus every output written once."""
    seen: set[int] = set()
    total = sympy.Integer(0)
    for arg in node.all_input_nodes:
        if id(arg) in seen:
            continue
        seen.add(id(arg))
        for t in tensors_in(arg.meta.get("val")):
            total += nbytes(t)
    for t in tensors_in(node.meta.get("val")):
        total += nbytes(t, stored=False)
    return total


def _grouped_mm_cost(node: torch.fx.Node) -> tuple[Expr, Expr]:
    """(flops, bytes) of MoE experts as grouped matmuls, `_grouped_mm(x (R, K), w (E, K, N), offs)`: 2·R·K·N FLOPs;
    bytes of x and the output, and of the experts expected to receive at least one of the R rows under uniform
    routing, E·(1 − (1 − 1/E)^R) (the loop runs only experts with rows; a grouped GEMM reads only their tiles)."""
    x, w = val(node.args[0]), val(node.args[1])
    rows, k = numel(x) / sym(x.shape[-1]), sym(x.shape[-1])
    e, n = int(w.shape[0]), sym(w.shape[-1])
    hit = e * (1 - (1 - sympy.Rational(1, e)) ** rows) if e > 1 else 1
    per_expert = numel(w) / e * w.element_size()
    return 2 * rows * k * n, hit * per_expert + nbytes(x, stored=False) + nbytes(val(node), stored=False)


def _matmul_flops(node: torch.fx.Node) -> tuple[Expr, Expr, Expr]:
    """(flops, M, N) of a matmul-family node."""
    t, args = node.target, [val(a) for a in node.args]
    out = val(node)
    if t is aten.linear.default:
        x, w = args[0], args[1]
        k, n = sym(w.shape[1]), sym(w.shape[0])
        m = numel(x) / sym(x.shape[-1])
        bias = n * m if len(args) > 2 and args[2] is not None else 0
        return 2 * m * n * k + bias, m, n
    if t in (aten.mm.default, aten.addmm.default):
        a, b = (args[1], args[2]) if t is aten.addmm.default else (args[0], args[1])
        m, k, n = sym(a.shape[0]), sym(a.shape[1]), sym(b.shape[1])
        return 2 * m * n * k + (m * n if t is aten.addmm.default else 0), m, n
    if t in (aten.bmm.default, aten.baddbmm.default):
        a, b = (args[1], args[2]) if t is aten.baddbmm.default else (args[0], args[1])
        bsz, m, k, n = sym(a.shape[0]), sym(a.shape[1]), sym(a.shape[2]), sym(b.shape[2])
        return 2 * bsz * m * n * k, bsz * m, n
    # aten.matmul: out elements x contraction
    a = args[0]
    k = sym(a.shape[-1])
    return 2 * numel(out) * k, numel(out) / sym(out.shape[-1]), sym(out.shape[-1])


def _attention_flops(node: torch.fx.Node) -> Expr:
    q, k, v = (val(a) for a in node.args[:3])
    b_h_l = numel(q) / sym(q.shape[-1])
    s, e, ev = sym(k.shape[-2]), sym(q.shape[-1]), sym(v.shape[-1])
    flops = 2 * b_h_l * s * e + 2 * b_h_l * s * ev
    pos = _CAUSAL_ARG.get(node.target, 4)
    causal = node.kwargs.get("is_causal", node.args[pos] if len(node.args) > pos else False)
    if causal and sympy.simplify(sym(q.shape[-2]) - s) == 0:
        flops = flops / 2
    return flops


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """What one node costs; `flops`, `bytes` and `time_s` are sympy expressions or numbers."""

    node: str
    op: str
    kind: str
    """'matmul', 'attention', 'pointwise', 'reduction', 'data', 'custom', 'unknown' or 'free'."""
    flops: Any
    bytes: Any
    time_s: Any
    compute_time_s: Any
    memory_time_s: Any
    shape: str
    dtype: str
    rows: Any = None
    """M of a matmul (rows of the activation): picks the calibration point; None for other kinds."""

    @property
    def intensity(self) -> Any:
        return self.flops / self.bytes if self.bytes != 0 else sympy.oo

    def bound(self, sizes: Mapping[Any, int] | None = None) -> str:
        c, m = _num(self.compute_time_s, sizes), _num(self.memory_time_s, sizes)
        return "compute" if c > m else "memory" if m > 0 else "none"

    def evaluate(self, sizes: Mapping[Any, int] | None = None) -> NodeCost:
        """The same cost at concrete sizes (`{symbol or name: value}`); plain numbers out."""
        return dataclasses.replace(
            self, flops=_num(self.flops, sizes), bytes=_num(self.bytes, sizes), time_s=_num(self.time_s, sizes),
            compute_time_s=_num(self.compute_time_s, sizes), memory_time_s=_num(self.memory_time_s, sizes),
            rows=None if self.rows is None else _num(self.rows, sizes))

    def to_json(self, sizes: Mapping[Any, int] | None = None) -> dict[str, Any]:
        c = self.evaluate(sizes)
        return {"node": c.node, "op": c.op, "kind": c.kind, "shape": c.shape, "dtype": c.dtype, "flops": c.flops,
                "bytes": c.bytes, "intensity": (c.flops / c.bytes) if c.bytes else None,
                "bound": self.bound(sizes), "time_s": c.time_s}


def _num(x: Any, sizes: Mapping[Any, int] | None) -> float:
    if isinstance(x, (int, float)):
        return float(x)
    expr = sympy.sympify(x)
    if sizes:
        expr = expr.subs({(sympy.Symbol(k) if isinstance(k, str) else k): v for k, v in sizes.items()})
    if expr.free_symbols:
        raise ValueError(f"cost {expr} depends on {sorted(map(str, expr.free_symbols))}: give their sizes")
    return float(expr)


@dataclasses.dataclass
class GraphCost:
    nodes: list[NodeCost]

    def total(self, field: str, sizes: Mapping[Any, int] | None = None) -> float:
        return sum(_num(getattr(n, field), sizes) for n in self.nodes)

    def summary(self, sizes: Mapping[Any, int] | None = None) -> dict[str, float]:
        return {"flops": self.total("flops", sizes), "bytes": self.total("bytes", sizes),
                "time_s": self.total("time_s", sizes), "kernels": sum(1 for n in self.nodes if n.kind != "free")}

    def symbols(self) -> list[str]:
        syms: set[str] = set()
        for n in self.nodes:
            for f in (n.flops, n.bytes):
                syms |= {str(s) for s in getattr(sympy.sympify(f), "free_symbols", ())}
        return sorted(syms)


class CostModel:
    """Roofline over FX nodes on one `Hardware`, optionally corrected by a calibration profile (a dict, see
    `analysis/calibration.py`)."""

    def __init__(self, hardware: Hardware, profile: Mapping[str, Any] | None = None) -> None:
        self.hardware = hardware
        self.profile = profile
        self.bandwidth = float(profile["bandwidth_bytes_per_s"]) if profile else hardware.memory_bandwidth
        self.launch_s = float(profile.get("launch_overhead_s", hardware.launch_overhead_s)) if profile else \
            hardware.launch_overhead_s

    def _peak(self, dtype: torch.dtype, tensor_cores: bool) -> float:
        name = str(dtype).removeprefix("torch.")
        peaks = self.hardware.peak_flops
        if not tensor_cores or name not in peaks:
            return peaks["float32"]
        if name == "float32" and torch.get_float32_matmul_precision() != "highest" and "tfloat32" in peaks:
            return peaks["tfloat32"]
        return peaks[name]

    def _matmul_correction(self, dtype: torch.dtype, m: Any) -> float:
        """Measured / roofline time at the calibrated M nearest (in log) to `m`; 1 without a profile."""
        if not self.profile:
            return 1.0
        points = self.profile.get("matmul", {}).get(str(dtype).removeprefix("torch."), [])
        if not points:
            return 1.0
        try:
            m_val = float(m)
        except TypeError:
            return 1.0  # symbolic M: CostModel.estimate(..., sizes) applies it once M is known
        best = min(points, key=lambda p: abs(math.log(max(p["m"], 1)) - math.log(max(m_val, 1))))
        return float(best["time_s"]) / float(best["roofline_time_s"])

    def kernel_time(self, flops: float, nbytes: float, dtype: torch.dtype, *, tensor_cores: bool = True,
                    rows: float | None = None, launches: int = 1, bandwidth: float | None = None) -> float:
        """Predicted seconds of a kernel that is not (yet) a graph node: passes price alternatives with it.

        rows: M of a matmul (applies the calibrated matmul correction); launches: kernels the alternative runs;
        bandwidth: the kernel's own measured bytes/s (a profile's `cpu_weight_only` entry) instead of the copy's.
        """
        compute = flops / self._peak(dtype, tensor_cores)
        memory = nbytes / (bandwidth or self.bandwidth)
        correction = self._matmul_correction(dtype, rows) if rows is not None and tensor_cores else 1.0
        return max(compute, memory) * correction + launches * self.launch_s

    def node_cost(self, node: torch.fx.Node) -> NodeCost | None:
        """The cost of one node; None for placeholders, constants and the output."""
        if node.op != "call_function":
            return None
        out = node.meta.get("val")
        outs = tensors_in(out)
        shape = "x".join(str(s) for s in outs[0].shape) if outs else ""
        dtype = str(outs[0].dtype).removeprefix("torch.") if outs else ""
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        correction = 1.0
        if target in FREE_OPS or _is_writeback(node):
            return NodeCost(node.name, _op_name(target), "free", 0, 0, 0, 0, 0, shape, dtype)
        if target in _CUSTOM_COSTS or packet in _CUSTOM_COSTS:
            flops, nbytes_ = (_CUSTOM_COSTS.get(target) or _CUSTOM_COSTS[packet])(node)
            kind, peak = "custom", self._peak(_first_dtype(node), True)
        elif target in grouped_matmul_ops():
            flops, nbytes_ = _grouped_mm_cost(node)
            kind, peak = "custom", self._peak(_first_dtype(node), True)
        elif target in MATMUL_OPS:
            flops, m, _ = _matmul_flops(node)
            nbytes_, kind = io_bytes(node), "matmul"
            in_dtype = _first_dtype(node)
            peak = self._peak(in_dtype, True)
            correction = self._matmul_correction(in_dtype, m)
        elif target in ATTENTION_OPS:
            flops, nbytes_, kind = _attention_flops(node), io_bytes(node), "attention"
            peak = self._peak(_first_dtype(node), True)
        elif target in REDUCTION_OPS:
            ins = [t for a in node.all_input_nodes for t in tensors_in(a.meta.get("val"))]
            flops, nbytes_, kind = (numel(ins[0]) if ins else 0), io_bytes(node), "reduction"
            peak = self._peak(torch.float32, False)
        elif target is aten.embedding.default:
            # A gather: the rows it reads (not the whole table), the indices, the rows it writes.
            flops, kind = 0, "data"
            nbytes_ = nbytes(val(node.args[1])) + 2 * nbytes(outs[0], stored=False)
            peak = self._peak(torch.float32, False)
        elif target in SCATTER_OPS:
            flops, nbytes_, kind = 0, _scatter_bytes(node), "data"
            peak = self._peak(torch.float32, False)
        elif target in MOVE_OPS:
            flops, nbytes_, kind = 0, io_bytes(node), "data"
            peak = self._peak(torch.float32, False)
        elif isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
            flops, nbytes_, kind = (numel(outs[0]) if outs else 0), io_bytes(node), "pointwise"
            peak = self._peak(torch.float32, False)
        else:
            flops, nbytes_, kind = 0, io_bytes(node), "unknown"
            peak = self._peak(torch.float32, False)
        compute = flops / peak
        memory = nbytes_ / self.bandwidth
        time = sympy.Max(compute, memory) * correction + self.launch_s if isinstance(flops, Expr) or isinstance(
            nbytes_, Expr) else max(compute, memory) * correction + self.launch_s
        rows = m if kind == "matmul" else None
        return NodeCost(node.name, _op_name(target), kind, flops, nbytes_, time, compute, memory, shape, dtype, rows)

    def _evaluate(self, cost: NodeCost, sizes: Mapping[Any, int]) -> NodeCost:
        """`cost.evaluate(sizes)`, with the calibrated matmul correction for the now concrete M."""
        out = cost.evaluate(sizes)
        if self.profile and cost.kind == "matmul" and not isinstance(cost.rows, (int, float)) and \
                getattr(sympy.sympify(cost.rows), "free_symbols", None):
            dtype = getattr(torch, cost.dtype, torch.float32)
            corr = self._matmul_correction(dtype, out.rows)
            out = dataclasses.replace(out, time_s=max(out.compute_time_s, out.memory_time_s) * corr + self.launch_s)
        return out

    def estimate(self, what: torch.fx.Node | torch.fx.GraphModule | torch.fx.Graph | Iterable[torch.fx.Node],
                 sizes: Mapping[Any, int] | None = None) -> NodeCost | GraphCost | None:
        """A node's `NodeCost`, or a `GraphCost` of a graph / node list; evaluated at `sizes` when given."""
        if isinstance(what, torch.fx.Node):
            cost = self.node_cost(what)
            return self._evaluate(cost, sizes) if cost is not None and sizes is not None else cost
        nodes = what.graph.nodes if isinstance(what, torch.fx.GraphModule) else \
            what.nodes if isinstance(what, torch.fx.Graph) else what
        costs = [c for c in (self.node_cost(n) for n in nodes) if c is not None]
        if sizes is not None:
            costs = [self._evaluate(c, sizes) for c in costs]
        return GraphCost(costs)

    def group_cost(self, nodes: Iterable[torch.fx.Node], sizes: Mapping[Any, int] | None = None,
                   name: str = "group") -> NodeCost:
        """The nodes run as ONE kernel: their FLOPs (each at its own peak), the tensors they read from outside the
        group once, the values used outside the group written once, one launch.

        This is how a fusing lowering (Inductor for a pointwise chain, our generated kernels) runs them, where
        `estimate` prices each node as its own kernel. Free nodes (views) add nothing.
        """
        group = [n for n in nodes if n.op == "call_function"]
        members = set(group)
        flops, compute = sympy.Integer(0), sympy.Integer(0)
        inputs: dict[torch.fx.Node, None] = {}
        nbytes_ = sympy.Integer(0)
        for n in group:
            cost = self.node_cost(n)
            if cost is not None and cost.kind != "free":
                flops += sympy.sympify(cost.flops)
                compute += sympy.sympify(cost.compute_time_s)
            for a in n.all_input_nodes:
                if a not in members:
                    inputs[a] = None
            if any(u not in members for u in n.users):
                nbytes_ += sum((nbytes(t, stored=False) for t in tensors_in(n.meta.get("val"))), sympy.Integer(0))
        for a in inputs:
            nbytes_ += sum((nbytes(t) for t in tensors_in(a.meta.get("val"))), sympy.Integer(0))
        memory = nbytes_ / self.bandwidth
        launches = 1 if group else 0
        time = sympy.Max(compute, memory) + launches * self.launch_s
        out = next((t for n in reversed(group) for t in tensors_in(n.meta.get("val"))), None)
        cost = NodeCost(name, "fused", "fused", flops, nbytes_, time, compute, memory,
                        "x".join(str(s) for s in out.shape) if out is not None else "",
                        str(out.dtype).removeprefix("torch.") if out is not None else "")
        return cost.evaluate(sizes) if sizes is not None else cost

    def lowered_cost(self, items: Iterable[torch.fx.Node | NodeCost], lowering: str,
                     sizes: Mapping[Any, int] | None = None) -> GraphCost:
        """What `items` cost as `lowering` runs them: the one answer to "how would this lowering run these nodes",
        which every pass pricing a rewrite against the graph as it stands asks.

        items: graph nodes, or `NodeCost`s of kernels not in the graph (`candidate_cost`), each its own kernel.
        `lowering="eager"`: one kernel per node (`estimate`). A fusing lowering (`FUSING_LOWERINGS`: Inductor, our
        Triton lowering): matmuls, attention and custom ops (`EXTERN_KINDS`) as kernels of their own; the other
        nodes fused, each run of them connected through each other one kernel (`group_cost`).
        """
        items = list(items)
        nodes = [n for n in items if isinstance(n, torch.fx.Node)]
        out = [c if sizes is None else c.evaluate(sizes) for c in items if isinstance(c, NodeCost)]
        if lowering not in FUSING_LOWERINGS:
            return GraphCost(self.estimate(nodes, sizes).nodes + out)
        fused: list[torch.fx.Node] = []
        for n in nodes:
            cost = self.node_cost(n)
            if cost is None:
                continue
            if cost.kind in EXTERN_KINDS:
                out.append(self._evaluate(cost, sizes) if sizes is not None else cost)
            else:
                fused.append(n)
        for run in _connected_runs(fused):
            if any(self.node_cost(n).kind != "free" for n in run):  # views alone launch nothing
                out.append(self.group_cost(run, sizes, name=run[0].name))
        return GraphCost(out)

    def candidate_cost(self, target: Any, args: Sequence[Any], fake_mode: Any,
                       sizes: Mapping[Any, int] | None = None) -> NodeCost:
        """The cost of `target(*args)`, a kernel not (yet) in the graph: a pass prices the node it would add.

        args: graph nodes (their fake values are used), fake tensors (a weight not derived yet), or plain values.
        The node lives in a scratch graph, so the graph being rewritten is untouched.
        """
        scratch = torch.fx.Graph()
        lifted: dict[int, torch.fx.Node] = {}

        def lift(a: Any) -> Any:
            if not isinstance(a, (torch.fx.Node, torch.Tensor)):
                return a
            if id(a) not in lifted:
                p = scratch.placeholder(f"in{len(lifted)}")
                p.meta["val"] = val(a) if isinstance(a, torch.fx.Node) else a
                lifted[id(a)] = p
            return lifted[id(a)]

        fx_args = tuple(torch.fx.node.map_aggregate(a, lift) for a in args)
        node = scratch.call_function(target, fx_args)
        with fake_mode:
            node.meta["val"] = target(*fake_value(fx_args))
        return self.estimate(node, sizes)

    def compare(self, before: Any, after: Any, sizes: Mapping[Any, int] | None = None) -> dict[str, Any]:
        """Predicted time of a subgraph before and after a proposed rewrite (each a node list or graph)."""
        b, a = self.estimate(before, sizes), self.estimate(after, sizes)
        tb, ta = b.total("time_s", sizes), a.total("time_s", sizes)
        return {"before_s": tb, "after_s": ta, "speedup": tb / ta if ta else math.inf, "faster": ta < tb}


def _connected_runs(nodes: list[torch.fx.Node]) -> list[list[torch.fx.Node]]:
    """`nodes` split into the runs connected through each other (producer -> consumer edges among them), each in
    the order of `nodes`, runs ordered by their first node."""
    parent = {n: n for n in nodes}

    def root(n: torch.fx.Node) -> torch.fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for a in n.all_input_nodes:
            if a in parent:
                parent[root(a)] = root(n)
    runs: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n in nodes:
        runs.setdefault(root(n), []).append(n)
    return list(runs.values())


def _is_writeback(node: torch.fx.Node) -> bool:
    """`copy_(input, scatter(...))`: the mutation AOT keeps in the graph, done in place by the scatter."""
    if node.target is not aten.copy_.default or len(node.args) < 2:
        return False
    dst, src = node.args[:2]
    return isinstance(dst, torch.fx.Node) and dst.op == "placeholder" and isinstance(src, torch.fx.Node) and \
        src.target in SCATTER_OPS


def _scatter_bytes(node: torch.fx.Node) -> Expr:
    """Read the values and indices, write the values: everything but the base (args[0])."""
    total = sympy.Integer(0)
    for arg in node.all_input_nodes:
        if arg is node.args[0]:
            continue
        for t in tensors_in(arg.meta.get("val")):
            total += nbytes(t)
    src = [t for a in node.all_input_nodes if a is not node.args[0] for t in tensors_in(a.meta.get("val"))
           if t.is_floating_point()]
    return total + sum((nbytes(t) for t in src), sympy.Integer(0))


def example_sizes(fake_mode: Any) -> dict[Any, int]:
    """Symbol -> the value it had in the example inputs (Dynamo's hint), to evaluate a symbolic cost there."""
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None:
        return {}
    # torch 2.13 renamed var_to_val (which now warns) to backed_var_to_val; 2.11 has only the old name.
    values = shape_env.backed_var_to_val if hasattr(shape_env, "backed_var_to_val") else shape_env.var_to_val
    return {s: int(v) if float(v).is_integer() else float(v) for s, v in values.items()}


def _first_dtype(node: torch.fx.Node) -> torch.dtype:
    for a in node.all_input_nodes:
        for t in tensors_in(a.meta.get("val")):
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def _op_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
