"""Smoke test of benchmarks/early_exit.py on the tiny-llama fixture at toy sizes (eager: the backend's compile takes
minutes here): the JSON it writes, exits 1-5 in the exit report with agreement and perplexity, k = 1..4 per exit, a
decode row token-identical to plain greedy with a prediction from the measured step costs, and the targets."""

from __future__ import annotations

import json

import pytest


@pytest.mark.fixtures
def test_early_exit_smoke(tmp_path, run_benchmark):
    out = tmp_path / "early_exit.json"
    run_benchmark("early_exit.py", "--calib", 2, "--windows", 2, "--prompts", 1, "--new-tokens", 8, "--configs", "5:2",
                  "--lowering", "eager", "--out", out)
    doc = json.loads(out.read_text())
    assert {"device", "versions", "commit", "setup", "exit_report", "teacher_forced", "step_costs", "plain", "decode",
            "auto", "targets"} <= doc.keys()
    assert sorted(doc["exit_report"]["exits"]) == ["1", "2", "3", "4", "5"]
    for row in doc["exit_report"]["exits"].values():
        assert {"agreement", "perplexity"} <= row["lens"].keys() and {"agreement", "perplexity"} <= row["fitted"].keys()
    assert doc["step_costs"]["measured"]["layer"] > 0 and doc["plain"]["predicted_tokens_per_s"] > 0
    assert [(r["exit_layer"], r["draft_len"]) for r in doc["teacher_forced"]] == [
        (e, k) for e in range(1, 6) for k in range(1, 5)]
    row = doc["decode"][0]  # a second row only where "auto" chose another (E, k)
    assert row["identical"] is True and (row["exit_layer"], row["draft_len"]) == (5, 2)
    assert 0 <= row["accepted"] <= row["drafted"] and row["tokens_per_s"] > 0 and row["predicted_tokens_per_s"] > 0
    assert doc["targets"][0]["met"] is True  # token-identical
