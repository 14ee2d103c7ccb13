"""Smoke test of benchmarks/lowrank_linear.py (--smoke, the Triton interpreter on a CPU, one shape): the JSON it
writes, the numerics of every configuration, and the decode step's ranks at 60 % kept."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_lowrank_linear_smoke(tmp_path, run_benchmark):
    out = tmp_path / "lowrank_linear_smoke.json"
    run_benchmark("lowrank_linear.py", "--smoke", "--shapes", "128x128:32", "--m", "1,20", "--out", out, interpret=True)
    doc = json.loads(out.read_text())

    assert doc["complete"] is True and doc["settings"]["smoke"] is True
    assert {"torch", "triton", "llmcompress"} <= doc["versions"].keys() and doc["device"]["type"] == "cpu"
    assert [(r["n"], r["k"], r["r"], r["m"]) for r in doc["results"]] == [(128, 128, 32, 1), (128, 128, 32, 20)]
    for r in doc["results"]:
        assert set(r["configs"]) == {"bf16-cublas", "two-linears", "llmcompress-lowrank", "llmcompress-lowrank-ut",
                                     "planned"}
        for name, e in r["configs"].items():
            assert "error" not in e, (name, e.get("traceback"))
            assert e["numerics_ok"] and e["median_us"] > 0, (name, e)
        # The factors are r (N + K) / NK = 1/2 of the dense bytes.
        assert r["configs"]["two-linears"]["weight_bytes"] * 2 == r["configs"]["bf16-cublas"]["weight_bytes"]
    assert [r["configs"]["llmcompress-lowrank"]["kernel"] for r in doc["results"]] == ["fused", "two-linears"]
    step = doc["decode_step"]
    # 60 % kept: r = 0.6 NK / (N + K) on the smoke layer (hidden 128, intermediate 352).
    assert step["ranks"] == {"q": 38, "k": 38, "v": 38, "o": 38, "gate": 56, "up": 56, "down": 56}
    assert all("error" not in e for e in step["configs"].values())
    configs = step["configs"]
    assert configs["llmcompress-lowrank"]["weight_bytes"] < 0.61 * configs["bf16-cublas"]["weight_bytes"]
    assert all(t["met"] is None for t in doc["targets"])
