"""The MoE load section of the HTML report: load read from a compile report, the heat-map, the section."""

from __future__ import annotations

import base64
import io

from llmcompress.report.moe_heatmap import heatmap_png, html_section, moe_load

COMPILE_REPORT = {"graphs": [
    {"passes": [{"name": "canonicalize", "decisions": [{"node": "linear_default"}]}]},
    {"passes": [{"name": "moe-prune", "decisions": [
        {"layer": "model.layers.0.mlp", "load": {"tokens": [6, 2, 0, 0], "share": [0.75, 0.25, 0.0, 0.0]}},
        {"layer": "model.layers.1.mlp", "load": {"tokens": [2, 2, 2, 2], "share": [0.25, 0.25, 0.25, 0.25]}},
    ]}]},
]}


def test_load_from_a_compile_report():
    load = moe_load(COMPILE_REPORT)
    assert load["layers"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert load["share"][0] == [0.75, 0.25, 0.0, 0.0] and load["tokens"][1] == [2, 2, 2, 2]
    assert moe_load({"graphs": [COMPILE_REPORT["graphs"][0]]}) is None


def test_heatmap_and_section():
    from PIL import Image

    load = moe_load(COMPILE_REPORT)
    image = Image.open(io.BytesIO(heatmap_png(load)))
    assert image.size[0] > 100 and image.size[1] > 50
    page = "\n".join(html_section(load))
    assert "<h2>MoE expert load</h2>" in page and page.count('src="data:image/png;base64,') == 1
    png = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(png).startswith(b"\x89PNG")
    assert "0: 75.0 %" in page and "2: 0.0 %" in page  # most and least loaded expert of layer 0


def test_render_html_adds_the_section_only_with_moe_load(tmp_path):
    import transformers

    from llmcompress.report.cost_report import render_html, report_model

    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256).save_pretrained(tmp_path)
    report = report_model(tmp_path, seq=16)
    assert "MoE expert load" not in render_html(report)
    report["moe_load"] = moe_load(COMPILE_REPORT)
    page = render_html(report)
    assert "<h2>MoE expert load</h2>" in page and page.count('src="data:image/png;base64,') == 2
