"""Exit heads and exact self-speculative decoding (`llmcompress.exit_heads`, `llmcompress.speculative`): the output is
token-identical to `model.generate(do_sample=False)` for several exits and draft lengths, with rejections exercised;
the fitted translation beats the logit lens on held-back tokens (agreement and perplexity); the same
through HF generate's custom_generate hook (`SelfSpeculativeDecoding`), which rejects what it cannot keep exact; "auto" declines where the cost model predicts no gain
and still returns generate's tokens; bad input raises. Fixture tests (tiny-llama) are marked `fixtures`."""

from __future__ import annotations

import pytest
import torch

from llmcompress import SelfSpeculativeDecoding, self_speculative_generate
from llmcompress.cost import decode_step
from llmcompress.errors import OptionError
from llmcompress.exit_heads import ExitHead, decoder_parts, exit_agreement, exit_report, fit_exit_heads, layer_states
from llmcompress.speculative import plan_speculation, predicted_speedup, step_costs, tokens_per_step
from llmcompress.testing.fixtures import corpus_windows, fixtures_dir, load_model, load_tokenizer, missing
from llmcompress.testing.models import example_ids, tiny_model


def _generate(model, prompt, n):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)


@pytest.fixture(scope="module")
def llama4():
    # 4 layers (testing's default 2 leaves one exit): exits 1-3 disagree often enough to exercise rejections
    return tiny_model("llama", layers=4)


@pytest.mark.parametrize("exit_layer,draft_len", [(1, 1), (2, 3), (3, 2), (3, 5)])
def test_token_identical_random_llama(llama4, exit_layer, draft_len):
    prompt, cal = example_ids(1, 7, seed=3), example_ids(4, 40)
    ids, stats = self_speculative_generate(llama4, prompt, max_new_tokens=30, calibration=cal,
                                           exit_layer=exit_layer, draft_len=draft_len, return_stats=True)
    assert torch.equal(ids, _generate(llama4, prompt, 30))
    assert 0 < stats["accepted"] < stats["drafted"]  # some drafts kept, some rejected: both paths ran
    assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
    assert (stats["exit_layer"], stats["draft_len"], stats["declined"]) == (exit_layer, draft_len, None)
    # every verify step keeps its accepted drafts plus one token of its own; the prefill gives the first token
    assert stats["verify_steps"] + stats["accepted"] + 1 == ids.shape[1] - prompt.shape[1]


def test_token_identical_tiny_llama_two_layers():
    model = tiny_model("llama")
    prompt = example_ids(1, 5, seed=4)
    ids = self_speculative_generate(model, prompt, max_new_tokens=17, calibration=example_ids(2, 24),
                                    exit_layer=1, draft_len=4)
    assert torch.equal(ids, _generate(model, prompt, 17))


def test_stops_at_eos_like_generate(llama4):
    prompt = example_ids(1, 7, seed=3)
    full = _generate(llama4, prompt, 30)
    eos = full[0, prompt.shape[1] + 12].item()  # a token the model emits mid-way: generate stops there
    before, llama4.generation_config.eos_token_id = llama4.generation_config.eos_token_id, eos
    try:
        expected = _generate(llama4, prompt, 30)
        ids = self_speculative_generate(llama4, prompt, max_new_tokens=30, calibration=example_ids(4, 40),
                                        exit_layer=3, draft_len=4)
    finally:
        llama4.generation_config.eos_token_id = before
    assert expected.shape[1] < full.shape[1]
    assert torch.equal(ids, expected)


