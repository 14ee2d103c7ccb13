"""`fuse-linear-epilogue`: a dense linear with what runs right before and after it -> one `llmcompress::fused_linear`.

Matched around a canonical `aten.linear(x, W, b)` on a frozen weight (`kernels/fused_linear.py` has the kernels):
- prologue: RMSNorm without its weight (`fold-into-weights` folded γ into W), HF LlamaRMSNorm's aten chain
  `[_to_copy(fp32)] -> pow 2 -> mean(-1, keepdim) -> add eps -> rsqrt -> mul -> [_to_copy back]`, then maybe
  alias or whole-dimension slices (before an LM head), whose result feeds only this linear (or only the gate and up
  linears of one gated pair) -> `rms_eps`; the norm's upcast is then not taken as the previous linear's output
  cast. eps must be a constant: under `dynamic=True` Dynamo makes it a graph input and the norm stays;
- epilogue on the output y, in this order, each optional: an activation (`aten.silu`, `aten.gelu` with approximate
  none or tanh, `aten.relu`, GPT-2's spelled-out tanh GELU); or act(gate)·up (SwiGLU, GeGLU) in three spellings:
  two linears on the same x (`mul(act(linear(x, Wg)), linear(x, Wu))`: the concatenated weight becomes a derived
  constant), one linear on concatenated weights followed by last-dim `slice`s (`fuse-sibling-linears`) or by
  `split` + getitems (Phi-3's gate_up_proj + chunk); then a residual `add(y, r)` (either order, same shape and dtype, no
  broadcasting); then a dtype cast `_to_copy(y, dtype=...)` (rounded once, from fp32, instead of twice).
  `clone`s between them (dropout in eval) are looked through.
Every value of the chain but its last must be used only inside it: a linear whose output is also used elsewhere
stays as it is; an activation whose output is ends the chain there (linear + activation fuse, the product with up
does not).

The cost model decides each match: the replaced nodes priced as the lowering would run them (`lowering="eager"`:
one kernel per node; Inductor and our Triton lowering: the matmul alone, and the pointwise / reduction nodes before
and after it fused into one kernel each: `CostModel.lowered_cost`) against the fused op's own cost; `force` fuses
every match. The op's `gemv_max_m` is where the cost model stops preferring the GEMV (`kernels/kernel_path.py`).

Quantized linears (`llmcompress::linear_w4a16` and the other quantize-linear ops) are left alone in this version:
only dense `aten.linear` nodes are matched.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
from typing import Any, ClassVar, Optional

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from llmcompress.fx_utils import call, fake_mode_of, only_user, same_shape, val
from llmcompress.kernels import fused_linear as _fused_linear  # noqa: F401 - registers torch.ops.llmcompress.fused_linear
from llmcompress.kernels.kernel_path import choose_gemv_max_m
from llmcompress.kernels.linear_common import GEMV_MAX_M, SUPPORTED_DTYPES
from llmcompress.passes.base import Pass, PassContext, PassResult
from llmcompress.passes.fusion.device import no_triton_reason

aten = torch.ops.aten
OP = torch.ops.llmcompress.fused_linear.default
_CLONES = (aten.clone.default, aten.alias.default)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class FuseLinearEpilogueOptions:
    force: bool = False
    """Fuse every match, whatever the cost model says, and put plain dense linears on our kernel too (what
    `lowering="triton"` wants)."""
    prologue: bool = True
    """Match the RMSNorm prologue."""
    version: ClassVar[int] = 1


@dataclasses.dataclass
class _Match:
    """One rewrite: the op's arguments and the nodes it replaces."""

    linears: list[torch.fx.Node]  # [L] or, for the two-linear gated form, [gate, up]
    x: torch.fx.Node
    last: torch.fx.Node  # the node whose uses the fused op takes over
    prologue: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    epilogue: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    rms_eps: Optional[float] = None
    activation: str = "none"
    gated: bool = False
    residual: Optional[torch.fx.Node] = None
    out_dtype: Optional[torch.dtype] = None
    gemv_max_m: int = GEMV_MAX_M
    pattern: list[str] = dataclasses.field(default_factory=list)


