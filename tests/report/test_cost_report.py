"""`llmcompress report`: the CLI on a tiny random Llama config in text, JSON and HTML; totals that add up; linear
FLOPs = 2 x linear parameters x tokens; before/after with a recipe; clear errors for bad arguments; the HTML page
rendered in headless Chromium (skipped where /usr/bin/chromium is absent); the trained tiny-llama fixture."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import sympy
import transformers

from llmcompress.cli import main
from llmcompress.cost.hardware import HARDWARE, resolve
from llmcompress.report import cost_report
from llmcompress.report.cost_report import build_report, layer_of, model_info, render_html, render_json, render_text
from llmcompress.report.model_loading import ModelLoadError, load_model
from llmcompress.report.module_paths import module_path, stack_path

FIXTURES = Path(os.environ.get("LLMCOMPRESS_FIXTURES", Path(__file__).parents[3] / "shared" / "fixtures"))
SCRIPT = Path(__file__).parents[2] / "scripts" / "check_report_html.py"

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 256


def _linear_params(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    return layers * (attn + 3 * hidden * inter) + hidden * vocab  # + gate, up, down; lm_head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-random")
    transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                             max_position_embeddings=256, dtype="bfloat16").save_pretrained(folder)
    return folder


def _run(args: list[str]) -> None:
    assert main(["report", *args]) == 0


@pytest.fixture(scope="module")
def prefill_json(tiny, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report") / "prefill.json"
    _run([str(tiny), "--batch", "2", "--seq", "16", "--hardware", "h100-sxm", "--format", "json", "-o", str(out)])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def decode_json(tiny, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report") / "decode.json"
    _run([str(tiny), "--batch", "2", "--kv-len", "32", "--recipe", "default", "--hardware", "a100-80gb",
          "--format", "json", "-o", str(out)])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def html_report(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    _run([str(tiny), "--seq", "32", "--hardware", "h100-sxm", "--recipe", "default", "--format", "html", "-o",
          str(out)])
    return out


def test_text_to_stdout(tiny, capsys):
    _run([str(tiny), "--seq", "8"])  # --hardware auto: this machine's row
    out = capsys.readouterr().out
    for text in ("prefill: batch 1 x seq 8 = 8 tokens per step", f"hardware  {resolve('auto').name} (",
                 "Symbolic totals, in batch, seq (the latency's expression is in --format json):", "Per layer",
                 "Per node", "Predicted latency at other sizes",
                 "predicted latency", "tokens/s ceiling", "decode ceiling (batch 1)", "weight bytes",
                 "model.layers.0", "self_attn.q_proj", "[model.layers.1: identical to model.layers.0]"):
        assert text in out, text
    header = next(line for line in out.splitlines() if line.startswith("module "))
    assert header.split() == ["module", "node", "op", "shape", "FLOPs", "bytes", "FLOP/B", "bound", "time", "share"]


def test_json_keys_and_totals_add_up(prefill_json):
    r = prefill_json
    assert r["report_version"] == 1
    assert set(r) == {"report_version", "versions", "model", "workload", "hardware", "recipe", "trace", "graphs",
                      "totals", "totals_before", "layers", "lowrank", "moe_load", "nodes"}
    assert r["workload"] == {"mode": "prefill", "batch": 2, "seq": 16, "kv_len": None, "tokens_per_step": 32}
    assert r["recipe"] is None and r["totals_before"] is None
    t, nodes = r["totals"], r["nodes"]
    assert t["kernels"] == len(nodes) and t["free_nodes"] > 0
    assert all(n["kind"] != "free" for n in nodes)
    for key in ("flops", "bytes"):
        assert t[key] == pytest.approx(sum(n[key] for n in nodes))
        assert t[key] == pytest.approx(sum(layer[key] for layer in r["layers"]))
    assert t["latency_s"] == pytest.approx(sum(n["time_s"] for n in nodes))
    assert sum(n["share"] for n in nodes) == pytest.approx(1.0)
    assert sum(layer["share"] for layer in r["layers"]) == pytest.approx(1.0)
    assert t["latency_s"] == pytest.approx(t["compute_bound_time_s"] + t["memory_bound_time_s"])
    assert t["latency_s"] == pytest.approx(sum(t["time_by_kind"].values()))
    assert t["tokens_per_s"] == pytest.approx(32 / t["latency_s"])
    # Every parameter is read once, and the rotary embedding's inv_freq buffer (head_dim / 2 float32s).
    assert t["weight_bytes"] == r["model"]["parameter_bytes"] + HIDDEN // HEADS // 2 * 4
    assert t["decode_ceiling_tokens_per_s"] == pytest.approx(HARDWARE["h100-sxm"].memory_bandwidth / t["weight_bytes"])
    # The symbolic totals, evaluated at the workload's sizes, give the numbers.
    batch, seq = sympy.symbols("batch seq")
    for key, field in (("flops", "flops"), ("bytes", "bytes"), ("latency_s", "latency_s")):
        expr = sympy.sympify(t["symbolic"][key])
        assert expr.free_symbols == {batch, seq}, key
        assert float(expr.subs({batch: 2, seq: 16})) == pytest.approx(t[field], rel=1e-3), key


def test_json_linear_flops_and_layers(prefill_json):
    r = prefill_json
    matmuls = [n for n in r["nodes"] if n["kind"] == "matmul"]
    # Every matmul of the captured graph is a linear layer (attention is one fused node on the meta device).
    assert len(matmuls) == 7 * LAYERS + 1
    linear_params = _linear_params(HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB)
    assert sum(n["flops"] for n in matmuls) == 2 * linear_params * 32
    assert sum(n["kind"] == "attention" for n in r["nodes"]) == LAYERS
    q = next(n for n in matmuls if n["module"] == "model.layers.0.self_attn.q_proj")
    assert q["layer"] == "model.layers.0" and q["flops"] == 2 * 32 * HIDDEN * HIDDEN
    assert q["shape"] == f"32x{HIDDEN}" and q["bound"] == "memory" and q["intensity"] == q["flops"] / q["bytes"]
    layers = [layer["layer"] for layer in r["layers"]]
    assert layers[0] == "model.embed_tokens" and layers[-1] == "lm_head"
    assert [x for x in layers if x.startswith("model.layers.")] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert [layer["same_as"] for layer in r["layers"] if layer["layer"].startswith("model.layers.")] == \
        [None] + ["model.layers.0"] * (LAYERS - 1)
    assert any("batch" in n["shape_symbolic"] and "seq" in n["shape_symbolic"] for n in r["nodes"])


def test_decode_with_recipe_has_before_and_after(decode_json):
    r = decode_json
    assert r["workload"] == {"mode": "decode", "batch": 2, "seq": 1, "kv_len": 32, "tokens_per_step": 2}
    from llmcompress.recipes import load_recipe

    passes = [p.name for p in load_recipe("default").passes]
    assert r["recipe"] == {"name": "default", "source": "default", "passes": passes}
    b, t = r["totals_before"], r["totals"]
    assert set(b) == set(t)
    # The default recipe's fusions move fewer bytes in fewer kernels for (almost) the same FLOPs.
    assert t["flops"] == pytest.approx(b["flops"], rel=0.02)
    assert t["bytes"] < b["bytes"] and t["kernels"] < b["kernels"] and t["latency_s"] < b["latency_s"]
    assert 0 < t["weight_bytes"] <= b["weight_bytes"]  # the KV cache is an input; folded norm weights are gone
    linears = [n for n in r["nodes"] if n["op"] in ("aten.linear.default", "llmcompress.fused_linear.default")]
    assert linears and all(n["op"] == "llmcompress.fused_linear.default" for n in linears)
    assert all(layer["time_s_before"] is not None for layer in r["layers"])
    linear_flops = sum(n["flops"] for n in linears)
    assert linear_flops == pytest.approx(2 * _linear_params(HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB) * 2,
                                         rel=0.02)  # plus the epilogues' elementwise work
    attention = [n for n in r["nodes"] if n["kind"] == "attention"]
    assert len(attention) == LAYERS and all(n["shape"] == f"2x{HEADS}x1x{HIDDEN // HEADS}" for n in attention)
    assert t["symbolic"]["flops"] == str(int(t["flops"]))  # a decode step is traced at fixed sizes
    # Renderers read only the report dict: the JSON renders as text and HTML with before/after columns.
    text = render_text(r)
    assert "decode step: batch 2, 1 new token over a static cache of 32" in text
    assert "before" in text and "speedup" in text
    assert "time before" in render_html(r)


def test_latency_by_size_table(tiny, prefill_json, decode_json, tmp_path):
    """The text and HTML reports give the predicted latency at batch 1, 8 x seq 1, 128, 2048 instead of the latency
    expression (a wall of Max terms); the JSON keeps the expression and has the table's numbers, which equal the
    latency of a report traced at that size."""
    t = prefill_json["totals"]
    table = {(row["batch"], row["seq"]): row for row in t["latency_by_size"]}
    assert list(table) == [(b, s) for b in cost_report.TABLE_BATCHES for s in cost_report.TABLE_SEQS] == \
        [(1, 1), (1, 128), (1, 2048), (8, 1), (8, 128), (8, 2048)]
    latency = sympy.sympify(t["symbolic"]["latency_s"])
    assert latency.free_symbols == set(sympy.symbols("batch seq"))  # the expression stays in the JSON
    for (b, s), row in table.items():
        assert row["latency_s"] == pytest.approx(float(latency.subs({"batch": b, "seq": s})), rel=1e-3)
        assert row["tokens_per_s"] == pytest.approx(b * s / row["latency_s"])
    assert table[8, 2048]["latency_s"] > table[8, 128]["latency_s"] > table[1, 128]["latency_s"]
    out = tmp_path / "b8s128.json"
    _run([str(tiny), "--batch", "8", "--seq", "128", "--hardware", "h100-sxm", "--format", "json", "-o", str(out)])
    assert json.loads(out.read_text())["totals"]["latency_s"] == pytest.approx(table[8, 128]["latency_s"], rel=1e-9)

    text, page = render_text(prefill_json), render_html(prefill_json)
    assert t["symbolic"]["latency_s"] not in text and t["symbolic"]["latency_s"] not in page
    assert "Max(" not in text and "Max(" not in page
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Predicted latency at other sizes"))
    assert lines[head + 1].split() == ["seq", "1", "seq", "128", "seq", "2048"]
    assert lines[head + 3].split()[:2] == ["batch", "1"] and lines[head + 4].split()[:2] == ["batch", "8"]
    assert "<h2>Latency by size</h2>" in page and page.count('<td class="n">', page.index("Latency by size")) >= 6
    # A decode step is traced at its sizes: no table, and its latency is a number.
    assert decode_json["totals"]["latency_by_size"] is None and "Latency by size" not in render_html(decode_json)
    assert "Predicted latency at other sizes" not in render_text(decode_json)


@pytest.mark.parametrize("dtype, hardware, drawn", [
    ("bfloat16", "h100-sxm", ["solid", "dashed"]),  # tensor-core bf16 peak above the float32 one
    ("float32", "h100-sxm", ["solid"]),  # the model's dtype is float32: one roof
    ("bfloat16", "cpu", ["solid"]),  # the CPU row has one peak for both
])
def test_roofline_caption_names_the_roofs_drawn(prefill_json, dtype, hardware, drawn):
    hw = resolve(hardware)
    report = json.loads(json.dumps(prefill_json))
    report["hardware"].update(name=hw.name, peak_flops=dict(hw.peak_flops), roof_dtype=dtype)
    assert [style for _, _, style in cost_report.roofs(report)] == drawn
    caption = cost_report.roofline_caption(report)
    assert ("dashed" in caption) == ("dashed" in drawn)
    assert "solid roof" in caption
    assert f"<figcaption>{caption}</figcaption>" in render_html(report).replace("&#x27;", "'")


_DYNAMO_NAMES = ("L[", "G[", "L.", "G.", "__import", "_modules", "getattr(")


def _check_module_names(report: dict, model) -> None:
    """Every node's module is a module path of the model, or a function transformers wraps as a module, named
    under the module that calls it ("model.layers.0.self_attn.apply_rotary_pos_emb()"); no Dynamo name anywhere."""
    known = {name for name, _ in model.named_modules()}
    for n in report["nodes"]:
        parent, _, last = n["module"].rpartition(".")
        assert n["module"] in known or (last.endswith("()") and last[:-2].isidentifier() and parent in known), n
    for text in (render_text(report), render_json(report), render_html(report)):
        assert not any(bad in text for bad in _DYNAMO_NAMES)


def test_module_names_of_a_llama(tiny, prefill_json):
    _check_module_names(prefill_json, load_model(tiny))
    rotary = {n["module"] for n in prefill_json["nodes"] if "apply_rotary_pos_emb" in n["module"]}
    assert rotary == {f"model.layers.{i}.self_attn.apply_rotary_pos_emb()" for i in range(LAYERS)}


@pytest.mark.parametrize("family", ["gpt2", "mixtral", "bert"])
def test_module_names_of_the_test_models(family):
    import torch

    from llmcompress.report.trace import trace_model
    from llmcompress.testing.models import tiny_model

    with torch.device("meta"):
        model = tiny_model(family, dtype=torch.bfloat16)
    traced = trace_model(model, torch.zeros(1, 8, dtype=torch.long, device="meta"), passes=["canonicalize"])
    report = json.loads(render_json(build_report(traced, resolve("h100-sxm"), model=model_info(model), seq=8)))
    _check_module_names(report, model)


def test_html_is_self_contained(html_report):
    page = html_report.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('src="data:image/png;base64,') == 1
    for external in ("<script", "<link", 'src="http', "url(http"):
        assert external not in page
    # Both layers are listed: the default recipe's fusions put the rotary tables into the first layer's kernel,
    # so the two layers of this model differ (the text report's test checks the folding of identical layers).
    for text in ("Roofline", "Per layer", "Per node", "predicted latency", "time before", "model.layers.0",
                 "model.layers.1"):
        assert text in page, text


@pytest.mark.skipif(not Path("/usr/bin/chromium").is_file(), reason="needs /usr/bin/chromium (Debian: chromium)")
def test_html_renders_in_headless_chromium(html_report, tmp_path):
    spec = importlib.util.spec_from_file_location("check_report_html", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    result = check.check_screenshot(check.screenshot(html_report, tmp_path / "report.png"))
    assert result["ok"], result
    assert result["size"] == list(check.WINDOW)


@pytest.mark.parametrize("args, message", [
    (["--batch", "-1"], "argument --batch: must be a positive integer (>= 1), got -1"),
    (["--seq", "0"], "argument --seq: must be a positive integer (>= 1), got 0"),
    (["--kv-len", "-8"], "argument --kv-len: must be a positive integer (>= 1), got -8"),
    (["--batch", "two"], "argument --batch: expected a positive integer, got 'two'"),
    (["--kv-len", "16", "--seq", "4"], "argument --seq: must be 1 with --kv-len"),
    (["--hardware", "tpu-v5"], "argument --hardware: unknown hardware 'tpu-v5'; expected auto or one of h100-sxm"),
    (["--format", "pdf"], "argument --format: invalid choice: 'pdf'"),
    (["--recipe", "no-such-recipe"], "not a built-in recipe (default"),
    (["-o", "/no/such/folder/report.txt"], "argument -o/--output: folder of '/no/such/folder/report.txt' does not"),
])
def test_bad_arguments(tiny, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tiny), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "llmcompress report: error:" in err and message in err, err


def _bad_model(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "nope"
    if kind == "no-config":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if kind == "bad-json":
        (tmp_path / "config.json").write_text("{not json")
        return tmp_path
    if kind == "no-model-type":
        (tmp_path / "config.json").write_text('{"hidden_size": 8}')
        return tmp_path / "config.json"
    transformers.T5Config(d_model=8, num_layers=1, vocab_size=16).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist (expected a local model folder with a config.json"),
    ("no-config", "has no config.json"),
    ("bad-json", "is not valid JSON"),
    ("no-model-type", "is not a transformers config (no 'model_type' key)"),
    ("not-causal", "(model_type 't5') is not a causal language model"),
])
def test_unreadable_model(tmp_path, capsys, kind, message):
    path = _bad_model(tmp_path, kind)
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(path)
    with pytest.raises(SystemExit) as e:
        main(["report", str(path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_load_model_on_meta_from_a_config_file(tiny):
    model = load_model(tiny / "config.json")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.device.type == "meta" and weight.dtype.is_floating_point and str(weight.dtype) == "torch.bfloat16"
    assert load_model(tiny, dtype="fp32").lm_head.weight.dtype == weight.new_empty(0).float().dtype


_KNOWN = {"", "model", "model.layers", "model.layers.3", "model.layers.3.mlp", "transformer.h.1", "lm_head"}


@pytest.mark.parametrize("source, module", [
    ("L['self'].model.layers.3.mlp", "model.layers.3.mlp"),
    ("L['args'][0].model.layers.3.mlp", "model.layers.3.mlp"),  # forward behind a decorator (transformers 5.25)
    ("L['kwargs']['model'].model.layers.3", "model.layers.3"),
    ("G['model'].model.layers.3", "model.layers.3"),
    ("getattr(L['self'].model.layers, '3').mlp", "model.layers.3.mlp"),
    ("getattr(getattr(L['args'][0].model, 'layers'), '3')", "model.layers.3"),
    ("L['self']._modules['transformer']._modules['h']._modules['1']", "transformer.h.1"),
    ("L['args'][0].lm_head", "lm_head"),
    ("L['self']", ""),
    ("model.layers.3", "model.layers.3"),
])
def test_module_paths_whatever_the_frame(source, module):
    assert module_path(source) == module
    assert module_path(source, _KNOWN) == module


def test_module_paths_through_the_model_structure():
    # A prefix no rule knows: the longest tail that is a module of the model.
    assert module_path("L['fn'].__wrapped__.__self__.model.layers.3.mlp", _KNOWN) == "model.layers.3.mlp"
    # Not a module of the model (transformers wraps functions such as apply_rotary_pos_emb as modules)...
    rotary = "G['__import_transformers_dot_models_dot_llama_dot_modeling_llama'].apply_rotary_pos_emb"
    assert module_path(rotary, _KNOWN) is None
    # ... so in a module stack it is named after the module that calls it.
    stack = ["L['args'][0].model", "L['args'][0].model.layers.3", rotary]
    assert stack_path(stack, _KNOWN) == "model.layers.3.apply_rotary_pos_emb()"
    assert stack_path(stack[:2], _KNOWN) == "model.layers.3"
    assert stack_path(["L['self']", rotary], _KNOWN) == "apply_rotary_pos_emb()"  # called by the model itself
    assert stack_path([rotary], _KNOWN) is None
    assert module_path("L['self'].model.layers.3.mlp.up_proj.weight.q4", _KNOWN | {"model.layers.3.mlp.up_proj"}) \
        is None


@pytest.mark.parametrize("module, layer", [
    ("model.layers.12.self_attn.q_proj", "model.layers.12"),
    ("model.layers.0.block_sparse_moe.experts.3.w1", "model.layers.0"),
    ("transformer.h.5.attn.c_attn", "transformer.h.5"),
    ("model.decoder.layers.2.fc1", "model.decoder.layers.2"),
    ("model.embed_tokens", "model.embed_tokens"),
    ("model.rotary_emb.inner", "model.rotary_emb"),
    ("lm_head", "lm_head"),
    ("", "(graph)"),
])
def test_layer_of(module, layer):
    assert layer_of(module) == layer


@pytest.mark.fixtures
def test_trained_tiny_llama_fixture(tmp_path):
    folder = FIXTURES / "tiny-llama"
    if not folder.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES}: run with ../shared beside the checkout or set "
                    "LLMCOMPRESS_FIXTURES")
    out = tmp_path / "tiny-llama.json"
    _run([str(folder), "--hardware", "h100-sxm", "--format", "json", "-o", str(out)])
    r = json.loads(out.read_text())
    config = json.loads((folder / "config.json").read_text())
    assert r["model"]["dtype"] == "bfloat16" and r["model"]["architecture"] == "LlamaForCausalLM"
    assert 12.5e6 < r["model"]["parameters"] < 12.7e6  # 12.6 M (fixtures README)
    assert r["totals"]["weight_bytes"] == 2 * r["model"]["parameters"] + config["head_dim"] // 2 * 4  # + inv_freq
    tokens = r["workload"]["tokens_per_step"]
    assert tokens == 128
    params = _linear_params(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"])
    assert sum(n["flops"] for n in r["nodes"] if n["kind"] == "matmul") == 2 * params * tokens
    blocks = [layer for layer in r["layers"] if layer["layer"].startswith("model.layers.")]
    assert len(blocks) == config["num_hidden_layers"]
    assert all(layer["same_as"] == "model.layers.0" for layer in blocks[1:])
    _check_module_names(r, load_model(folder))