def test_fit_recovers_an_exact_affine_map():
    """If the last state is an exact affine map of layer E's, ridge → 0 recovers it (float64 solve)."""
    model = tiny_model("llama", layers=4)
    parts = decoder_parts(model)
    g = torch.Generator().manual_seed(0)
    a = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g)
    b = torch.randn(64, generator=g)
    # make layers 3 and 4 an exact affine map of layer 2's output: layer 3 applies it, layer 4 is the identity
    parts.layers[2].forward = lambda h, **kw: torch.nn.functional.linear(h, a, b)
    parts.layers[3].forward = lambda h, **kw: h
    head = fit_exit_heads(model, example_ids(8, 40), [2], ridge=1e-10)[2]
    torch.testing.assert_close(head.weight, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.bias, b, atol=1e-4, rtol=1e-4)


def test_tokens_per_step_counts_agreeing_runs():
    agree = torch.tensor([[True, True, False, True, True, True]])
    # k = 2, starts 0..4: runs 2, 1, 0, 2, 2 → 1 + 7/5
    assert tokens_per_step(agree, 2) == pytest.approx(1 + 7 / 5)
    assert tokens_per_step(agree, 1) == pytest.approx(1 + 5 / 6)


def test_predicted_speedup_formula():
    costs = {"layer": 1.0, "lm_head": 4.0, "exit_head": 5.0, "num_layers": 6}  # a plain step: 6 + 4 = 10
    # E = 4, k = 2 without host overheads: 2·0.4 + 1 + 2·0.5 = 2.8 plain steps
    assert predicted_speedup(2.5, 4, 2, costs) == pytest.approx(2.5 / 2.8)
    # host work: 3 slice calls of 0.5 (k + 1 = 3 rows: two calls of layers < E... plus the verify's), a plain step's
    # 2; the verify's layers at 3 rows cost 1.5 each, its LM head 6
    more = {**costs, "run_overhead": 0.5, "plain_overhead": 2.0, "layer_at_rows": {3: 1.5}, "lm_head_at_rows": {3: 6.0}}
    spec = 3 * (4 * 1.0 + 0.5) + 2 * 5.0 + 2 * 1.5 + 0.5 + 6.0  # 33
    assert decode_step.speculative_step_s(4, 2, more) == pytest.approx(spec)
    assert decode_step.plain_step_s(more) == pytest.approx(12.0)
    assert predicted_speedup(2.5, 4, 2, more) == pytest.approx(2.5 * 12.0 / spec)
    assert decode_step.predicted_tokens_per_s(more) == pytest.approx(1 / 12.0)
    assert decode_step.predicted_tokens_per_s(more, 4, 2, 2.5) == pytest.approx(2.5 / spec)
    # per-row terms where no table holds the rows: 1 + 2·0.25 per verify layer, 4 + 2·1 for the LM head
    rows = {**costs, "layer_per_row": 0.25, "lm_head_per_row": 1.0}
    assert decode_step.speculative_step_s(4, 2, rows) == pytest.approx(3 * 4 + 2 * 5 + 2 * 1.5 + 6)


def test_measured_step_costs_cover_every_part(llama4):
    """measure_step_costs prices every part the decode-step model needs, by rows. Whether they predict a run's
    time is a speed claim, measured side by side in benchmarks/early_exit.py (its "within 15 %" target), not
    asserted here: on a shared CPU a timed unit test flakes (it did: 0.15 s predicted vs 0.20 s measured)."""
    import llmcompress.speculative as spec

    head = fit_exit_heads(llama4, example_ids(4, 40), [2])[2]
    costs = spec.measure_step_costs(llama4, head, new_tokens=8, max_rows=4)
    assert costs["num_layers"] == 4 and set(costs["layer_at_rows"]) == {1, 2, 3, 4}
    assert set(costs["lm_head_at_rows"]) == {1, 2, 3, 4}
    assert all(costs[k] > 0 for k in ("layer", "lm_head", "exit_head", "run_overhead", "full"))
    assert decode_step.speculative_step_s(2, 3, costs) > 0