def _is_call(n: Any, *targets) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def _through_clones(n: torch.fx.Node, chain: list[torch.fx.Node]) -> torch.fx.Node:
    """n, or the last of the clones that are n's only user in a row (appended to chain): dropout in eval."""
    while (u := only_user(n)) is not None and _is_call(u, *_CLONES) and \
            u.kwargs.get("memory_format", torch.contiguous_format) in (torch.contiguous_format, torch.preserve_format):
        chain.append(u)
        n = u
    return n


def _scalar_arg(n: torch.fx.Node, base: torch.fx.Node) -> Optional[float]:
    """c when n is `base op c` or `c op base` (a Python number c), else None."""
    a, b = (n.args + (None, None))[:2]
    if a is base and isinstance(b, (int, float)):
        return float(b)
    if b is base and isinstance(a, (int, float)):
        return float(a)
    return None


def _is_scalar_op(n: Any, target, base: torch.fx.Node, value: float) -> bool:
    if not _is_call(n, target) or n.kwargs.get("alpha", 1) != 1:
        return False
    c = _scalar_arg(n, base)
    return c is not None and math.isclose(c, value, rel_tol=1e-6)


def _other(n: torch.fx.Node, one: torch.fx.Node) -> Any:
    a, b = n.args[:2]
    return b if a is one else a if b is one else None


def _activation(y: torch.fx.Node, chain: list[torch.fx.Node]) -> Optional[tuple[str, torch.fx.Node]]:
    """(name, output) of an activation applied to y alone, with its nodes appended to chain; None if none is."""
    u = only_user(y)
    if _is_call(u, aten.silu.default):
        chain.append(u)
        return "silu", u
    if _is_call(u, aten.relu.default):
        chain.append(u)
        return "relu", u
    if _is_call(u, aten.gelu.default):
        approx = u.kwargs.get("approximate", u.args[1] if len(u.args) > 1 else "none")
        if approx in ("none", "tanh"):
            chain.append(u)
            return ("gelu" if approx == "none" else "gelu_tanh"), u
    return _new_gelu(y, chain)


def _new_gelu(y: torch.fx.Node, chain: list[torch.fx.Node]) -> Optional[tuple[str, torch.fx.Node]]:
    """GPT-2's NewGELUActivation as AOT traces it:
    mul(mul(y, 0.5), add(tanh(mul(add(y, mul(pow(y, 3), 0.044715)), sqrt(2/pi))), 1))."""
    users = list(y.users)
    if len(users) != 3:
        return None
    half = next((u for u in users if _is_scalar_op(u, aten.mul.Tensor, y, 0.5)), None)
    cube = next((u for u in users if _is_call(u, aten.pow.Tensor_Scalar) and u.args[0] is y and u.args[1] == 3), None)
    inner = next((u for u in users if _is_call(u, aten.add.Tensor) and u.kwargs.get("alpha", 1) == 1
                  and isinstance(_other(u, y), torch.fx.Node)), None)
    if half is None or cube is None or inner is None:
        return None
    scaled_cube = _other(inner, y)
    scaled = only_user(inner)
    th = only_user(scaled) if scaled is not None else None
    one_plus = only_user(th) if th is not None else None
    out = only_user(half)
    if not (_is_scalar_op(scaled_cube, aten.mul.Tensor, cube, 0.044715)
            and _is_scalar_op(scaled, aten.mul.Tensor, inner, _SQRT_2_OVER_PI) and _is_call(th, aten.tanh.default)
            and _is_scalar_op(one_plus, aten.add.Tensor, th, 1.0) and _is_call(out, aten.mul.Tensor)
            and _other(out, half) is one_plus):
        return None
    nodes = [half, cube, scaled_cube, inner, scaled, th, one_plus, out]
    chain.extend(nodes)
    return "gelu_tanh", out


def _is_identity_view(n: Any) -> bool:
    """alias, or a slice over a whole dimension with step 1 (how `hidden[:, slice(None)]` traces)."""
    if _is_call(n, aten.alias.default):
        return True
    if not _is_call(n, aten.slice.Tensor) or val(n) is None or val(n.args[0]) is None:
        return False
    dim, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
    size = val(n.args[0]).shape[dim]
    return (start or 0) == 0 and step == 1 and (end is None or statically_known_true(end >= size))


