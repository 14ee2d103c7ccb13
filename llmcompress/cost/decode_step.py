"""Decode-step times of plain and self-speculative decoding from per-part costs: `speculative_step_s`,
`plain_step_s`, `predicted_speedup`. The parts' seconds come from the roofline (`speculative.step_costs`) or, where
host overhead dominates (a 12.6 M-parameter model on a CPU), from timing the parts on the device
(`speculative.measure_step_costs`); this module only combines them.

costs (seconds, a dict): `layer` one decoder layer at one row; `lm_head` final norm + LM head at one row;
`exit_head` translation + final norm + LM head at one row; `num_layers`; optional, 0 when absent: `layer_per_row`
(extra seconds per further row of a layer: the verify runs k + 1), `lm_head_per_row`, `run_overhead` (host work of
each call that runs a slice of the layers: mask, rotary, embedding), `plain_overhead` (host work of one plain
decode step outside the layers and the LM head: generate's loop, logits processing, the model's forward);
`layer_at_rows` / `lm_head_at_rows` ({rows: seconds}, measured) replace the per-row terms where they hold the
verify's k + 1: on a CPU one row runs a GEMV and two a GEMM, so the first extra row costs more than the next ones
(tiny-llama, one thread: layer 1.17 ms at one row, 1.8 ms at two, +0.16 ms per row after).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llmcompress.cost.roofline import CostModel


def plain_step_s(costs: Mapping[str, float]) -> float:
    """One plain greedy decode step: every layer and the LM head at one row, plus the step's host work."""
    return costs["num_layers"] * costs["layer"] + costs["lm_head"] + costs.get("plain_overhead", 0.0)


def speculative_step_s(exit_layer: int, draft_len: int, costs: Mapping[str, float]) -> float:
    """One draft-and-verify step as `speculative._speculate` runs it: k drafts (layers < E, one row, and the exit
    head), the last draft's layers < E, then layers ≥ E and the LM head on k + 1 rows; each slice of layers one
    host call. The issue writes k·E/L + 1 − E/L + head (in units of a plain step); the last draft's own layers < E
    add E/L: layers ≥ E need its layer-E state."""
    k, e, n = draft_len, exit_layer, costs["num_layers"]
    run = costs.get("run_overhead", 0.0)
    rows = k + 1
    verify_layer = _at_rows(costs, "layer", rows)
    return rows * (e * costs["layer"] + run) + k * costs["exit_head"] + (n - e) * verify_layer + run + _at_rows(
        costs, "lm_head", rows)


def _at_rows(costs: Mapping[str, float], part: str, rows: int) -> float:
    table = costs.get(f"{part}_at_rows") or {}
    if rows in table:
        return table[rows]
    return costs[part] + (rows - 1) * costs.get(f"{part}_per_row", 0.0)


def predicted_speedup(tokens_per_step: float, exit_layer: int, draft_len: int, costs: Mapping[str, float]) -> float:
    """Tokens per verify step × plain step time ÷ speculative step time. With no host overheads and per-row terms
    this is the issue's tokens per step ÷ (k·E/L + 1 + k·head), E/L and head as shares of a plain step."""
    return tokens_per_step * plain_step_s(costs) / speculative_step_s(exit_layer, draft_len, costs)


def predicted_tokens_per_s(costs: Mapping[str, float], exit_layer: int | None = None, draft_len: int | None = None,
                           tokens_per_step: float = 1.0) -> float:
    """Decode tokens/s: plain decoding when exit_layer is None, else self-speculative at (E, k)."""
    if exit_layer is None:
        return 1.0 / plain_step_s(costs)
    return tokens_per_step / speculative_step_s(exit_layer, draft_len, costs)


def weights_time(cost: CostModel, modules: Sequence[torch.nn.Module], dtype: torch.dtype) -> float:
    """Roofline seconds of the modules at one row: a decode step reads every weight once and does 2 FLOP per
    weight, one launch per leaf module holding weights. The roofline part of `speculative.step_costs` and of the
    cascade's `exit_gates.cascade_costs`."""
    leaves = [m for module in modules for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    params = [p for m in leaves for p in m.parameters(recurse=False)]
    return cost.kernel_time(2 * sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params),
                            dtype, rows=1, launches=max(len(leaves), 1))
