"""The error curve a lowrank-split layer's decision carries for the report (`error_curve.curve_points`): sampled
from the allocation's curve at the right ranks and kept fractions, the chosen rank marked; and the pass puts it into
every allocated layer's `rank` decision, with the rank the layer runs at."""

from __future__ import annotations

import json

import pytest
import torch

from llmcompress.passes.lowrank.error_curve import curve_points
from llmcompress.passes.lowrank.factors import decompose
from llmcompress.testing.models import VOCAB, example_ids, tiny_model


def _curve(n=37, k=53, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = torch.randn(200, k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return decompose(w).error_curve(x.T @ x / len(x))


def test_points_are_the_curve_relative_to_rank_0_at_kept_fractions():
    n, k = 37, 53  # max split rank: (37 * 53 - 1) // 90 = 21
    curve = _curve(n, k)
    out = curve_points(curve, n, k, rank=13, points=8)
    assert out["ranks"][0] == 0 and out["ranks"][-1] == 21 and 13 in out["ranks"]
    assert out["ranks"] == sorted(set(out["ranks"])) and len(out["ranks"]) <= 9
    for r, kept, err in zip(out["ranks"], out["kept_fraction"], out["relative_error"]):
        assert kept == pytest.approx(r * (n + k) / (n * k), abs=1e-6)
        assert err == pytest.approx(float(curve[r] / curve[0]), rel=1e-4)
    assert out["relative_error"] == sorted(out["relative_error"], reverse=True)
    assert out["chosen"] == {"rank": 13, "kept_fraction": out["kept_fraction"][out["ranks"].index(13)],
                             "relative_error": out["relative_error"][out["ranks"].index(13)]}
    json.dumps(out)  # plain JSON for the compile report


def test_a_dense_layer_is_marked_at_kept_fraction_1():
    out = curve_points(_curve(), 37, 53, rank=None)
    assert out["chosen"] == {"rank": "dense", "kept_fraction": 1.0, "relative_error": 0.0}
    assert len(out["ranks"]) == 22  # 33 points asked, only 22 ranks (0 .. 21) exist
    with pytest.raises(ValueError, match="points must be >= 2"):
        curve_points(_curve(), 37, 53, rank=None, points=1)


def test_the_pass_puts_the_allocation_curve_into_each_allocated_layer_decision(tmp_path):
    cal = torch.randint(2, VOCAB, (6, 24), generator=torch.Generator().manual_seed(3))
    options = {"lowering": "eager", "calibration": cal, "calibration_samples": 6, "calibration_seq_len": 24,
               "report": str(tmp_path / "r.json"),
               "passes": {"canonicalize": {}, "lowrank-split": {"method": "svd-llm", "ratio": 0.5,
                                                                 "objective": "memory",
                                                                 "overrides": {"*.0.mlp.down_proj": {"rank": 4}}}}}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_model("llama"), backend="llmcompress", options=options)(example_ids())
    rec = next(p for p in json.loads((tmp_path / "r.json").read_text())["graphs"][0]["passes"]
               if p["name"] == "lowrank-split")
    assert rec["status"] != "failed", rec  # a failing pass is undone and leaves no decisions
    by_layer = {d["layer"]: d["rank"] for d in rec["decisions"]}
    assert "error_curve" not in by_layer["lm_head"]  # skipped: not allocated
    assert "error_curve" not in by_layer["model.layers.0.mlp.down_proj"]  # its rank came from an override
    allocated = {k: v for k, v in by_layer.items() if "error_curve" in v}
    assert len(allocated) == 13
    split = 0
    for name, d in allocated.items():
        c, (n, k) = d["error_curve"], d["shape"]
        assert c["chosen"]["rank"] == d["rank"], name
        assert c["relative_error"][0] == 1.0 and min(c["relative_error"]) >= 0
        if d["rank"] != "dense":
            split += 1
            assert c["chosen"]["kept_fraction"] == pytest.approx(d["rank"] * (n + k) / (n * k), abs=1e-6)
            assert 0 < c["chosen"]["relative_error"] < 1
    assert split
