"""Smoke test of benchmarks/early_exit_gates.py on the tiny-llama fixture at toy sizes: the JSON it writes, every
gate variant with both threshold settings, and the budget held on the very tokens the "on validation" thresholds
were set on."""

from __future__ import annotations

import json

import pytest


@pytest.mark.fixtures
def test_early_exit_gates_smoke(tmp_path, run_benchmark):
    out = tmp_path / "early_exit_gates.json"
    run_benchmark("early_exit_gates.py", "--calib", 8, "--windows", 2, "--window", 128, "--threads", 1, "--budget", "0.9:none", "--out", out)
    doc = json.loads(out.read_text())
    assert {"device", "versions", "commit", "setup", "gates"} <= doc.keys()
    assert "agree / logits (today's gates)" in doc["gates"] and "oracle" in doc["gates"]
    assert len(doc["gates"]) == 9
    for name, rows in doc["gates"].items():
        assert {"held-back", "on validation"} <= rows.keys(), name
        for row in (rows["held-back"], rows["on validation"]):
            assert 0 <= row["skip_fraction"] <= 5 / 6 and 0 <= row["agreement"] <= 1
            assert set(row["exits"]) <= {1, 2, 3, 4, 5}
        assert rows["on validation"]["agreement"] >= 0.9 - 1e-9, name
    assert doc["gates"]["oracle"]["on validation"]["skip_fraction"] > 0
