"""The "Low-rank quality / size" section of `llmcompress report --format html`: the perplexity plot's points are
the quality JSON's rows, the layer-curve plot's are the compile report's decisions, both embedded as PNGs that
decode; a missing or invalid file fails the command with a message naming it, before any tracing."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from llmcompress.cli import main
from llmcompress.report import lowrank_plot
from llmcompress.report.lowrank_plot import LowrankInputError, load_layer_curves, load_quality, lowrank_section
from llmcompress.testing.models import VOCAB, example_ids, tiny_model

ROOT = Path(__file__).parents[2]

QUALITY = {
    "device": "test CPU", "windows": 64, "calibration": {"samples": 64, "seq_len": 512},
    "git": {"commit": "0123456789abcdef", "dirty": False},
    "results": [
        # params_kept_fraction (measured) differs from ratio (asked): the plot must use the measured one
        {"model": "tiny-llama", "method": "svd-llm", "ratio": 0.8, "params_kept_fraction": 0.79991,
         "perplexity": 17.21, "dense_perplexity": 16.34, "delta_pct": 5.3},
        {"model": "tiny-llama", "method": "svd-llm", "ratio": 0.6, "params_kept_fraction": 0.59987,
         "perplexity": 20.37, "dense_perplexity": 16.34, "delta_pct": 24.7},
        {"model": "tiny-llama", "method": "svd", "ratio": 0.8, "params_kept_fraction": 0.79995,
         "perplexity": 17.43, "dense_perplexity": 16.34, "delta_pct": 6.7},
        {"model": "tiny-llama", "method": "asvd", "ratio": 0.6, "params_kept_fraction": 0.59981,
         "perplexity": 20.88, "dense_perplexity": 16.34, "delta_pct": 27.8},
        {"model": "tiny-llama", "method": "svd", "ratio": 0.6, "params_kept_fraction": 0.59993,
         "perplexity": 21.02, "dense_perplexity": 16.34, "delta_pct": 28.6},
    ],
    "missing_runs": ["tiny-llama:asvd:0.8"],
}


def _write(tmp_path, doc, name="q.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _pngs(page):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _decodes(png):
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    img.load()  # decodes every row, not only the header
    assert img.size[0] > 300 and img.size[1] > 200
    return img


def _line_points(fig):
    ax = fig.axes[0]
    return {line.get_label(): list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))
            for line in ax.get_lines() if len(line.get_xdata()) and not line.get_label().startswith("_")}


def _flat(points):
    """[(x, y), ...] as [x, y, ...]: pytest.approx (pytest >= 8.4) compares flat sequences only."""
    return [float(v) for p in points for v in p]


def test_perplexity_plot_points_are_the_json_rows(tmp_path):
    q = load_quality(_write(tmp_path, QUALITY))
    lines = _line_points(lowrank_plot.quality_figure(q))
    for method in ("svd", "asvd", "svd-llm"):
        rows = sorted((r["params_kept_fraction"], r["perplexity"]) for r in QUALITY["results"]
                      if r["method"] == method)
        assert _flat(lines[method]) == pytest.approx(_flat(rows)), method
    dense = [ln for ln in lowrank_plot.quality_figure(q).axes[0].get_lines() if ln.get_label().startswith("tiny-llama dense")]
    assert len(dense) == 1 and float(dense[0].get_ydata()[0]) == 16.34


def test_two_models_get_one_line_per_model_and_method(tmp_path):
    doc = copy.deepcopy(QUALITY)
    doc["results"].append({"model": "tiny-mixtral", "method": "svd-llm", "ratio": 0.8, "perplexity": 21.5,
                           "dense_perplexity": 20.9, "delta_pct": 2.9})  # no params_kept_fraction: the ratio
    lines = _line_points(lowrank_plot.quality_figure(load_quality(_write(tmp_path, doc))))
    assert lines["tiny-mixtral svd-llm"] == [(0.8, 21.5)]
    assert _flat(lines["tiny-llama svd"]) == pytest.approx([0.59993, 21.02, 0.79995, 17.43])


def test_section_html_embeds_a_png_that_decodes_and_the_table(tmp_path):
    section = lowrank_section(quality=_write(tmp_path, QUALITY))
    page = lowrank_plot.section_html(section)
    assert page.startswith("<h2>Low-rank quality / size</h2>")
    (png,) = _pngs(page)
    _decodes(png)
    assert "commit 0123456789" in page and "Rows not measured: tiny-llama:asvd:0.8" in page
    assert "<td>svd-llm</td><td class=\"n\">0.800</td><td class=\"n\">17.210</td><td class=\"n\">+5.3 %</td>" in page


@pytest.mark.parametrize("doc, message", [
    ("{not json", "is not valid JSON"),
    ({"rows": []}, "has no 'results' list"),
    ({"results": []}, "has no rows in 'results'"),
    ({"results": [{"model": "m", "method": "svd", "ratio": 0.8}]}, r"results\[0\] \(m svd\) has no positive 'perplexity'"),
    ({"results": [{"model": "m", "method": "svd", "perplexity": 3.0, "ratio": 1.5}]},
     r"needs 'params_kept_fraction' or 'ratio' in \(0, 1\]"),
    ({"results": [{"method": "svd", "perplexity": 3.0, "ratio": 0.5}]}, r"results\[0\] has no string 'model'"),
])
def test_an_invalid_quality_json_says_what_is_wrong(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(LowrankInputError, match=message):
        load_quality(path)


def test_the_committed_quality_results_load():
    for path in sorted((ROOT / "benchmarks" / "results").glob("lowrank_quality*.json")):
        q = load_quality(path)
        assert len(q["rows"]) == len(json.loads(path.read_text())["results"]), path


# --- through the CLI, with a compile report of a real lowrank-split compile --------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-random")
    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                             dtype="bfloat16").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compile") / "compile-report.json"
    cal = torch.randint(2, VOCAB, (6, 24), generator=torch.Generator().manual_seed(3))
    options = {"lowering": "eager", "calibration": cal, "calibration_samples": 6, "calibration_seq_len": 24,
               "report": str(path), "passes": {"canonicalize": {}, "lowrank-split": {
                   "method": "svd-llm", "ratio": 0.6, "objective": "memory"}}}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_model("llama"), backend="llmcompress", options=options)(example_ids())
    return path


def test_layer_curve_plot_points_are_the_compile_report_decisions(compile_report):
    decisions = {d["layer"]: d["rank"] for g in json.loads(compile_report.read_text())["graphs"]
                 for p in g["passes"] if p["name"] == "lowrank-split" for d in p["decisions"]}
    layers = load_layer_curves(compile_report)
    assert len(layers) == 14 and {x["layer"] for x in layers} == {k for k in decisions if k != "lm_head"}
    fig = lowrank_plot.curves_figure(layers)
    ax = fig.axes[0]
    drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert len(drawn) == 14
    for ln, x in zip(drawn, layers):
        c = decisions[x["layer"]]["error_curve"]
        want = [(k, e) for k, e in zip(c["kept_fraction"], c["relative_error"]) if e > 0]
        assert _flat(zip(map(float, ln.get_xdata()), map(float, ln.get_ydata()))) == pytest.approx(_flat(want))
    marked = sorted(map(tuple, ax.collections[0].get_offsets().tolist()))
    chosen = sorted((d["error_curve"]["chosen"]["kept_fraction"], d["error_curve"]["chosen"]["relative_error"])
                    for d in decisions.values() if "error_curve" in d and d["rank"] != "dense")
    assert marked and len(marked) == len(chosen) and _flat(marked) == pytest.approx(_flat(chosen))


def test_report_html_has_the_section_with_both_plots(tiny_config, compile_report, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(tiny_config), "--seq", "8", "--hardware", "h100-sxm", "--format", "html",
                 "--compile-report", str(compile_report), "--lowrank-quality", str(_write(tmp_path, QUALITY)),
                 "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count("<h2>Low-rank quality / size</h2>") == 1
    pngs = _pngs(page)
    assert len(pngs) == 3  # roofline, layer curves, perplexity
    for png in pngs:
        _decodes(png)
    assert 'alt="low-rank error curves"' in page and 'alt="perplexity against kept fraction"' in page
    js = tmp_path / "report.json"
    assert main(["report", str(tiny_config), "--seq", "8", "--hardware", "h100-sxm", "--format", "json",
                 "--lowrank-quality", str(_write(tmp_path, QUALITY)), "-o", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["lowrank"]["layers"] is None and len(report["lowrank"]["quality"]["rows"]) == 5


def test_report_without_the_options_has_no_section(tiny_config, tmp_path, capsys):
    out = tmp_path / "plain.json"
    assert main(["report", str(tiny_config), "--seq", "8", "--hardware", "h100-sxm", "--format", "json", "-o",
                 str(out)]) == 0
    assert json.loads(out.read_text())["lowrank"] is None


@pytest.mark.parametrize("flag, content, message", [
    ("--lowrank-quality", None, "low-rank quality JSON '.*missing.json' does not exist"),
    ("--lowrank-quality", "[1, 2", "low-rank quality JSON '.*bad.json' is not valid JSON"),
    ("--compile-report", None, "compile report '.*missing.json' does not exist"),
    ("--compile-report", '{"summary": {}}', "compile report '.*bad.json' has no 'graphs' list"),
])
def test_a_missing_or_invalid_file_fails_the_command_before_tracing(tiny_config, tmp_path, capsys, monkeypatch,
                                                                    flag, content, message):
    from llmcompress.report import cost_report

    monkeypatch.setattr(cost_report, "report_model", lambda *a, **k: pytest.fail("traced despite a bad file"))
    path = tmp_path / "missing.json" if content is None else _write(tmp_path, content, "bad.json")
    with pytest.raises(SystemExit) as e:
        main(["report", str(tiny_config), "--format", "html", flag, str(path)])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
