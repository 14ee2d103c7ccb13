"""quantize-linear's `embedding` option: the token-embedding table in int8 rows or int4 groups (one op per lookup,
numerics of the eager model with the table quantized the same way), released with release_weights, left alone when
an LM head reads it tied, and set by the w8a16 / w4a16 recipes."""

from __future__ import annotations

import json

import pytest
import torch

from llmcompress.backend import make_backend
from llmcompress.errors import OptionError
from llmcompress.formats import quantized as formats
from llmcompress.passes.weights import is_released
from llmcompress.testing.models import example_ids, main_output, tiny_model

OPS = {"int8": torch.ops.llmcompress.embedding_w8.default, "int4": torch.ops.llmcompress.embedding_w4.default}


def _fake_quant_table(model, fmt, group_size=32):
    emb = model.get_input_embeddings()
    w = emb.weight.data
    if fmt == "int8":
        deq = formats.dequantize_int8(*formats.quantize_int8_per_channel(w))
    else:
        deq = formats.dequantize_int4(*formats.quantize_int4_rtn(w, group_size), group_size)
    emb.weight.data = deq.to(w.dtype)
    return model


def _run(model, quant, tmp_path, **options):
    seen, report = [], tmp_path / "r.json"
    backend = make_backend(on_graph=lambda before, after, ctx: seen.append(after))
    passes = {"canonicalize": {}, "quantize-linear": quant}
    with torch.no_grad():
        out = main_output(torch.compile(model, backend=backend, options={
            "passes": passes, "lowering": "inductor", "report": str(report), **options})(example_ids()))
    rec = next(p for p in json.loads(report.read_text())["graphs"][0]["passes"] if p["name"] == "quantize-linear")
    return out, seen[0], rec


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_embedding_table_quantized_and_released(fmt, tmp_path):
    model = tiny_model("llama")
    table = model.get_input_embeddings().weight
    # Only the table quantized (every linear skipped): the output is the eager model's on the fake-quantized table.
    quant = {"scheme": "w8a16", "embedding": fmt, "group_size": 32, "skip": ["*"]}
    with torch.no_grad():
        expected = main_output(_fake_quant_table(tiny_model("llama"), fmt)(example_ids()))
    out, gm, rec = _run(model, quant, tmp_path, release_weights=True)
    assert sum(1 for n in gm.graph.nodes if n.target is OPS[fmt]) == 1
    assert not any(n.target is torch.ops.aten.embedding.default for n in gm.graph.nodes)
    assert rec["stats"][f"embedding {fmt}"] == 1
    (d,) = [d for d in rec["decisions"] if "embedding" in d]
    assert d["layer"] == "model.embed_tokens" and d["quantized_bytes"] < d["dense_bytes"] / (3.5 if fmt == "int8" else 5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert is_released(table)


def test_tied_table_is_left_dense(tmp_path):
    model = tiny_model("llama")
    model.lm_head.weight = model.get_input_embeddings().weight  # tied, as many small LMs are
    # Every linear left dense, so the tied LM head still reads the table.
    _out, gm, rec = _run(model, {"scheme": "w8a16", "embedding": "int8", "skip": ["*"]}, tmp_path,
                         release_weights=True)
    assert rec["stats"]["embedding skipped: tied"] == 1
    assert not any(n.target is OPS["int8"] for n in gm.graph.nodes)
    assert not is_released(model.get_input_embeddings().weight)


def test_recipes_set_the_embedding_format():
    from llmcompress.recipes import load_recipe

    specs = {r: load_recipe(r) for r in ("w8a16", "w4a16", "w4a16-gptq")}
    quant = {r: next(s for s in spec.passes if s.name == "quantize-linear").options for r, spec in specs.items()}
    assert quant["w8a16"]["embedding"] == "int8" and quant["w4a16"]["embedding"] == "int4"
    assert "embedding" not in quant["w4a16-gptq"]


def test_bad_embedding_option():
    with pytest.raises(Exception) as info, torch.no_grad():
        torch.compile(tiny_model("llama"), backend="llmcompress", options={"lowering": "eager", "passes": {
            "quantize-linear": {"embedding": "int3"}}})(example_ids())
    cause = info.value
    while cause.__cause__ is not None or getattr(cause, "inner_exception", None) is not None:
        cause = cause.__cause__ or cause.inner_exception  # Dynamo wraps it (BackendCompilerFailed)
    assert isinstance(cause, OptionError) and "'int3'" in str(cause) and "'int4'" in str(cause)
