"""Smoke test of benchmarks/moe_block.py (--smoke, the Triton interpreter on a CPU, a tiny block, our configurations
and transformers' eager ones): the JSON it writes, every configuration's numerics, moe_route's ids."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_moe_block_smoke(tmp_path, run_benchmark):
    out = tmp_path / "moe_block_smoke.json"
    configs = "hf-eager,hf-batched_mm,hf-grouped_mm,llmcompress,llmcompress-cudagraph,llmcompress-gemv," \
              "llmcompress-gemm,llmcompress-int4,w4a16-grouped"
    run_benchmark("moe_block.py", "--smoke", "--tokens", "1,5", "--configs", configs, "--out", out, interpret=True)
    doc = json.loads(out.read_text())

    assert doc["complete"] is True and doc["settings"]["smoke"] is True and doc["device"]["type"] == "cpu"
    assert {"torch", "transformers", "llmcompress"} <= doc["versions"].keys()
    assert [r["tokens"] for r in doc["results"]] == [1, 5]
    for r in doc["results"]:
        assert set(r["configs"]) == set(configs.split(","))
        for name, e in r["configs"].items():
            assert "error" not in e, (name, e.get("traceback"))
            if name in ("llmcompress-cudagraph", "w4a16-grouped") or (name == "llmcompress-int4" and r["tokens"] > 1):
                assert "skipped" in e  # CUDA only; int4 at T = 1 only
                continue
            assert e["numerics_ok"] and e["median_us"] > 0, (name, e)
        assert r["configs"]["llmcompress"]["ids_equal"] is True
    assert [r["configs"]["llmcompress"]["path"] for r in doc["results"]] == ["gemv, block_m 16", "gemm, block_m 16"]
    assert doc["results"][0]["configs"]["llmcompress-int4"]["path"] == "gemv, int4 g32"
    assert all(t["met"] is None for t in doc["targets"])  # not evaluated off a GPU
