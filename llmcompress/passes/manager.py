"""`PassManager`: orders passes from their `after`/`before` constraints, runs them, and undoes a pass that fails."""

from __future__ import annotations

import collections
import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

import networkx as nx
import torch

from llmcompress._logging import logger
from llmcompress.errors import LLMCompressError, PassFailedError, PassOrderError, did_you_mean
from llmcompress.passes.base import Pass, PassContext, PassResult, split_graphs
from llmcompress.passes.registry import get_pass, registered_passes
from llmcompress.recipes import PassSpec


class PassFallbackWarning(UserWarning):
    """A pass raised; the graph was restored to its state before that pass and compilation went on."""


@dataclasses.dataclass
class PassRecord:
    """What one pass did to one graph, as written to the compile report."""

    name: str
    status: str
    """'changed', 'unchanged' or 'failed'."""
    time_s: float
    stats: dict[str, Any]
    ops_added: dict[str, int]
    ops_removed: dict[str, int]
    decisions: list[dict[str, Any]]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def order_passes(passes: Sequence[Pass]) -> list[Pass]:
    """Topological order that keeps the given order wherever the constraints leave a choice."""
    known = registered_passes()
    index = {p.name: i for i, p in enumerate(passes)}
    graph = nx.DiGraph()
    graph.add_nodes_from(index)
    for p in passes:
        for rel, names in (("after", p.after), ("before", p.before)):
            for other in names:
                if other not in known:
                    raise PassOrderError(
                        f"pass {p.name!r} declares {rel}={other!r}, which is not a registered pass"
                        f"{did_you_mean(other, known)}; "
                        f"registered: {', '.join(known)}"
                    )
                if other in index:
                    graph.add_edge(*((other, p.name) if rel == "after" else (p.name, other)))
    try:
        names = list(nx.lexicographical_topological_sort(graph, key=index.__getitem__))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
        raise PassOrderError(f"pass ordering constraints form a cycle: {cycle} -> {cycle.split(' -> ')[0]}") from None
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in names]


def _op_counts(graph: torch.fx.Graph) -> collections.Counter[str]:
    return collections.Counter(
        "get_attr" if n.op == "get_attr" else str(n.target)
        for n in graph.nodes
        if n.op in ("call_function", "call_method", "call_module", "get_attr")
    )


class _Snapshot:
    """The graph and the attribute names of a GraphModule, to restore after a failing pass."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.graph = torch.fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
        out = self.graph.graph_copy(gm.graph, {})
        self.graph.output(out)
        self.graph._codegen = gm.graph._codegen
        self.attrs = set(gm.__dict__) | set(gm._buffers) | set(gm._parameters) | set(gm._modules)

    def restore(self, gm: torch.fx.GraphModule) -> None:
        for name in (set(gm.__dict__) | set(gm._buffers) | set(gm._parameters) | set(gm._modules)) - self.attrs:
            delattr(gm, name)
        gm.graph = self.graph
        gm.recompile()


class PassManager:
    """Runs passes in constraint order on one GraphModule; see `run`."""

    def __init__(self, passes: Sequence[Pass], *, strict: bool = False) -> None:
        names = [p.name for p in passes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PassOrderError(f"pass {dupes[0]!r} appears twice in the pipeline; list each pass once")
        self.passes = order_passes(passes)
        self.strict = strict

    @classmethod
    def from_specs(cls, specs: Sequence[PassSpec], *, strict: bool = False) -> PassManager:
        return cls([get_pass(s.name)(s.options) for s in specs], strict=strict)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> list[PassRecord]:
        """Run every pass; a pass that raises (or leaves a graph that fails lint) is undone and warned about,
        or re-raised as `PassFailedError` under `strict`. An `LLMCompressError` (a deliberate error: bad
        calibration data, fp8 on a GPU without it ...) is re-raised as it is, after the graph is restored.

        Once a pass has cut the graph into pieces (`base.split_graphs`: the early-exit cascade), the passes after it
        run on each piece, one record per pass (decisions tagged with their piece), and the graph itself is left as
        the pieces were cut from it."""
        records = []
        ctx.pipeline = tuple(p.name for p in self.passes)
        for p in self.passes:
            pieces = split_graphs(gm)
            if pieces is None:
                records.append(self._run_one(p, gm, ctx))
            else:
                records.append(_merged(p.name, [self._run_one(p, piece, ctx) for piece in pieces]))
        return records

    def _run_one(self, p: Pass, gm: torch.fx.GraphModule, ctx: PassContext) -> PassRecord:
        snapshot = _Snapshot(gm)
        before = _op_counts(gm.graph)
        start = time.perf_counter()
        try:
            result = p.run(gm, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, expected PassResult")
            gm.graph.lint()
            gm.recompile()
        except Exception as e:  # noqa: BLE001 - a pass's bug must not corrupt the graph
            elapsed = time.perf_counter() - start
            snapshot.restore(gm)
            message = f"{type(e).__name__}: {e}"
            if isinstance(e, LLMCompressError):
                raise  # deliberate: the user asked for something that cannot be done (bad data, no fp8 ...)
            if self.strict:
                raise PassFailedError(f"pass {p.name!r} failed on graph {ctx.graph_id} (strict=True): {message}") from e
            warnings.warn(
                f"llmcompress: pass {p.name!r} failed on graph {ctx.graph_id} and was undone; "
                f"compilation continues without it: {message}",
                PassFallbackWarning,
                stacklevel=3,
            )
            logger.debug("pass %s failed", p.name, exc_info=True)
            return PassRecord(p.name, "failed", elapsed, {}, {}, {}, [], message)
        elapsed = time.perf_counter() - start
        after = _op_counts(gm.graph)
        record = PassRecord(
            p.name,
            "changed" if result.changed else "unchanged",
            elapsed,
            dict(result.stats),
            dict(after - before),
            dict(before - after),
            list(result.decisions),
        )
        logger.info("pass %s: %s in %.3fs %s", p.name, record.status, elapsed, record.stats)
        return record


def _merged(name: str, per_piece: list[PassRecord]) -> PassRecord:
    """One record for a pass run on each piece of a split graph: counts summed, decisions tagged with the piece."""
    status = ("failed" if any(r.status == "failed" for r in per_piece)
              else "changed" if any(r.status == "changed" for r in per_piece) else "unchanged")
    stats: collections.Counter = collections.Counter()
    added: collections.Counter = collections.Counter()
    removed: collections.Counter = collections.Counter()
    decisions: list[dict[str, Any]] = []
    for i, r in enumerate(per_piece):
        stats.update({k: v for k, v in r.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        added.update(r.ops_added)
        removed.update(r.ops_removed)
        decisions += [{"piece": i, **d} if isinstance(d, dict) else {"piece": i, "decision": d} for d in r.decisions]
    errors = [f"piece {i}: {r.error}" for i, r in enumerate(per_piece) if r.error]
    return PassRecord(name, status, sum(r.time_s for r in per_piece), {"pieces": len(per_piece), **stats},
                      dict(added), dict(removed), decisions, "; ".join(errors) or None)
