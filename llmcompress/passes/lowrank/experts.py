"""`lowrank-split` for MoE experts stored as one 3-D weight (E, N, K), run by a grouped matmul
(`aten._grouped_mm(x, w, offs)` / `transformers::grouped_mm_fallback`, w (E, K, N), `fx_utils.grouped_matmul_ops`).

Each expert is factored on the rows routed to it (its own XᵀX: `svd-llm`, its own mean |x|: `asvd`), all at the one
rank of the 3-D weight, so that the factors stay 3-D, V (E, r, K) and U (E, N, r), and the split is two grouped
matmuls with the same offsets, x -> Vᵀ (E, K, r) -> Uᵀ (E, r, N). The weight's error curve for the rank allocation
is the experts' summed over their routed rows. An expert routed fewer than `MIN_EXPERT_ROWS` calibration rows is
factored by plain SVD and not refit (stats and a warning say which). Entry points: `observe_experts`,
`expert_statistics`, `experts_curve`, `factor_experts`, `lower_experts`; `lowrank_split.py` dispatches to them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from llmcompress.calibration.data import CalibrationWarning
from llmcompress.calibration.service import Calibration, TargetInputs
from llmcompress.calibration.stats import statistics_of
from llmcompress.fx_utils import call
from llmcompress.passes.base import PassContext
from llmcompress.passes.lowrank.asvd import asvd
from llmcompress.passes.lowrank.factors import Decomposition, refit_u
from llmcompress.passes.lowrank.svd import svd
from llmcompress.passes.lowrank.svdllm import svd_llm

aten = torch.ops.aten

# An expert routed fewer calibration rows than this is factored by plain SVD and not refit: a K x K XᵀX from a
# handful of tokens fits those tokens, not the expert (quantize-linear's and sparsify-linear's threshold).
MIN_EXPERT_ROWS = 16
FEW_ROWS = f"experts: plain svd (fewer than {MIN_EXPERT_ROWS} routed calibration rows)"

ExpertStats = list[dict[str, Any]]
"""Per expert: {kind: statistic over the rows routed to it, ..., "rows": their count}."""


def _offsets(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("offs", args[2] if len(args) > 2 else None)


def expert_statistics(inputs: TargetInputs, kinds: Sequence[str]) -> ExpertStats:
    """Statistics of each expert's routed rows: rows offs[e - 1]:offs[e] of the expert-sorted activation of every
    chunk (padding included: sorted rows no longer say which token they hold)."""
    k = inputs.inputs[0].shape[-1]
    xs = [x.reshape(-1, k) for x in inputs.inputs]
    bounds = [[0, *(int(v) for v in offs.tolist())] for offs in inputs.offsets()]
    out: ExpertStats = []
    for e in range(len(bounds[0]) - 1):
        st = statistics_of([x[b[e]:b[e + 1]] for x, b in zip(xs, bounds)], kinds, k, device=xs[0].device)
        out.append({**st.as_dict(), "rows": st.rows})
    return out


def observe_experts(cal: Calibration, gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node],
                    kinds: Sequence[str]) -> dict[torch.fx.Node, ExpertStats]:
    """One run of the graph as it is (nothing replaced) for the per-expert statistics of grouped matmul `nodes`
    (`Calibration.observe` gives statistics over all rows, not per expert)."""
    out: dict[torch.fx.Node, ExpertStats] = {}

    def at_target(inputs: TargetInputs) -> None:
        out[inputs.node] = expert_statistics(inputs, kinds)

    cal.run_sequential(gm, list(nodes), at_target)
    return out


def decompose_experts(weight: torch.Tensor, method: str, stats: ExpertStats | None, alpha: float, damp: float
                      ) -> tuple[list[Decomposition], list[str]]:
    """Each expert's `Decomposition` of weight (E, N, K), and the experts (with their row counts) that had too few
    routed rows for `method` and were decomposed by plain SVD."""
    decs, few = [], []
    for e in range(weight.shape[0]):
        st = stats[e] if stats is not None else None
        if method == "svd" or st is None:
            decs.append(svd(weight[e]))
        elif st["rows"] < MIN_EXPERT_ROWS:
            few.append(f"{e} ({st['rows']} rows)")
            decs.append(svd(weight[e]))
        elif method == "asvd":
            decs.append(asvd(weight[e], st["absmean"], alpha))
        else:
            decs.append(svd_llm(weight[e], st["gram"], damp))
    return decs, few


def experts_curve(decs: list[Decomposition], stats: ExpertStats | None) -> torch.Tensor:
    """(m + 1,) float64: the 3-D weight's output error against its one rank, the experts' errors weighted by their
    routed rows (the mean error over every routed row); without statistics the sum of the weight errors."""
    if stats is None:
        return sum(d.error_curve(None) for d in decs)
    total = max(sum(st["rows"] for st in stats), 1)
    return sum(d.error_curve(st["gram"]) * (st["rows"] / total) for d, st in zip(decs, stats))


def factor_experts(weight: torch.Tensor, decs: list[Decomposition], rank: int, stats: ExpertStats | None,
                   refit: bool) -> dict[str, torch.Tensor]:
    """{"u": (E, N, r), "v": (E, r, K)} in the weight's dtype, each expert truncated to `rank` and, with `refit`,
    its U refit on its routed rows (experts with fewer than `MIN_EXPERT_ROWS` rows keep the truncated U)."""
    us, vs = [], []
    for e, d in enumerate(decs):
        u, v = d.factors(rank)
        st = stats[e] if stats is not None else None
        if refit and st is not None and st["rows"] >= MIN_EXPERT_ROWS:
            u = refit_u(weight[e], v, st["gram"])
        us.append(u)
        vs.append(v)
    return {"u": torch.stack(us).to(weight.dtype).contiguous(), "v": torch.stack(vs).to(weight.dtype).contiguous()}


def warn_few_rows(name: str, few: list[str]) -> None:
    warnings.warn(f"llmcompress: lowrank-split: {name}: experts {', '.join(few)} got fewer than {MIN_EXPERT_ROWS} "
                  "calibration rows and are factored by plain SVD (not refit); give more calibration samples to "
                  "calibrate them", CalibrationWarning, stacklevel=3)


def grouped_split(node: torch.fx.Node, u: torch.Tensor, v: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The split expert weight as the grouped matmul's replacement in a calibration run: x -> Vᵀ -> Uᵀ."""
    a, b = v.transpose(-2, -1), u.transpose(-2, -1)
    op = node.target

    def run(x: torch.Tensor, _w: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
        offs = _offsets((x, _w, *rest), kw)
        return op(op(x, a, offs), b, *rest, **kw)

    return run


def _split_pays(ctx: PassContext, dense: torch.fx.Node, first: torch.fx.Node, second: torch.fx.Node
                ) -> tuple[bool, dict[str, Any] | None]:
    """Whether the two grouped matmuls are no slower than the dense one at the compile's sizes, per the cost
    model (2-D layers ask `kernels/lowrank_path` through `lowrank_split._plan`). Without a cost model the split
    is taken."""
    if ctx.cost_model is None:
        return True, None
    try:
        before = float(ctx.cost_model.estimate(dense, ctx.sizes).time_s)
        after = float(ctx.cost_model.estimate(first, ctx.sizes).time_s) + float(
            ctx.cost_model.estimate(second, ctx.sizes).time_s)
    except Exception as e:  # noqa: BLE001 - a pricing gap must not fail the rewrite
        return True, {"error": f"{type(e).__name__}: {e}"}
    return after <= before, {"dense_s": before, "split_s": after}


def lower_experts(gm: torch.fx.GraphModule, ctx: PassContext, node: torch.fx.Node, name: str, method: str,
                  weight: torch.Tensor, rank: int | None, factors: tuple[torch.Tensor, torch.Tensor] | None,
                  objective: str, meta_key: str) -> dict[str, Any]:
    """A split 3-D expert weight's lowering, returning its report decision: two grouped matmuls (the node's own op)
    with the node's offsets, x -> Vᵀ (E, K, r) -> Uᵀ (E, r, N), the factors stored (E, r, K) and (E, N, r) and
    transposed in the graph as transformers stores its experts; both nodes marked `meta_key`. Dense where the
    allocation kept it, where no bytes are saved, or (objective `speed`) where the cost model prices the split
    slower."""
    n_experts, n, k = weight.shape
    elem = weight.element_size()
    info: dict[str, Any] = {"method": method, "shape": [n_experts, n, k], "dense_bytes": weight.numel() * elem}

    def dense(why: str, reason: str, **extra: Any) -> dict[str, Any]:
        return {"node": node.name, "layer": name, "rank": {"rank": "dense", "why": why, "reason": reason, **info,
                                                           **extra}}

    if rank is None:
        return dense("allocation", "the rank allocation kept these experts dense (their error curve is steep enough "
                     "that their full E N K parameters buy more than ranks elsewhere)")
    if factors is None:
        return dense("no bytes saved", f"rank {rank} >= N K / (N + K) = {n * k / (n + k):.1f}: the factors would "
                     f"store at least the dense experts' {n_experts * n * k} parameters", asked=rank)
    u, v = factors
    offs = _offsets(node.args, node.kwargs)
    first_args, first_kw = ((offs,), {}) if len(node.args) > 2 else ((), {"offs": offs})
    with gm.graph.inserting_before(node):
        v_const = ctx.weights.add(gm, v, f"{name}.lowrank_v")
        u_const = ctx.weights.add(gm, u, f"{name}.lowrank_u")
        v_t = call(gm.graph, ctx.fake_mode, aten.transpose.int, (v_const, -2, -1), {})
        u_t = call(gm.graph, ctx.fake_mode, aten.transpose.int, (u_const, -2, -1), {})
        first = call(gm.graph, ctx.fake_mode, node.target, (node.args[0], v_t, *first_args), first_kw)
        second = call(gm.graph, ctx.fake_mode, node.target, (first, u_t, *node.args[2:]), dict(node.kwargs))
    pays, priced = _split_pays(ctx, node, first, second)
    if objective == "speed" and not pays:
        for x in (second, first, u_t, v_t, u_const, v_const):
            gm.graph.erase_node(x)
        return dense("slower", "cost model: the split (two grouped matmuls) is slower than dense at the compile's "
                     "sizes (objective: speed; objective: memory splits it anyway)", asked=rank, predicted=priced)
    for part, new in (("v", first), ("u", second)):
        new.meta.update({key: val for key, val in node.meta.items() if key != "val"})
        new.meta["llmcompress.linear"] = f"{name}.lowrank_{part}"
        new.meta[meta_key] = {"layer": name, "factor": part, "rank": rank, "method": method}
    node.replace_all_uses_with(second)
    gm.graph.erase_node(node)
    info.update(stored_bytes=(u.numel() + v.numel()) * elem, kernel="two grouped matmuls (x -> V -> U, same offsets)",
                predicted=priced)
    return {"node": second.name, "layer": name, "rank": {"rank": rank, **info}}


__all__ = ["FEW_ROWS", "MIN_EXPERT_ROWS", "decompose_experts", "expert_statistics", "experts_curve",
           "factor_experts", "grouped_split", "lower_experts", "observe_experts", "warn_few_rows"]
