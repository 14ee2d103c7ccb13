"""Smoke test of benchmarks/moe_quant_quality.py on the tiny-mixtral fixture (2 validation windows, int8 experts by
round to nearest: no calibration): the fused run's graph holds the quantized fused experts ops, the JSON's keys."""

from __future__ import annotations

import json

import pytest

from llmcompress.testing.fixtures import fixtures_dir

pytestmark = [pytest.mark.fixtures, pytest.mark.slow]


def test_moe_quant_quality_smoke(tmp_path, run_benchmark):
    if not (fixtures_dir() / "tiny-mixtral").is_dir():
        pytest.skip(f"no tiny-mixtral fixture under {fixtures_dir()}")
    out = tmp_path / "moe_quant_quality.json"
    run_benchmark("moe_quant_quality.py", "--windows", 2, "--batch", 2, "--calib-samples", 2, "--runs", "dense", "w8a16",
                  "w8a16 + fuse-moe", "--out", out)
    doc = json.loads(out.read_text())
    assert doc["windows"] == 2 and "objective: always" in doc["forced_by"]
    rows = {r["run"]: r for r in doc["results"]}
    assert rows["w8a16 + fuse-moe"]["fused_experts_ops"] == 4 and rows["w8a16 + fuse-moe"]["grouped_ops"] == 0
    assert rows["w8a16"]["fused_experts_ops"] == 0 and rows["w8a16"]["grouped_ops"] == 8  # 4 layers x 2
    # int8 experts change perplexity by well under 1 %, through either path.
    assert abs(doc["comparison"]["w8a16"]["difference_pct_points"]) < 0.5
    assert all(0 < r["perplexity"] < 2 * r["dense_perplexity"] for r in doc["results"])
