"""fuse-moe's dynamic expert skipping (`skip_beta`, `skip_budget`) on a random Mixtral: the compiled model equals
the eager one with the rule applied to its routers' weights, whether the block is fused (skipped in moe_route) or
declined (the fallback on the routing weights); the budget's βs keep the calibration perplexity within it; the
Lagrangian choice; bad options."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers

from llmcompress.errors import OptionError
from llmcompress.passes.moe.fuse_moe import FuseMoeOptions
from llmcompress.passes.moe.skip import apply_skip, skip_slots
from llmcompress.passes.moe.skip_calibration import LayerCurve, choose_betas

VOCAB = 96


def _model():
    """Mixtral, grouped_mm experts (one graph), routers 30× their initial scale: a fresh router gives every token
    about equal top-2 weights, which no β below 1 would skip."""
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128, intermediate_size=40,
                                        num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(30)
    return model


def _ids(seed=1, batch=2, seq=9):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


CAL = _ids(3)  # the compiled shape: the calibration feeds are exactly these tokens


def _compile(fuse, report, cal=True):
    torch._dynamo.reset()
    options = {"lowering": "eager", "strict": True, "report": str(report),
               "passes": {"canonicalize": {}, "fuse-moe": fuse}}
    if cal:
        options.update(calibration=CAL, calibration_samples=CAL.shape[0], calibration_seq_len=CAL.shape[1])
    return torch.compile(_model(), backend="llmcompress", options=options)


def _record(path):
    graphs = json.loads(path.read_text())["graphs"]
    record = next(p for g in graphs for p in g["passes"] if p["name"] == "fuse-moe")
    return [d["moe"] for d in record["decisions"]], record["stats"]


def _eager_with_rule(ids, betas):
    """(logits, fraction of slots skipped on the calibration data, calibration perplexity) of the eager model with
    the rule on its routers' weights."""
    model = _model()
    counts = [0, 0]
    handles = []
    for layer, beta in zip(model.model.layers, betas):
        def hook(_m, _i, out, beta=beta):
            mask = skip_slots(out[1], beta)
            counts[0] += int(mask.sum())
            counts[1] += mask.numel()
            return out[0], apply_skip(out[1], beta), out[2]
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        out = model(ids).logits
        counts[:] = [0, 0]
        ppl = _perplexity(model(CAL).logits)
    for h in handles:
        h.remove()
    return out, counts[0] / counts[1], ppl


def _perplexity(logits):
    return math.exp(float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), CAL[:, 1:].reshape(-1))))


@pytest.mark.parametrize("objective, where", [("always", "moe_route"), ("speed", "routing weights")])
def test_skip_beta_equals_eager_with_the_rule_fused_or_not(objective, where, tmp_path):
    """`always`: the blocks are fused and the slots dropped in moe_route; `speed` on a CPU: the cost model declines
    the blocks (benchmarks/results/moe_cpu.json) and the same rule lands on the routing weights."""
    ids = _ids()
    with torch.no_grad():
        out = _compile({"objective": objective, "skip_beta": 0.5, "skip_compensate": False},
                       tmp_path / "r.json")(ids).logits
        dense = _model()(ids).logits
    expected, skipped, _ = _eager_with_rule(ids, [0.5, 0.5])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # something was skipped
    decisions, stats = _record(tmp_path / "r.json")
    assert [d["fused"] for d in decisions] == [objective == "always"] * 2
    assert all(d["skip"]["beta"] == 0.5 and d["skip"]["where"].startswith(where) for d in decisions)
    assert 0 < skipped and abs(stats["expert evaluations skipped"] - skipped) < 1e-6


def test_skip_budget_keeps_the_calibration_perplexity_within_it(tmp_path):
    ids = _ids()
    budget = 0.02
    with torch.no_grad():
        out = _compile({"objective": "always", "skip_budget": budget, "skip_compensate": False},
                       tmp_path / "r.json")(ids).logits
    decisions, stats = _record(tmp_path / "r.json")
    betas = [d["skip"]["beta"] for d in decisions]
    assert any(b > 0 for b in betas)
    expected, skipped, ppl = _eager_with_rule(ids, betas)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert abs(stats["expert evaluations skipped"] - skipped) < 1e-6
    dense_ppl, skipped_ppl = stats["skip calibration perplexity (dense, skipped)"]
    with torch.no_grad():  # the calibration perplexities the pass measured through the graph, from the eager model
        assert abs(dense_ppl - _perplexity(_model()(CAL).logits)) < 1e-3 * dense_ppl
    assert abs(skipped_ppl - ppl) < 1e-3 * ppl
    assert skipped_ppl <= dense_ppl * (1 + budget) + 1e-3


def test_choose_betas_spends_the_budget_where_skipping_is_cheap():
    cheap = LayerCurve({0.0: (0.0, 0.0), 0.2: (0.01, 0.2), 0.4: (0.02, 0.4)})
    dear = LayerCurve({0.0: (0.0, 0.0), 0.2: (0.03, 0.2), 0.4: (0.06, 0.4)})
    assert choose_betas([cheap, dear], 0.025) == [0.4, 0.0]
    assert choose_betas([cheap, dear], 0.05) == [0.4, 0.2]
    assert choose_betas([cheap, dear], 0.005) == [0.0, 0.0]


@pytest.mark.parametrize("opts, match", [
    ({"skip_beta": 1.0}, r"skip_beta must be in \[0, 1\)"),
    ({"skip_beta": -0.1}, r"skip_beta must be in \[0, 1\)"),
    ({"skip_beta": "0.3"}, r"skip_beta must be in \[0, 1\)"),
    ({"skip_budget": 0.0}, r"skip_budget must be > 0"),
    ({"skip_budget": 0.01, "skip_beta": 0.3}, "not both"),
])
def test_bad_options_say_what_is_allowed(opts, match):
    with pytest.raises(OptionError, match=match):
        FuseMoeOptions(**opts)


def test_skip_budget_without_calibration_data_raises(tmp_path):
    compiled = _compile({"skip_budget": 0.01}, tmp_path / "r.json", cal=False)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(_ids())
    e = info.value
    while e.__cause__ is not None or getattr(e, "inner_exception", None) is not None:
        e = e.__cause__ or e.inner_exception
    assert isinstance(e, OptionError) and re.search("skip_budget calibrates β on calibration data", str(e)), repr(e)


def test_recompiles_reuse_the_calibrated_betas(tmp_path, monkeypatch):
    """The βs a budget calibrates (about 30 runs of the graph) are derived once; a recompile loads them."""
    from llmcompress.passes.moe import skip_option

    calls = []
    real = skip_option.calibrate_betas_by_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(skip_option, "calibrate_betas_by_loss", counted)
    ids = _ids()
    betas = []
    for i in range(2):
        torch._dynamo.reset()
        with torch.no_grad():
            _compile({"objective": "always", "skip_budget": 0.02}, tmp_path / f"r{i}.json")(ids)
        betas.append([d["skip"]["beta"] for d in _record(tmp_path / f"r{i}.json")[0]])
    assert len(calls) == 1
    assert betas[0] == betas[1] and any(b > 0 for b in betas[0])