def _rms_prologue(x: torch.fx.Node, consumers: set[torch.fx.Node]) -> Optional[tuple[torch.fx.Node, float, list]]:
    """(x0, eps, nodes) when x = RMSNorm-without-weight(x0) in HF's spelling and only `consumers` read x."""
    if set(x.users) != consumers:
        return None
    nodes = []
    h = x
    while _is_identity_view(h):  # `hidden[:, slice(None)]` before an LM head
        nodes.append(h)
        h = h.args[0]
    if _is_call(h, aten._to_copy.default) and set(h.kwargs) <= {"dtype"}:
        nodes.append(h)
        h = h.args[0]
    if not _is_call(h, aten.mul.Tensor) or len(h.args) != 2:
        return None
    mul = h
    for xf, rs in (mul.args, reversed(mul.args)):
        if not (_is_call(rs, aten.rsqrt.default) and isinstance(xf, torch.fx.Node)):
            continue
        add = rs.args[0]
        mean = add.args[0] if _is_call(add, aten.add.Tensor) and add.kwargs.get("alpha", 1) == 1 else None
        eps = add.args[1] if mean is not None else None
        if not (_is_call(mean, aten.mean.dim) and isinstance(eps, (int, float)) and eps >= 0):
            continue
        pw = mean.args[0]
        dims = list(mean.args[1]) if len(mean.args) > 1 else []
        keep = mean.kwargs.get("keepdim", mean.args[2] if len(mean.args) > 2 else False)
        ndim = val(pw).dim() if val(pw) is not None else -1
        if not (_is_call(pw, aten.pow.Tensor_Scalar) and pw.args[0] is xf and pw.args[1] == 2 and keep
                and dims in ([-1], [ndim - 1]) and mean.kwargs.get("dtype") is None):
            continue
        inner = [mul, rs, add, mean, pw]
        x0 = xf
        if _is_call(xf, aten._to_copy.default) and set(xf.kwargs) <= {"dtype"} and \
                xf.kwargs.get("dtype") == torch.float32:
            inner.append(xf)
            x0 = xf.args[0]
        x0v, xv = val(x0), val(x)
        if x0v is None or xv is None or x0v.dtype != xv.dtype or x0v.dtype not in SUPPORTED_DTYPES:
            return None
        if val(mul).dtype != torch.float32 and x0 is not xf:
            return None
        nodes = nodes + inner
        members = set(nodes) | consumers
        if any(set(n.users) - members for n in nodes):
            return None  # the normalized row or a partial result is used elsewhere
        return x0, float(eps), nodes
    return None


def _starts_rms_prologue(cast: torch.fx.Node) -> bool:
    """Whether `cast` is the fp32 upcast at the start of an RMSNorm that a later linear takes as its prologue:
    left in place, since that fusion removes the whole norm kernel and needs x in the weight's dtype."""
    pw = next((u for u in cast.users if _is_call(u, aten.pow.Tensor_Scalar)), None)
    n = pw
    for _ in range(3):  # pow -> mean -> add -> rsqrt
        n = only_user(n) if n is not None else None
    mul = only_user(n) if _is_call(n, aten.rsqrt.default) else None
    if not _is_call(mul, aten.mul.Tensor):
        return False
    out = only_user(mul)
    x = out if _is_call(out, aten._to_copy.default) else mul
    while _is_identity_view(only_user(x)):
        x = only_user(x)
    consumers = set(x.users)
    if not consumers or not all(_is_call(u, aten.linear.default) for u in consumers):
        return False
    rms = _rms_prologue(x, consumers)
    return rms is not None and cast in rms[2]