def test_auto_declines_where_predicted_slower_and_keeps_tokens(llama4):
    prompt, cal = example_ids(1, 7, seed=3), example_ids(8, 40)
    plan = plan_speculation(llama4, cal)
    assert plan.declined and max(plan.speedup.values()) <= 1.0
    ids, stats = self_speculative_generate(llama4, prompt, max_new_tokens=20, calibration=cal, return_stats=True)
    assert stats["declined"].startswith("declined: ") and stats["drafted"] == 0
    assert set(stats["acceptance_by_exit"]) == {1, 2, 3}
    assert torch.equal(ids, _generate(llama4, prompt, 20))


def test_auto_speculates_where_predicted_faster(llama4, monkeypatch):
    """Free exit heads and layers ≥ E make any acceptance pay: "auto" must then speculate, exactly."""
    import llmcompress.speculative as spec

    monkeypatch.setattr(spec, "step_costs", lambda model, hardware="auto": {"layer": 0.01, "lm_head": 0.96,
                                                                            "exit_head": 0.0, "num_layers": 4})
    prompt, cal = example_ids(1, 7, seed=3), example_ids(8, 40)
    ids, stats = self_speculative_generate(llama4, prompt, max_new_tokens=20, calibration=cal, return_stats=True)
    assert stats["declined"] is None and stats["drafted"] > 0 and stats["predicted_speedup"] > 1
    assert torch.equal(ids, _generate(llama4, prompt, 20))


def test_step_costs_price_layers_and_head(llama4):
    costs = step_costs(llama4, "cpu")
    assert costs["full"] == pytest.approx(4 * costs["layer"] + costs["lm_head"]) and costs["num_layers"] == 4
    assert costs["exit_head"] > costs["lm_head"] > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"exit_layer": 0}, r"exit_layer: 0 is outside the model; expected an int in \[1, 3\]"),
    ({"exit_layer": 4}, r"exit_layer: 4 is outside"),
    ({"draft_len": 0}, r"draft_len: 0; expected an int ≥ 1"),
    ({"max_new_tokens": 0}, r"max_new_tokens: 0; expected an int ≥ 1"),
    ({"do_sample": True}, r"greedy decoding only"),
    ({"temperature": 0.7}, r"greedy decoding only"),
    ({"num_beams": 2}, r"greedy decoding only"),
    ({"input_ids": example_ids(2, 5)}, r"batch 2; self-speculative decoding supports batch 1"),
    ({"input_ids": example_ids(1, 5).float()}, r"input_ids: expected a non-empty int64 tensor"),
    ({"calibration": example_ids(1, 40)}, r"'auto' needs ≥ 2"),
])
def test_bad_input(llama4, kwargs, match):
    args = {"input_ids": example_ids(1, 5), "max_new_tokens": 4, "calibration": example_ids(4, 20), **kwargs}
    with pytest.raises(OptionError, match=match):
        self_speculative_generate(llama4, args.pop("input_ids"), **args)


def test_unknown_structure_and_sliding_window():
    with pytest.raises(OptionError, match=r"GPT2LMHeadModel has no model.model.embed_tokens, model.model.layers"):
        fit_exit_heads(tiny_model("gpt2"), example_ids(2, 8))
    with pytest.raises(OptionError, match=r"sliding_window attention; supported: full causal"):
        self_speculative_generate(tiny_model("mistral"), example_ids(1, 5), max_new_tokens=3,
                                  calibration=example_ids(2, 8), exit_layer=1, draft_len=1)


@pytest.mark.parametrize("exit_layer,draft_len", [(1, 2), (3, 4)])
def test_hf_generate_hook_token_identical(llama4, exit_layer, draft_len):
    prompt = example_ids(1, 7, seed=3)
    hook = SelfSpeculativeDecoding(example_ids(4, 40), exit_layer=exit_layer, draft_len=draft_len)
    ids = llama4.generate(prompt, max_new_tokens=30, do_sample=False, custom_generate=hook)
    assert torch.equal(ids, _generate(llama4, prompt, 30))
    assert 0 < hook.stats["accepted"] < hook.stats["drafted"] and hook.stats["exit_layer"] == exit_layer


