"""A layer's error curve as the report shows it: `curve_points` samples the curve the rank allocation spent its
budget on (`allocate.py`: output error relative to rank 0, over r) at a few ranks, as kept fractions of the layer's
parameters, with the rank the layer got. It goes into the layer's `rank` decision (`error_curve`), so the compile
report carries it and `llmcompress report --compile-report` can plot it without factoring anything again."""

from __future__ import annotations

from typing import Any

import torch

from llmcompress.passes.lowrank.allocate import LayerCurve

# 33 ranks, 0 to the largest that saves bytes: a smooth line on the report's plot for ~130 bytes of JSON per layer
# (tiny-llama's 42 linears: 21 kB; the whole curve would be 385 points a layer).
POINTS = 33


def curve_points(curve: torch.Tensor, n: int, k: int, rank: int | None, points: int = POINTS) -> dict[str, Any]:
    """{ranks, kept_fraction, relative_error, chosen {rank, kept_fraction, relative_error}} of one layer.

    curve: (min(N, K) + 1,) output error at rank 0 .. min(N, K) (`Decomposition.error_curve`).
    rank: the rank the layer runs at; None: left dense (kept fraction 1, no error).
    Kept fraction r (N + K) / (N K); relative error E(r) / E(0), as the allocation compares layers.
    """
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    rel = curve.double() / curve[0].double().clamp_min(1e-300)
    top = min(LayerCurve(n, k, curve).max_split_rank, len(rel) - 1)
    ranks = sorted({round(i * top / (points - 1)) for i in range(points)} | ({rank} if rank is not None else set()))

    def kept(r: int) -> float:
        return round(r * (n + k) / (n * k), 6)

    def err(r: int) -> float:
        return float(f"{float(rel[min(r, len(rel) - 1)]):.5g}")

    chosen = {"rank": "dense", "kept_fraction": 1.0, "relative_error": 0.0} if rank is None else \
        {"rank": rank, "kept_fraction": kept(rank), "relative_error": err(rank)}
    return {"ranks": ranks, "kept_fraction": [kept(r) for r in ranks], "relative_error": [err(r) for r in ranks],
            "chosen": chosen}
