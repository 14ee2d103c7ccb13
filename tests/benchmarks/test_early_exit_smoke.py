"""Smoke test of benchmarks/early_exit.py on the tiny-llama fixture at toy sizes: the JSON it writes, exits 1-5 in
the agreement table, k = 1..4 per exit, and a decode row token-identical to plain greedy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmcompress.testing.fixtures import fixtures_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fixtures
def test_early_exit_smoke(tmp_path):
    out = tmp_path / "early_exit.json"
    env = {**os.environ, "LLMCOMPRESS_FIXTURES": str(fixtures_dir()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "benchmarks/early_exit.py", "--calib", "2", "--windows", "2", "--prompts", "1",
                    "--new-tokens", "8", "--repeats", "1", "--configs", "5:2", "--out", str(out)],
                   cwd=ROOT, env=env, check=True, timeout=900, capture_output=True)
    doc = json.loads(out.read_text())
    assert {"device", "versions", "commit", "setup", "agreement", "teacher_forced", "decode", "auto"} <= doc.keys()
    assert sorted(doc["agreement"]) == ["1", "2", "3", "4", "5"]
    assert [(r["exit_layer"], r["draft_len"]) for r in doc["teacher_forced"]] == [
        (e, k) for e in range(1, 6) for k in range(1, 5)]
    (row,) = doc["decode"]
    assert row["identical"] is True and (row["exit_layer"], row["draft_len"]) == (5, 2)
    assert 0 <= row["accepted"] <= row["drafted"] and row["tokens_per_s"] > 0