def test_hf_generate_hook_eos_and_auto(llama4):
    prompt = example_ids(1, 7, seed=3)
    full = _generate(llama4, prompt, 30)
    eos = full[0, prompt.shape[1] + 9].item()
    hook = SelfSpeculativeDecoding(example_ids(4, 40), exit_layer=2, draft_len=3)
    ids = llama4.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, custom_generate=hook)
    expected = llama4.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                               eos_token_id=eos)
    assert expected.shape[1] < full.shape[1] and torch.equal(ids, expected)
    auto = SelfSpeculativeDecoding(example_ids(8, 40))  # declined on this model: generate's own loop runs
    assert torch.equal(llama4.generate(prompt, max_new_tokens=20, do_sample=False, custom_generate=auto),
                       _generate(llama4, prompt, 20))
    assert auto.stats["declined"] and auto.stats["drafted"] == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"do_sample": True}, r"greedy decoding only"),
    ({"num_beams": 2}, r"greedy decoding only"),
    ({"repetition_penalty": 1.3}, r"logits processors RepetitionPenaltyLogitsProcessor"),
    ({"min_new_tokens": 5, "eos_token_id": 3}, r"logits processors .*MinNewTokensLengthLogitsProcessor"),
    ({"max_time": 10.0}, r"stopping criteria MaxTimeCriteria"),
    ({"return_dict_in_generate": True}, r"returns the ids only"),
    ({"inputs": example_ids(2, 5)}, r"batch 2; self-speculative decoding supports batch 1"),
    ({"attention_mask": torch.tensor([[0, 1, 1, 1, 1]])}, r"attention_mask: padded positions"),
    ({"hook": {"exit_layer": 4}}, r"exit_layer: 4 is outside the model; expected an int in \[1, 3\]"),
])
def test_hf_generate_hook_bad_input(llama4, kwargs, match):
    kwargs = dict(kwargs)
    hook_args = {"exit_layer": 2, "draft_len": 2, **kwargs.pop("hook", {})}
    args = {"inputs": example_ids(1, 5), "max_new_tokens": 6, **kwargs}
    with pytest.raises(OptionError, match=match):
        llama4.generate(**args, custom_generate=SelfSpeculativeDecoding(example_ids(4, 20), **hook_args))


def test_hf_generate_hook_bad_construction():
    with pytest.raises(OptionError, match=r"draft_len: 0; expected an int ≥ 1"):
        SelfSpeculativeDecoding(example_ids(4, 20), draft_len=0)
    with pytest.raises(OptionError, match=r"calibration: expected a non-empty int64 tensor"):
        SelfSpeculativeDecoding(torch.zeros(2, 3))


