"""Smoke test of benchmarks/early_exit_cascade.py on the tiny-llama fixture at toy sizes: the JSON it writes, exits
1-5 with lens and fitted agreement, every cascade row with its budgets, and the running cascade's record of the
perplexity it measured (the budget's held-back numbers come from the code beside it)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.fixtures
def test_early_exit_cascade_smoke(tmp_path, run_benchmark):
    out = tmp_path / "early_exit_cascade.json"
    run_benchmark("early_exit_cascade.py", "--calib", 8, "--windows", 2, "--window", 128, "--rounds", 1, "--prompts", 1, "--new-tokens",
                  4, "--repeats", 1, "--frontier", "0.9:none", "--out", out)
    doc = json.loads(out.read_text())
    assert {"device", "versions", "commit", "setup", "exits", "full_perplexity", "cascades"} <= doc.keys()
    assert sorted(doc["exits"]) == ["1", "2", "3", "4", "5"]
    for row in doc["exits"].values():
        assert 0 < row["agreement_lens"] < 1 and 0 < row["agreement_fitted"] < 1
    assert set(doc["cascades"]) == {"cost", "max-skip-teacher-forced", "max-skip", "max-skip-agreement-only",
                                    "max-skip 0.9/none"}
    budgets = {name: (row["min_agreement"], row["max_perplexity_increase"]) for name, row in doc["cascades"].items()}
    assert budgets["max-skip"] == (0.99, 0.02) and budgets["max-skip-agreement-only"] == (0.99, None)
    assert budgets["max-skip 0.9/none"] == (0.9, None)
    rounds = doc["cascades"]["max-skip"]["held_back"]["cascade"]["rounds"]
    assert all(r["perplexity_increase_bound"] >= r["perplexity_increase"] for r in rounds)
    loose = doc["cascades"]["max-skip 0.9/none"]
    assert loose["declined"] is None and loose["validation"]["skip_fraction"] > 0
