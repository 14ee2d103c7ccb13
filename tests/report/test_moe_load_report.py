"""The per-layer per-expert load heat-map in `llmcompress report` (--compile-report of a compile whose moe-prune
measured the load on calibration data) and from fuse-moe's runtime counters (report/moe_heatmap.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

import llmcompress
from llmcompress.cli import main
from llmcompress.report.moe_heatmap import html_section, moe_load, moe_load_from_counters
from llmcompress.testing.models import VOCAB, example_ids, tiny_model


@pytest.fixture(scope="module")
def mixtral_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixtral")
    tiny_model("mixtral").config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compile") / "compile-report.json"
    cal = torch.randint(2, VOCAB, (6, 24), generator=torch.Generator().manual_seed(3))
    options = {"lowering": "eager", "calibration": cal, "calibration_samples": 6, "calibration_seq_len": 24,
               "report": str(path), "passes": {"canonicalize": {}, "moe-prune": {"keep": 3}}}
    torch._dynamo.reset()
    # A fresh derived-weight cache (the per-test one is not set yet for a module fixture): nothing of another run's.
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setenv("LLMCOMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("llmcompress-cache")))
        torch.compile(tiny_model("mixtral"), backend="llmcompress", options=options)(example_ids())
    return path


def _pngs(page):
    return [base64.b64decode(p.split('"')[0]) for p in page.split('src="data:image/png;base64,')[1:]]


def test_report_html_and_json_carry_the_compile_reports_load(mixtral_config, compile_report, tmp_path):
    load = moe_load(json.loads(compile_report.read_text()))
    assert load["layers"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    sums = [sum(t) for t in load["tokens"]]
    assert sums[0] == sums[1] > 0 and sums[0] % 2 == 0  # every calibration token, top-2, in each layer
    out = tmp_path / "report.html"
    assert main(["report", str(mixtral_config), "--seq", "8", "--hardware", "h100-sxm", "--format", "html",
                 "--compile-report", str(compile_report), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count("<h2>MoE expert load</h2>") == 1 and 'alt="MoE expert load heat-map"' in page
    assert len(_pngs(page)) == 2 and all(p.startswith(b"\x89PNG") for p in _pngs(page))  # roofline, heat-map
    assert "calibration data" in page and "mean routing weight" in page
    js = tmp_path / "report.json"
    assert main(["report", str(mixtral_config), "--seq", "8", "--hardware", "h100-sxm", "--format", "json",
                 "--compile-report", str(compile_report), "-o", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["moe_load"]["tokens"] == load["tokens"]
    assert len(report["moe_load"]["mean_weight"][0]) == 4


def test_report_without_load_has_no_section(mixtral_config, tmp_path, capsys):
    plain = tmp_path / "compile.json"
    plain.write_text(json.dumps({"graphs": [{"passes": [{"name": "canonicalize", "decisions": []}]}]}))
    out = tmp_path / "report.json"
    assert main(["report", str(mixtral_config), "--seq", "8", "--hardware", "h100-sxm", "--format", "json",
                 "--compile-report", str(plain), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["moe_load"] is None
    assert "no MoE layer with load statistics" in capsys.readouterr().err


def test_section_from_runtime_counters():
    model = tiny_model("mixtral")
    torch._dynamo.reset()
    passes = {"canonicalize": {}, "fuse-moe": {"objective": "always", "load_counters": True}}
    with torch.no_grad():
        torch.compile(model, backend="llmcompress", options={"lowering": "eager", "passes": passes})(example_ids())
    counters = llmcompress.moe_load_counters(model)
    load = moe_load_from_counters(counters)
    assert load["source"] == "runtime counters" and load["layers"] == list(counters)
    assert [sum(t) for t in load["tokens"]] == [example_ids().numel() * 2] * 2
    assert all(abs(sum(s) - 1) < 1e-9 for s in load["share"])
    page = "\n".join(html_section(load))
    assert "runtime counters" in page and len(_pngs(page)) == 1
    assert moe_load_from_counters({}) is None


def test_counters_of_a_pruned_block_land_on_their_original_expert_ids():
    """A block moe-prune sliced to experts [0, 2, 3] counts them by position; the heat-map's columns are ids."""
    counters = {"model.layers.0.mlp": {"tokens": torch.tensor([5, 7, 4]), "mean_weight": torch.tensor([0.5, 0.25, 0.75]),
                                       "experts": [0, 2, 3], "graphs": 1}}
    load = moe_load_from_counters(counters)
    assert load["tokens"] == [[5, 0, 7, 4]]
    assert load["mean_weight"] == [[0.5, 0.0, 0.25, 0.75]]
    assert load["share"] == [[5 / 16, 0.0, 7 / 16, 4 / 16]]