def test_exit_report_shape_and_perplexity(llama4):
    heads = fit_exit_heads(llama4, example_ids(4, 40), [1, 3])
    ids = example_ids(2, 30, seed=5)
    report = exit_report(llama4, heads, ids)
    assert set(report["exits"]) == {1, 3}
    # the full model's perplexity, computed here from generate-free logits
    logits = llama4(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert report["full_perplexity"] == pytest.approx(torch.exp(nll).item(), rel=1e-4)
    for row in report["exits"].values():
        for name in ("lens", "fitted"):
            assert 0 <= row[name]["agreement"] <= 1 and row[name]["perplexity"] > 1
    assert exit_agreement(llama4, heads, ids) == {e: {n: r[n]["agreement"] for n in ("lens", "fitted")}
                                                  for e, r in report["exits"].items()}
    with pytest.raises(OptionError, match=r"perplexity needs ≥ 2"):
        exit_report(llama4, heads, example_ids(2, 1))


FIXTURES = fixtures_dir()


@pytest.fixture(scope="module")
def trained():
    if missing(FIXTURES):
        pytest.fail(missing(FIXTURES))
    torch.manual_seed(0)
    tokenizer = load_tokenizer(FIXTURES)
    return (load_model(FIXTURES, "tiny-llama"), corpus_windows(FIXTURES, tokenizer, "train.txt", 24, 512),
            corpus_windows(FIXTURES, tokenizer, "validation.txt", 4, 512))


@pytest.mark.parametrize("exit_layer,draft_len", [(2, 1), (3, 3), (5, 2)])
@pytest.mark.fixtures
def test_token_identical_trained_tiny_llama(trained, exit_layer, draft_len):
    model, train, val = trained
    prompt = val[1:2, :24]
    ids, stats = self_speculative_generate(model, prompt, max_new_tokens=48, calibration=train[:4, :256],
                                           exit_layer=exit_layer, draft_len=draft_len, return_stats=True)
    assert torch.equal(ids, _generate(model, prompt, 48))
    assert 0 < stats["accepted"] < stats["drafted"]


@pytest.mark.fixtures
def test_fitted_beats_logit_lens_on_trained_tiny_llama(trained):
    """24 × 512 training tokens (the issue's setup); 4 validation windows. Issue: lens 0.19/0.41/0.50/0.60/0.71,
    fitted 0.34/0.49/0.56/0.64/0.76; here lens 0.19/0.40/0.48/0.60/0.73, fitted 0.31/0.46/0.53/0.63/0.76."""
    model, train, val = trained
    heads = fit_exit_heads(model, train)
    agreement = exit_agreement(model, heads, val)
    assert set(agreement) == {1, 2, 3, 4, 5}
    for e, a in agreement.items():
        assert a["fitted"] > a["lens"] + 0.01, (e, a)
    # the error to the last layer's state on held-back (validation) tokens, fitted vs identity
    states = layer_states(model, val[:2])
    for e, head in heads.items():
        lens = ExitHead.identity(e, states[e].shape[-1], head.weight)
        err = {name: (h.translate(states[e]).double() - states[-1].double()).pow(2).mean().item()
               for name, h in (("lens", lens), ("fitted", head))}
        assert err["fitted"] < 0.9 * err["lens"], (e, err)


@pytest.mark.fixtures
def test_auto_declines_on_trained_tiny_llama(trained):
    """The issue predicts ≈ 0.9× at exit 3 of 6 on tiny-llama, so "auto" must decline and decode plainly."""
    model, train, val = trained
    prompt = val[2:3, :24]
    ids, stats = self_speculative_generate(model, prompt, max_new_tokens=24, calibration=train[:8, :256],
                                           return_stats=True)
    assert stats["declined"] and stats["drafted"] == 0 and stats["predicted_speedup"] <= 1.0
    assert torch.equal(ids, _generate(model, prompt, 24))


@pytest.mark.fixtures
def test_exit_report_fitted_beats_lens_on_trained_tiny_llama(trained):
    """Perplexity of the exit alone, fitted vs lens, at every exit (the first 4 validation windows, easier than the
    whole split). Measured here: full 10.0; lens 208/37.7/25.6/17.6/13.0, fitted 91.3/28.1/19.4/15.4/11.8."""
    model, train, val = trained
    report = exit_report(model, fit_exit_heads(model, train), val)
    assert 9 < report["full_perplexity"] < 11
    for e, row in report["exits"].items():
        assert row["fitted"]["perplexity"] < row["lens"]["perplexity"], (e, row)
        assert row["fitted"]["agreement"] > row["lens"]["agreement"], (e, row)
        assert row["fitted"]["perplexity"] > report["full_perplexity"], (e, row)


@pytest.mark.fixtures
def test_hf_generate_hook_trained_tiny_llama(trained):
    model, train, val = trained
    prompt = val[3:4, :24]
    hook = SelfSpeculativeDecoding(train[:4, :256], exit_layer=4, draft_len=3)
    ids = model.generate(prompt, max_new_tokens=40, do_sample=False, custom_generate=hook)
    assert torch.equal(ids, _generate(model, prompt, 40)) and hook.stats["accepted"] > 0