class FuseLinearEpiloguePass(Pass):
    """See the module docstring."""

    name: ClassVar[str] = "fuse-linear-epilogue"
    description: ClassVar[str] = ("Dense linear + RMSNorm prologue / bias, activation, SiLU(gate)·up, residual, "
                                  "cast epilogue -> one llmcompress::fused_linear")
    Options = FuseLinearEpilogueOptions
    after: ClassVar[tuple[str, ...]] = ("canonicalize", "fold-into-weights", "fuse-sibling-linears", "quantize-linear")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: collections.Counter[str] = collections.Counter()
        decisions: list[dict[str, Any]] = []
        fake_mode = fake_mode_of(gm) or ctx.fake_mode
        reason = None if self.options.force else no_triton_reason(ctx)
        if reason is not None:
            return PassResult(False, {f"skipped: {reason}": 1})
        done: set[torch.fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node in done or not _is_call(node, aten.linear.default):
                continue
            match = self._match(node, ctx, stats)
            if match is None:
                continue
            decision = self._decide(match, ctx, fake_mode)
            decisions.append(decision)
            done.update(match.linears)  # a gated pair is matched from either linear: decide it once
            if not decision["fused"]:
                stats["skipped: not faster"] += 1
                continue
            self._rewrite(gm, match, ctx, fake_mode, decision)
            stats["fused"] += 1
            stats[f"fused: {decision['pattern']}"] += 1
        return PassResult(stats["fused"] > 0, dict(stats), decisions)

    def _linear_ok(self, lin: torch.fx.Node, ctx: PassContext, stats=None) -> bool:
        """A dense linear the op computes: frozen 2-D weight in x's dtype, a 1-D bias in it or none."""
        x, w = lin.args[:2]
        b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if not ctx.weights.is_constant(w):
            if stats is not None:
                stats["skipped: dynamic weight"] += 1
            return False
        xv, wv, bv = val(x), val(w), val(b)
        ok = xv is not None and wv is not None and wv.dim() == 2 and xv.dtype == wv.dtype and \
            xv.dtype in SUPPORTED_DTYPES and (b is None or (bv is not None and bv.dim() == 1 and bv.dtype == xv.dtype))
        if not ok and stats is not None:
            stats["skipped: dtype or shape"] += 1
        return ok

    def _match(self, lin: torch.fx.Node, ctx: PassContext, stats) -> Optional[_Match]:
        if not self._linear_ok(lin, ctx, stats):
            return None
        m = _Match(linears=[lin], x=lin.args[0], last=lin)
        chain: list[torch.fx.Node] = []
        end = _through_clones(lin, chain)
        gated = self._gated(lin, end, ctx, chain)
        if gated is not None:
            m.linears, m.activation, end = gated
            m.gated = True
            m.pattern.append(f"{m.activation}*up")
        else:
            act = _activation(end, chain)
            if act is not None:
                m.activation, end = act
                m.pattern.append(m.activation)
        end = _through_clones(end, chain)
        add = only_user(end)
        if _is_call(add, aten.add.Tensor) and add.kwargs.get("alpha", 1) == 1 and len(add.args) == 2:
            r, ev = _other(add, end), val(end)
            rv = val(r)
            if isinstance(r, torch.fx.Node) and r is not end and rv is not None and rv.dtype == ev.dtype and \
                    same_shape(rv.shape, ev.shape) and same_shape(val(add).shape, ev.shape):
                m.residual, end = r, add
                chain.append(add)
                m.pattern.append("residual")
        cast = only_user(end)
        if _is_call(cast, aten._to_copy.default) and set(cast.kwargs) <= {"dtype"} and \
                cast.kwargs.get("dtype") in SUPPORTED_DTYPES and not cast.args[1:] and \
                not (self.options.prologue and _starts_rms_prologue(cast)):
            m.out_dtype, end = cast.kwargs["dtype"], cast
            chain.append(cast)
            m.pattern.append(f"cast:{str(m.out_dtype).removeprefix('torch.')}")
        m.epilogue, m.last = chain, end
        members = set(chain) | set(m.linears)
        if any(set(n.users) - members for n in [*m.linears, *chain] if n is not end):
            return None  # the pattern helpers check sole users; this catches a gated pair's leftovers
        if self.options.prologue:
            rms = _rms_prologue(m.x, set(m.linears))
            if rms is not None:
                m.x, m.rms_eps, m.prologue = rms
                m.pattern.insert(0, "rms")
        if not m.pattern and not self.options.force:
            return None  # a plain linear: only `force` (lowering="triton") moves it onto our kernel
        m.pattern.insert(1 if m.prologue else 0, "linear")
        return m

    def _gated(self, lin, end, ctx, chain) -> Optional[tuple[list, str, torch.fx.Node]]:
        """([gate] or [gate, up], activation, the product node) when lin starts an act(gate)·up."""
        n_w = val(lin.args[1]).shape[0]
        halves = self._halves(end, n_w)
        if halves is not None:
            (gate, up), views = halves
            sub: list[torch.fx.Node] = []
            act = _activation(gate, sub)
            prod = act and only_user(act[1])
            if act and _is_call(prod, aten.mul.Tensor) and _other(prod, act[1]) is up and only_user(up) is prod:
                chain.extend(views + sub + [prod])
                return [lin], act[0], prod
            return None
        if end is not lin:
            return None
        # Two linears on one x: lin is the gate (act(lin) * other) or the up (act(other) * lin).
        sub = []
        act = _activation(lin, sub)
        if act is not None:
            prod = only_user(act[1])
            other = _other(prod, act[1]) if _is_call(prod, aten.mul.Tensor) else None
            pair = (lin, other)
        else:
            prod = only_user(lin)
            other = _other(prod, lin) if _is_call(prod, aten.mul.Tensor) else None
            if not isinstance(other, torch.fx.Node) or not (len(other.args) == 1 or other.target is aten.gelu.default):
                return None
            src = other.args[0]
            act = _activation(src, sub) if isinstance(src, torch.fx.Node) else None
            if act is None or act[1] is not other:
                return None
            pair = (src, lin)
        gate, up = pair
        if not (_is_call(gate, aten.linear.default) and _is_call(up, aten.linear.default) and gate is not up
                and gate.args[0] is up.args[0] and only_user(up) is prod and only_user(gate) is not None):
            return None
        if not (self._linear_ok(gate, ctx) and self._linear_ok(up, ctx)):
            return None
        gv, uv = val(gate.args[1]), val(up.args[1])
        if not (same_shape(gv.shape, uv.shape) and gv.dtype == uv.dtype):
            return None
        bg, bu = (l.args[2] if len(l.args) > 2 else None for l in (gate, up))
        if (bg is None) != (bu is None) or (bg is not None and not (ctx.weights.is_constant(bg)
                                                                     and ctx.weights.is_constant(bu))):
            return None
        chain.extend(sub + [prod])
        return [gate, up], act[0], prod

    @staticmethod
    def _halves(y: torch.fx.Node, n_w) -> Optional[tuple[tuple[torch.fx.Node, torch.fx.Node], list]]:
        """((first half, second half), view nodes) when y's only users split its last dim in two equal halves."""
        yv = val(y)
        if yv is None or not isinstance(n_w, int) or n_w % 2:
            return None
        half, last = n_w // 2, yv.dim() - 1
        users = list(y.users)
        if len(users) == 1 and _is_call(users[0], aten.split.Tensor, aten.split_with_sizes.default):
            sp = users[0]
            size = sp.args[1]
            dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
            if dim % yv.dim() != last or size not in (half, [half, half]):
                return None
            items = {u.args[1]: u for u in sp.users if u.target is operator.getitem}
            if len(items) != 2 or len(sp.users) != 2:
                return None
            return (items[0], items[1]), [sp, items[0], items[1]]
        if len(users) != 2 or not all(_is_call(u, aten.slice.Tensor) for u in users):
            return None
        spans = {}
        for u in users:
            dim, start, end, step = (list(u.args[1:]) + [0, None, None, 1][len(u.args) - 1:])[:4]
            start, end = start or 0, n_w if end is None else min(end, n_w)
            if dim % yv.dim() != last or step != 1:
                return None
            spans[(start, end)] = u
        if set(spans) != {(0, half), (half, n_w)}:
            return None
        return (spans[(0, half)], spans[(half, n_w)]), list(spans.values())

    def _decide(self, m: _Match, ctx: PassContext, fake_mode) -> dict[str, Any]:
        lin = m.linears[0]
        w = val(lin.args[1])
        n_w, k = w.shape[0] * len(m.linears), w.shape[1]
        gemv_max_m, priced = choose_gemv_max_m(ctx.cost_model, int(n_w), int(k), w.dtype)
        m.gemv_max_m = gemv_max_m
        decision = {"node": lin.name, "weight": ctx.weights.name(lin.args[1]), "pattern": "+".join(m.pattern),
                    "gemv_max_m": gemv_max_m, "gemv_priced": priced}
        cm = ctx.cost_model
        if cm is None:
            return {**decision, "before_s": None, "after_s": None, "fused": True}
        try:
            before = self._time_before(m, ctx)
            after = float(cm.candidate_cost(OP, self._candidate_args(m, fake_mode), fake_mode, ctx.sizes).time_s)
        except Exception as e:  # noqa: BLE001 - a pricing gap must not fail the pass: then only `force` fuses
            return {**decision, "error": f"{type(e).__name__}: {e}", "fused": self.options.force}
        return {**decision, "before_s": before, "after_s": after, "fused": self.options.force or after < before}

    def _time_before(self, m: _Match, ctx: PassContext) -> float:
        """The replaced nodes as the lowering runs them (`CostModel.lowered_cost`): one kernel each (eager), or the
        matmuls alone and the prologue and epilogue each fused into one kernel (Inductor, our Triton lowering)."""
        nodes = [*m.prologue, *m.linears, *m.epilogue]
        return ctx.cost_model.lowered_cost(nodes, ctx.config.lowering, ctx.sizes).total("time_s")

    def _args(self, m: _Match, w, bias) -> tuple:
        return (m.x, w, bias, m.residual, m.activation, m.gated, m.rms_eps, m.gemv_max_m, m.out_dtype)

    def _candidate_args(self, m: _Match, fake_mode) -> tuple:
        """The fused op's arguments for the cost model to price it: nodes, and the fake weight (and bias) it would
        read, [W_gate; W_up] for a two-linear gated pair."""
        lin = m.linears[0]
        w, b = val(lin.args[1]), val(lin.args[2]) if len(lin.args) > 2 else None
        if len(m.linears) == 2:
            with fake_mode:
                w = torch.empty((2 * w.shape[0], w.shape[1]), dtype=w.dtype, device=w.device)
                b = None if b is None else torch.empty((2 * b.shape[0],), dtype=b.dtype, device=b.device)
        return self._args(m, w, b)

    def _rewrite(self, gm, m: _Match, ctx: PassContext, fake_mode, decision) -> None:
        graph = gm.graph
        lin = m.linears[0]
        w, b = lin.args[1], lin.args[2] if len(lin.args) > 2 else None
        with graph.inserting_before(m.last):
            if len(m.linears) == 2:
                w, b = self._concat(gm, m, ctx)
                decision["weight"] = ctx.weights.name(w)
            new = call(graph, fake_mode, OP, self._args(m, w, b))
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "llmcompress.linear"):
            if key in lin.meta:
                new.meta[key] = lin.meta[key]
        m.last.replace_all_uses_with(new)
        replaced = set(m.prologue) | set(m.linears) | set(m.epilogue)
        for n in reversed(list(graph.nodes)):
            if n in replaced:
                if n.users:
                    raise RuntimeError(f"fuse-linear-epilogue: {n.name} is still used by {list(n.users)} after the "
                                       "rewrite; the match was wrong")
                graph.erase_node(n)

    def _concat(self, gm, m: _Match, ctx: PassContext) -> tuple[torch.fx.Node, Optional[torch.fx.Node]]:
        """[W_gate; W_up] (and [b_gate; b_up]) as derived constants, derived over both weights: the cache keys them
        on both tensors' identities and versions, so a change to either recomputes them."""
        gate, up = m.linears
        out = []
        for idx in (1, 2):
            g, u = gate.args[idx] if len(gate.args) > idx else None, up.args[idx] if len(up.args) > idx else None
            if g is None:
                out.append(None)
                continue
            cat = ctx.weights.derive([g, u], self.cache_key("gate-up-cat"), lambda gu: torch.cat(gu, dim=0))
            out.append(ctx.weights.add(gm, cat, _joined_name(ctx.weights.name(g), ctx.weights.name(u))))
        return out[0], out[1]


def _joined_name(a: Optional[str], b: Optional[str]) -> str:
    """`model.layers.0.mlp.gate_proj.weight` + `...up_proj.weight` -> `model.layers.0.mlp.gate_proj+up_proj.weight`."""
    if not a or not b:
        return f"{a}+{b}"
    pa, pb = a.split("."), b.split(".")
    i = 0
    while i < min(len(pa), len(pb)) and pa[i] == pb[i]:
        i += 1
    j = 0
    while j < min(len(pa), len(pb)) - i and pa[-1 - j] == pb[-1 - j]:
        j += 1
    mid = "+".join(p for p in (".".join(pa[i:len(pa) - j]), ".".join(pb[i:len(pb) - j])) if p)
    return ".".join([*pa[:i], mid, *pa[len(pa) - j:]]) if mid else a


__all__ = ["FuseLinearEpilogueOptions", "FuseLinearEpiloguePass"]
