"""Smoke test of benchmarks/early_exit_ceiling.py on the tiny-llama fixture at toy sizes: the JSON it writes, every
budget's ceiling for lens and fitted heads with its bounds in order and its budgets held, and the gates' teacher-forced
skip beneath the ceiling of their budget where they hold it; the oracle gates set on the validation tokens within
their plain budget and beneath its ceiling."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.fixtures
def test_early_exit_ceiling_smoke(tmp_path, run_benchmark):
    out = tmp_path / "early_exit_ceiling.json"
    run_benchmark("early_exit_ceiling.py", "--calib", 8, "--windows", 2, "--window", 128, "--threads", 1, "--budgets", "0.99:0.02,0.9:none",
                  "--gate-budget", "0.9:none", "--distill-steps", 5, "--out", out)
    doc = json.loads(out.read_text())
    assert {"device", "versions", "commit", "setup", "exits", "ceilings", "gates", "oracle_gates"} <= doc.keys()
    assert sorted(doc["exits"]) == ["1", "2", "3", "4", "5"]
    assert set(doc["ceilings"]) == {"0.99/0.02", "0.9/none"}
    for key, rows in doc["ceilings"].items():
        a, p = key.split("/")
        for row in rows.values():
            assert 0 < row["feasible"] <= row["upper"] <= 5 / 6
            assert row["agreement"] >= float(a) - 1e-9
            assert p == "none" or math.log1p(row["perplexity_increase"]) <= math.log1p(float(p)) + 1e-9
    assert set(doc["ceilings"]["0.99/0.02"]) == {"lens", "fitted", "distilled"}
    assert set(doc["gates"]) == {"fitted", "distilled"}
    for head, gates in doc["gates"].items():
        assert gates["declined"] is None and gates["skip_fraction"] > 0
        if gates["agreement"] >= 0.9:  # within the ceiling's budget on these tokens, so beneath it
            assert gates["skip_fraction"] <= doc["ceilings"]["0.9/none"][head]["upper"] + 1e-9
    assert set(doc["oracle_gates"]) == {"lens", "fitted", "distilled"}
    for head, rows in doc["oracle_gates"].items():
        assert set(rows) == {"held-back", "on validation"}
        own = rows["on validation"]
        assert own["exits"] and own["agreement"] >= 0.9 - 1e-9
        assert 0 < own["skip_fraction"] <= doc["ceilings"]["0.9/none"][head]["upper"] + 1e-9
