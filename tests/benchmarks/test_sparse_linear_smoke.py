"""Smoke test of benchmarks/sparse_linear.py (--smoke, the Triton interpreter on a CPU, one shape): the JSON it
writes and the numerics of every configuration that runs on a CPU."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_sparse_linear_smoke(tmp_path, run_benchmark):
    out = tmp_path / "sparse_linear_smoke.json"
    run_benchmark("sparse_linear.py", "--smoke", "--shapes", "128x128", "--m", "1,20", "--out", out, interpret=True)
    doc = json.loads(out.read_text())

    assert doc["complete"] is True and doc["settings"]["smoke"] is True
    assert {"torch", "triton", "llmcompress"} <= doc["versions"].keys() and doc["device"]["type"] == "cpu"
    assert [(r["n"], r["k"], r["m"]) for r in doc["results"]] == [(128, 128, 1), (128, 128, 20)]
    for r in doc["results"]:
        assert r["configs"]["semi-structured"] == {"skipped": "torch's semi-structured path needs CUDA"}
        for name, e in r["configs"].items():
            if name != "semi-structured":
                assert "error" not in e, (name, e.get("traceback"))
                assert e["numerics_ok"] and e["median_us"] > 0, (name, e)
        assert r["configs"]["planned"]["kernel"] == "dense (masked)"  # the CPU keeps dense
    step = doc["decode_step"]["configs"]
    assert step["llmcompress-2of4"]["weight_bytes"] < 0.6 * step["bf16-cublas"]["weight_bytes"]
    assert all(t["met"] is None for t in doc["targets"])
