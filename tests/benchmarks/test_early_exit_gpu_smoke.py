"""Smoke test of benchmarks/early_exit_gpu.py at its --small shape on the CPU: the JSON it writes, measured and
roofline step costs, draft / verify steps for k = 1..4, the predicted speedup at acceptance 0.6 and 0.8."""

from __future__ import annotations

import json


def test_early_exit_gpu_small(tmp_path, run_benchmark):
    out = tmp_path / "early_exit_gpu.json"
    run_benchmark("early_exit_gpu.py", "--small", "--new-tokens", 16, "--out", out)
    doc = json.loads(out.read_text())
    assert doc["model"]["shape"] == "small" and doc["setup"]["exit_layer"] == 2
    for name in ("roofline", "measured"):
        assert doc["step_costs"][name]["layer"] > 0 and doc["step_costs"][name]["num_layers"] == 4
    assert [s["draft_len"] for s in doc["steps"]] == [1, 2, 3, 4]
    assert all(s["draft_s"] > 0 and s["verify_s"] > 0 and s["predicted_verify_s"] > 0 for s in doc["steps"])
    assert doc["run"]["tokens_per_s"] > 0 and doc["run"]["predicted_tokens_per_s"] > 0
    assert doc["plain"]["tokens_per_s"] > 0
    for alpha in ("0.6", "0.8"):
        for name in ("roofline", "measured"):
            e, k, speedup = doc["speedup_at"][alpha][name]["best"]
            assert 1 <= e <= 3 and 1 <= k <= 8 and speedup > 0
    # more acceptance never predicts less speed for the same (E, k)
    for key, value in doc["speedup_at"]["0.6"]["roofline"]["table"].items():
        assert doc["speedup_at"]["0.8"]["roofline"]["table"][key] >= value
