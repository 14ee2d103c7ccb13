"""Reports from a three-layer trace equal reports from a full trace, for prefill and decode with a recipe, whatever
frame Dynamo reaches the model through; configs whose layers differ are traced in full."""

from __future__ import annotations

import functools

import pytest
import transformers

from llmcompress.report.cost_report import report_model
from llmcompress.report.layer_repeat import repeatable_depth, shallow_config


def _close(a, b, path="report") -> None:
    """Equal, floats to 1e-12 relative (sums run in another order)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=0), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _strip(report: dict) -> dict:
    """The report without what says how it was traced."""
    out = dict(report)
    out.pop("trace")
    out["nodes"] = [{k: v for k, v in r.items() if k not in ("node", "replicated_from")} for r in report["nodes"]]
    return out


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deep-llama")
    transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                             dtype="bfloat16").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kwargs", [dict(batch=2, seq=8), dict(batch=1, kv_len=16, recipe="default")],
                         ids=["prefill", "decode-recipe"])
def test_repeated_layers_equal_a_full_trace(deep, kwargs):
    fast = report_model(deep, hardware="h100-sxm", **kwargs)
    full = report_model(deep, hardware="h100-sxm", full_trace=True, **kwargs)
    assert fast["trace"] == {"layers_traced": 3, "repeated_from": "model.layers.2"}
    assert full["trace"] == {"layers_traced": 5, "repeated_from": None}
    _close(_strip(fast), _strip(full))
    assert fast["model"]["num_hidden_layers"] == 5
    replicated = {r["layer"] for r in fast["nodes"] if r["replicated_from"]}
    assert replicated == {"model.layers.3", "model.layers.4"}


def _behind_args(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):  # Dynamo names the model L['args'][0] (as under transformers 5.25's wrapper)
        return forward(*args, **kwargs)
    return wrapper


def _behind_named_local(forward):
    @functools.wraps(forward)
    def wrapper(this, *args, **kwargs):  # ... or L['this']
        return forward(this, *args, **kwargs)
    return wrapper


@pytest.mark.parametrize("wrap", [_behind_args, _behind_named_local], ids=["args", "named-local"])
def test_layer_names_do_not_depend_on_the_frame(deep, wrap, monkeypatch):
    """The model's forward behind a decorator: layers keep their module paths, the repeated layers their weights."""
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", wrap(transformers.LlamaForCausalLM.forward))
    report = report_model(deep, hardware="h100-sxm", batch=1, seq=4)
    assert report["trace"]["repeated_from"] == "model.layers.2"
    # Every weight counted, the untraced layers' too (the decode ceiling is bandwidth / these bytes).
    assert report["totals"]["weight_bytes"] == report["model"]["parameter_bytes"] + 16 // 2 * 4  # + rotary inv_freq
    layers = [x["layer"] for x in report["layers"]]  # "model": LlamaModel's own work (the causal mask)
    assert layers == ["model.embed_tokens", "model", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(5)] \
        + ["model.norm", "lm_head"]


def test_which_configs_repeat():
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    assert repeatable_depth(transformers.LlamaConfig(num_hidden_layers=80, **base)) == 80
    assert repeatable_depth(transformers.LlamaConfig(num_hidden_layers=3, **base)) is None
    mixed = transformers.Qwen2Config(num_hidden_layers=5, use_sliding_window=True, max_window_layers=2, **base)
    assert len(set(mixed.layer_types)) == 2
    assert repeatable_depth(mixed) is None
    small = shallow_config(transformers.Qwen2Config(num_hidden_layers=6, **base))
    assert small.num_hidden_layers == 3 and len(small.layer_types) == 3


def test_heterogeneous_config_is_traced_in_full(tmp_path):
    transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, use_sliding_window=True, sliding_window=4,
                             max_window_layers=1, dtype="float32").save_pretrained(tmp_path)
    report = report_model(tmp_path, hardware="h100-sxm", seq=8)
    assert report["trace"] == {"layers_traced": 5, "repeated_from": None}
    assert not any(r["replicated_from"] for r in report["nodes"])
