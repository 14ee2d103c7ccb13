"""The fuse-moe pass: compiled Mixtral, Qwen2-MoE (shared expert) and OLMoE random configs through
`llmcompress::moe_route` + `llmcompress::moe_experts` equal the eager model (fp32, every experts implementation that
keeps the block in one graph), greedy static-cache `generate` gives eager's tokens, a block the ops would compute
differently is left as it is (verification), and the report and errors."""

from __future__ import annotations

import json
import types

import pytest
import torch
import transformers

from llmcompress.backend import make_backend
from llmcompress.errors import OptionError
from llmcompress.passes.moe.fuse_moe import FuseMoeOptions

_COMMON = {"vocab_size": 96, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 128}
CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"intermediate_size": 40, "num_local_experts": 4,
                                                            "num_experts_per_tok": 2}),
    # A shared expert with its sigmoid gate beside the routed ones; top-k weights not renormalised.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"intermediate_size": 64, "moe_intermediate_size": 24,
                                                                "shared_expert_intermediate_size": 40, "num_experts": 6,
                                                                "num_experts_per_tok": 2, "norm_topk_prob": False}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 3,
                                                      "norm_topk_prob": False, "pad_token_id": 0, "bos_token_id": 0,
                                                      "eos_token_id": 1}),
}


def _model(family: str, impl: str = "grouped_mm", seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, kwargs = CONFIGS[family]
    config = getattr(transformers, config_cls)(**_COMMON, **kwargs)
    config._experts_implementation = impl
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.requires_grad_(False)
    return model


def _ids(batch=2, seq=9, seed=1):
    return torch.randint(2, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _compile(model, passes=None, lowering="eager", report=None, graphs=None):
    torch._dynamo.reset()
    options = {"lowering": lowering, "passes": passes or {"canonicalize": {}, "fuse-moe": {"objective": "always"}}}
    if report is not None:
        options["report"] = str(report)
    backend = "llmcompress" if graphs is None else make_backend(on_graph=lambda b, a, ctx: graphs.append(a))
    return torch.compile(model, backend=backend, options=options)


def _fuse_records(report):
    return [p for g in json.loads(report.read_text())["graphs"] for p in g["passes"] if p["name"] == "fuse-moe"]


def _ops(gm):
    return [n.target for n in gm.graph.nodes if "llmcompress.moe_" in str(n.target)]


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_compiled_blocks_run_the_two_ops_and_equal_the_eager_model(family, impl, tmp_path):
    model, ids = _model(family, impl), _ids()
    graphs = []
    with torch.no_grad():
        expected = model(ids).logits
        out = _compile(model, report=tmp_path / "r.json", graphs=graphs)(ids).logits
    torch.testing.assert_close(out, expected)
    assert _ops(graphs[0]).count(torch.ops.llmcompress.moe_experts.default) == 2  # one per layer
    assert _ops(graphs[0]).count(torch.ops.llmcompress.moe_route.default) == 2
    decisions = [d["moe"] for r in _fuse_records(tmp_path / "r.json") for d in r["decisions"]]
    assert [d["fused"] for d in decisions] == [True, True]
    k = model.config.num_experts_per_tok
    assert all(d["top_k"] == k and d["kernel"].startswith("moe_route + moe_experts") for d in decisions)
    assert all(d["norm_topk_prob"] == (family == "mixtral") for d in decisions)


def test_inductor_lowering_matches_the_eager_model():
    model, ids = _model("qwen2_moe"), _ids()
    with torch.no_grad():
        expected = model(ids).logits
        out = _compile(model, lowering="inductor")(ids).logits
    torch.testing.assert_close(out, expected)


def test_greedy_static_cache_generate_gives_eagers_tokens(tmp_path):
    model, ids = _model("mixtral"), _ids(batch=1, seq=6)

    def generate(compile_config=None):
        return model.generate(ids, max_new_tokens=16, do_sample=False, cache_implementation="static",
                              compile_config=compile_config, pad_token_id=0)

    expected = generate()
    config = transformers.CompileConfig(backend="llmcompress", mode=None, options={
        "lowering": "eager", "strict": True, "report": str(tmp_path / "r.json"),
        "passes": {"canonicalize": {}, "fuse-moe": {"objective": "always"}}})
    config._compile_all_devices = True
    assert torch.equal(generate(config), expected)
    fused = [d["moe"]["fused"] for r in _fuse_records(tmp_path / "r.json") for d in r["decisions"]]
    assert fused and all(fused)


def test_a_block_the_ops_would_compute_differently_is_left_as_it_is(tmp_path):
    """Experts that ignore their routing weights (a block shape the ops do not compute): verification catches the
    difference, the block stays as traced, and the model still equals eager."""
    model, ids = _model("mixtral"), _ids()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        forward = experts.forward

        def unweighted(self, hidden, index, weights, forward=forward):
            return forward(hidden, index, torch.ones_like(weights))

        experts.forward = types.MethodType(unweighted, experts)
    graphs = []
    with torch.no_grad():
        expected = model(ids).logits
        out = _compile(model, report=tmp_path / "r.json", graphs=graphs)(ids).logits
    torch.testing.assert_close(out, expected)
    assert not _ops(graphs[0])
    decisions = [d["moe"] for r in _fuse_records(tmp_path / "r.json") for d in r["decisions"]]
    assert decisions and all(not d["fused"] and "verification failed" in d["why"] for d in decisions)


def test_the_eager_experts_loop_breaks_the_graph_and_the_report_says_how_to_fuse(tmp_path):
    model, ids = _model("mixtral", "eager"), _ids()
    with torch.no_grad():
        expected = model(ids).logits
        out = _compile(model, report=tmp_path / "r.json")(ids).logits
    torch.testing.assert_close(out, expected)
    decisions = [d["moe"] for r in _fuse_records(tmp_path / "r.json") for d in r["decisions"]]
    assert decisions and not any(d["fused"] for d in decisions)
    assert all("grouped_mm" in d["why"] for d in decisions)


def test_objective_speed_asks_the_cost_model_and_reports_its_prices(tmp_path):
    model, ids = _model("mixtral"), _ids()
    with torch.no_grad():
        _compile(model, passes={"canonicalize": {}, "fuse-moe": {}}, lowering="inductor",
                 report=tmp_path / "r.json")(ids)
    decisions = [d["moe"] for r in _fuse_records(tmp_path / "r.json") for d in r["decisions"]]
    assert len(decisions) == 2
    for d in decisions:
        p = d["predicted"]
        assert p["unfused_s"] > 0 and p["fused_s"] > 0
        assert d["fused"] == (p["fused_s"] <= p["unfused_s"])


@pytest.mark.parametrize("opts, match", [({"objective": "fast"}, "'speed' or 'always'"),
                                         ({"verify": "yes"}, "true or false")])
def test_bad_options_say_what_is_allowed(opts, match):
    with pytest.raises(OptionError, match=match):
        FuseMoeOptions(**opts)


def test_after_moe_prune_the_fused_blocks_equal_the_pruned_unfused_model(tmp_path):
    """moe-prune slices the removed experts out of the block; fuse-moe after it fuses the sliced block."""
    model, ids = _model("mixtral"), _ids()
    cal = torch.randint(2, 96, (4, 32), generator=torch.Generator().manual_seed(5))
    base = {"lowering": "eager", "calibration": cal, "calibration_samples": 4, "calibration_seq_len": 32}
    prune = {"canonicalize": {}, "moe-prune": {"keep": 3}}
    with torch.no_grad():
        torch._dynamo.reset()
        expected = torch.compile(model, backend="llmcompress", options={**base, "passes": prune})(ids).logits
        torch._dynamo.reset()
        out = torch.compile(model, backend="llmcompress", options={
            **base, "report": str(tmp_path / "r.json"),
            "passes": {**prune, "fuse-moe": {"objective": "always"}}})(ids).logits
    torch.testing.assert_close(out, expected)
    assert [d["moe"]["fused"] for r in _fuse_records(tmp_path / "r.json") for d in r["decisions"]] == [True, True]
