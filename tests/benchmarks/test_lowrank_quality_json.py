"""benchmarks/lowrank_quality.py's bookkeeping, without a model: the JSON names the commit it ran from and the
requested rows it lacks (a run cut short says so), and `--replot` redraws the PNG from the JSON alone (the plot of
`llmcompress report --lowrank-quality`), with the commit in its metadata."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("lowrank_quality", ROOT / "benchmarks" / "lowrank_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, ratio, ppl):
    return {"model": "tiny-llama", "method": method, "ratio": ratio, "perplexity": ppl, "dense_perplexity": 16.34,
            "delta_pct": 100 * (ppl / 16.34 - 1), "target_pct": None, "met": None,
            "params_kept_fraction": ratio - 1e-5, "split_layers": 30, "seconds": 1.0}


def test_json_names_the_commit_and_the_missing_rows_and_replots(tmp_path, run_benchmark):
    q = _script()
    git = q._git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
    out = tmp_path / "q.json"
    args = argparse.Namespace(out=out, git=git, only=None, runs=["tiny-llama:dense", "tiny-llama:svd-llm:0.80",
                                                      "tiny-llama:svd-llm:0.6", "tiny-llama:svd:0.8"])
    windows, calibration = torch.zeros(64, 512, dtype=torch.long), torch.zeros(64, 512, dtype=torch.long)
    doc = q._write(args, windows, calibration, [_row("svd-llm", 0.8, 17.4)])
    assert json.loads(out.read_text()) == doc
    assert doc["git"] == git and doc["windows"] == 64 and doc["calibration"]["samples"] == 64
    assert doc["missing_runs"] == ["tiny-llama:svd-llm:0.6", "tiny-llama:svd:0.8"]
    doc = q._write(args, windows, calibration, [_row("svd-llm", 0.8, 17.4), _row("svd-llm", 0.6, 21.1),
                                                _row("svd", 0.8, 17.7)])
    assert "missing_runs" not in doc

    run_benchmark("lowrank_quality.py", "--replot", "--out", out, timeout=300)
    img = Image.open(out.with_suffix(".png"))
    img.load()
    assert img.format == "PNG" and img.size[0] > 500
    assert json.loads(img.info["Description"])["git"] == git
