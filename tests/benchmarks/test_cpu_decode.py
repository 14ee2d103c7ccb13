"""Smoke test of benchmarks/cpu_decode.py on its --small shape: the JSON it writes, and the numerics of each config."""

from __future__ import annotations

import json

import pytest

CONFIGS = ("eager", "default", "w4a16")
"""The smoke test's subset: plain eager, the backend's default recipe, and a weight-only quantized one (`inductor` and
`w8a16` run the same code in the script, each in one more child process that costs ~25 s of CI)."""


@pytest.mark.slow
def test_cpu_decode_small(tmp_path, run_benchmark):
    """One run covers both memory modes' code: --warm-compiler pays the one-time state on a throwaway model first
    (so rss_mib counts only this model), and without --keep-weights the compiled configs release the dense
    weights (the decode graph then finds its quantized copies in the derived-weight cache)."""
    out = tmp_path / "cpu_decode_small_warm.json"
    # --repeats 1: one timed call is enough to check the keys; the numbers are not judged here.
    run_benchmark("cpu_decode.py", "--small", "--warm-compiler", "--repeats", 1, "--configs", ",".join(CONFIGS),
                  "--out", out)
    doc = json.loads(out.read_text())

    assert doc["complete"] is True
    assert {"cpu_model", "torch_threads"} <= doc["device"].keys() and doc["device"]["torch_threads"] >= 1
    assert {"torch", "transformers", "llmcompress"} <= doc["versions"].keys()
    assert doc["rss_definition"].startswith("VmRSS")
    assert doc["model"]["name"] == "small" and doc["model"]["parameters"] > 0
    assert doc["settings"]["warm_compiler"] is True and doc["settings"]["release_weights"] is True
    assert tuple(doc["results"]) == CONFIGS
    for name, r in doc["results"].items():
        assert "error" not in r, (name, r.get("traceback"))
        assert r["tokens_per_s"] > 0 and r["new_tokens"] == 24 and r["rss_mib"] > 0, name
        assert r["rss_one_time_mib"] > 0, name
        assert r["compile_and_first_call_s"] > 0, name
        assert doc["ratios"][name]["tokens_per_s_vs_eager"] > 0 and doc["ratios"][name]["rss_vs_eager"] > 0
    for name in CONFIGS[1:]:  # compiled: a prefill graph and a decode graph, and no recompile per decode step
        # the throwaway model went through the same compile; the model's own graphs are counted apart
        assert doc["results"][name]["warm_compiled_graphs"] == 2, (name, doc["results"][name])
        assert doc["results"][name]["dynamo"]["unique_graphs"] == 2, (name, doc["results"][name]["dynamo"])
    assert doc["results"]["eager"]["warm_compiled_graphs"] == 0  # eager compiles nothing
    assert doc["ratios"]["default_vs_best_of_eager_inductor"] > 0
    assert [t["met"] for t in doc["targets"]] == [None] * len(doc["targets"])  # judged on the 483 M shape only

    # default changes numerics only by rounding: eager's greedy tokens.
    assert doc["results"]["default"]["tokens_equal_eager"], doc["results"]["default"]
    assert doc["checks"]["default_tokens_equal_eager"] is True
    # Weight-only quantized: logits close to eager's wherever the contexts agree (step 0 at least).
    for name in ("w4a16",):
        r = doc["results"][name]
        assert r["quantization"].get(f"{name} rtn", 0) > 0, r["quantization"]
        assert r["sqnr_steps"] >= 1
        assert doc["checks"]["quantized_sqnr_ok"][name] is True, (name, r["logits_sqnr_db"])
