"""The `early-exit` pass (recipe `early-exit-cascade`): a random 4-layer Llama with a StaticCache compiled with
backend="llmcompress". The model-level cascade (`llmcompress.cascade`, on the eager HF model) is the oracle: gate
forced closed → the model's logits and greedy tokens; gate forced open → the model-level cascade's logits and every
static-cache slot; a calibrated plan → the same tokens as the model-level cascade with that plan. Graphs it does not
recognise are left alone with the reason; bad options raise. The fixtures test runs tiny-llama through the recipe."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from llmcompress.backend import make_backend
from llmcompress.cascade import cascade, cascade_generate
from llmcompress.errors import OptionError
from llmcompress.exit_gates import CascadePlan, Gate
from llmcompress.exit_heads import ExitHead
from llmcompress.passes.early_exit.early_exit import EarlyExitPass
from llmcompress.passes.early_exit.split import META_KEY
from llmcompress.recipes import load_recipe
from llmcompress.testing.fixtures import fixtures_dir, load_model, load_tokenizer, missing, spread_windows
from llmcompress.testing.models import _COMMON_DECODER, VOCAB, example_ids, tiny_model

HIDDEN = _COMMON_DECODER["hidden_size"]
LAYERS = 4


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or getattr(e, "inner_exception", None) is not None:
        e = e.__cause__ or e.inner_exception
    return e


def _compile(model, options, splits: list | None = None, dynamic: bool | None = None):
    """model.forward compiled (so that generate runs it); `splits` collects each graph's `Branches` (or None)."""
    hook = None if splits is None else (lambda before, after, ctx: splits.append(after.meta.get(META_KEY)))
    model.forward = torch.compile(model.forward, backend="llmcompress" if hook is None else make_backend(on_graph=hook),
                                  options={"lowering": "eager", "strict": True, **options}, dynamic=dynamic)
    return model


def _calibration(n=8, seq=32, seed=3):
    return {"calibration": torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed)),
            "calibration_samples": n, "calibration_seq_len": seq}


def _static(model, max_len=16):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def _steps(model, prompt, tokens, cache):
    """Prefill then one decode step per token column → (logits of each decode step, the cache)."""
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        return [model(tokens[:, t: t + 1], cache=cache, use_cache=True).logits for t in range(tokens.shape[1])], cache


def _assert_caches_equal(got, want, atol=1e-5):
    for i, (g, w) in enumerate(zip(got.layers, want.layers)):
        torch.testing.assert_close(g.keys, w.keys, rtol=1e-5, atol=atol, msg=lambda m, i=i: f"layer {i} keys: {m}")
        torch.testing.assert_close(g.values, w.values, rtol=1e-5, atol=atol, msg=lambda m, i=i: f"layer {i} values: {m}")
        assert int(g.cumulative_length) == int(w.cumulative_length), i


def _open_plan(heads: dict[int, ExitHead], fill_maps: dict | None = None) -> CascadePlan:
    """Every decode step exits at the head's layer (sigmoid ≥ −inf)."""
    f = HIDDEN + 3
    gates = {e: Gate(e, torch.zeros(f), 0.0, torch.zeros(f), torch.ones(f), False, -math.inf) for e in heads}
    return CascadePlan(heads, gates, 0.99, "hidden", {}, {}, {}, None, fill_maps or {})


def _decisions(report_path) -> list[list[dict]]:
    data = json.loads(report_path.read_text())
    return [next(p for p in g["passes"] if p["name"] == "early-exit")["decisions"] for g in data["graphs"]]


def test_closed_gate_is_the_model():
    eager, model = tiny_model("llama", layers=LAYERS), tiny_model("llama", layers=LAYERS)
    splits: list = []
    _compile(model, {"passes": {"canonicalize": {}, "early-exit": {"gate": "closed", "exit_layers": [2],
                                                                    "head": "lens"}}}, splits)
    prompt, tokens = example_ids(2, 6, seed=5), example_ids(2, 4, seed=6)
    want, want_cache = _steps(eager, prompt, tokens, _static(eager))
    got, got_cache = _steps(model, prompt, tokens, _static(model))
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-5, atol=1e-5)
    _assert_caches_equal(got_cache, want_cache)
    branches = [b for b in splits if b is not None]
    assert len(branches) == 1 and branches[0].exits == [2]
    assert branches[0].counts == {0: 4}  # every decode step went through the rest of the layers
    with torch.no_grad():
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             cache_implementation="static")
        ref = eager.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             cache_implementation="static")
    assert torch.equal(ids, ref)


@pytest.mark.parametrize("exit_layer, head, lowering", [(1, "lens", "eager"), (3, "lens", "eager"),
                                                        (2, "fitted", "eager"), (2, "fitted", "inductor"),
                                                        (2, "lens", "triton"), (2, "distilled", "triton")])
def test_open_gate_is_the_model_level_cascade(exit_layer, head, lowering):
    """Every decode step exits at E: the logits and every layer's static-cache slot equal the model-level cascade's
    with the same plan (a skipped layer whose K/V slot is not filled, or filled from the wrong state, fails)."""
    eager, model = tiny_model("llama", layers=LAYERS), tiny_model("llama", layers=LAYERS)
    splits: list = []
    _compile(model, {"lowering": lowering, **(_calibration() if head != "lens" else {}),
                     "passes": {"canonicalize": {}, "early-exit": {
                         "gate": "open", "exit_layers": [exit_layer], "head": head,
                         **({"distill_steps": 20} if head == "distilled" else {})}}}, splits)
    prompt, tokens = example_ids(2, 6, seed=5), example_ids(2, 4, seed=6)
    got, got_cache = _steps(model, prompt, tokens, _static(model))
    (branches,) = [b for b in splits if b is not None]
    assert branches.counts == {exit_layer: 4}
    heads = ({exit_layer: ExitHead.identity(exit_layer, HIDDEN, eager.lm_head.weight)} if head == "lens"
             else branches.plan.heads)
    fill_maps = {} if head == "lens" else branches.plan.fill_maps
    if head != "lens":  # fitted head and fill maps (skipped layers 3 … L-1 fed the map of the exit state)
        assert not torch.allclose(heads[exit_layer].weight, torch.eye(HIDDEN))
        assert sorted(fill_maps) == [(exit_layer, i) for i in range(exit_layer + 1, LAYERS)]
    stats: dict = {}
    with cascade(eager, _open_plan(heads, fill_maps), stats=stats):
        want, want_cache = _steps(eager, prompt, tokens, _static(eager))
    assert stats["layers_skipped"] == 2 * 4 * (LAYERS - exit_layer)
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-4, atol=1e-4)
    _assert_caches_equal(got_cache, want_cache, atol=1e-4)
    # the skipped layers' slots of the decode tokens hold what the fill wrote, not the cache's zeros
    assert all(bool(want_cache.layers[i].keys[:, :, 6:10].abs().amax(-1).gt(0).all()) for i in range(LAYERS))


@pytest.mark.parametrize("dynamic", [None, True])
def test_calibrated_plan_runs_like_the_model_level_cascade(tmp_path, dynamic):
    """generate's prefill calibrates the plan (a derived result); its decode graph takes it and chooses per step:
    the tokens equal the model-level cascade's with the same plan. With dynamic shapes the prefill graph takes the
    cache length and the norms' eps as inputs: calibration binds them (other calibration data, so the plan is not
    the static run's cached one)."""
    eager, model = tiny_model("llama", layers=LAYERS), tiny_model("llama", layers=LAYERS)
    splits: list = []
    report = tmp_path / "r.json"
    _compile(model, {**_calibration(seed=3 if dynamic is None else 4), "report": str(report),
                     "passes": {"canonicalize": {}, "early-exit": {"min_agreement": 0.5}}}, splits, dynamic)
    prompt = example_ids(2, 5, seed=7)
    with torch.no_grad():
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                             cache_implementation="static")
    (branches,) = [b for b in splits if b is not None]
    assert branches.plan.declined is None and branches.exits == branches.plan.exits
    assert sum(branches.counts.values()) == 9 and set(branches.counts) - {0}  # some steps exited
    want, stats = cascade_generate(eager, prompt, plan=branches.plan, return_stats=True, max_new_tokens=10,
                                   do_sample=False, cache_implementation="static")
    assert torch.equal(ids, want)
    exited = {e: c * 2 for e, c in branches.counts.items() if e}  # batch 2: every row exits with the batch
    assert stats["exits"] == exited
    prefill, decode = _decisions(report)[:2]
    assert "the plan is cached for the decode graph" in prefill[-1]["reason"]
    plan = next(d for d in decode if d["early-exit"] == "plan")
    assert plan["exit agreement (held-back, lens vs fitted)"].keys() == {"1", "2", "3"}
    assert decode[-1]["early-exit"] == "split"


def test_declined_plan_leaves_the_graph_with_the_reason(tmp_path):
    model = tiny_model("llama", layers=LAYERS)
    report = tmp_path / "r.json"
    _compile(model, {**_calibration(), "report": str(report),
                     "passes": {"canonicalize": {}, "early-exit": {"min_agreement": 1.0}}})
    prompt = example_ids(2, 5, seed=7)
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                       cache_implementation="static")
    decode = _decisions(report)[1]
    assert decode[-1]["early-exit"] == "left as is" and decode[-1]["reason"].startswith("declined: no exit")


def test_recipe_loads_and_reports_its_decision(tmp_path):
    recipe = load_recipe("early-exit-cascade")
    assert [(s.name, s.options) for s in recipe.passes] == [("canonicalize", {}),
                                                            ("early-exit", {"min_agreement": 0.99,
                                                                            "max_perplexity_increase": 0.02})]
    model, eager = tiny_model("llama", layers=LAYERS), tiny_model("llama", layers=LAYERS)
    report = tmp_path / "r.json"
    _compile(model, {**_calibration(), "recipe": "early-exit-cascade", "report": str(report)})
    prompt = example_ids(1, 5, seed=7)
    with torch.no_grad():
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             cache_implementation="static")
        ref = eager.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             cache_implementation="static")
    decode = _decisions(report)[1]
    last = decode[-1]
    assert last["early-exit"] == "split" or last["reason"].startswith("declined")
    if last["early-exit"] != "split":
        assert torch.equal(ids, ref)


def test_unrecognised_graphs_are_left_alone_with_the_reason(tmp_path):
    from transformers import DynamicCache

    report = tmp_path / "r.json"
    options = {"report": str(report), "passes": {"canonicalize": {}, "early-exit": {"gate": "open",
                                                                                    "exit_layers": [1],
                                                                                    "head": "lens"}}}
    llama = _compile(tiny_model("llama", layers=LAYERS), options)
    cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(example_ids(1, 4), cache=cache, use_cache=True)
        out = llama(example_ids(1, 1), cache=cache, use_cache=True).logits
    reasons = [d[-1]["reason"] for d in _decisions(report)]
    assert any("static cache" in r or "returns" in r for r in reasons), reasons
    assert torch.isfinite(out).all()
    torch._dynamo.reset()
    report2 = tmp_path / "r2.json"
    gpt2 = tiny_model("gpt2")
    gpt2.forward = torch.compile(gpt2.forward, backend="llmcompress", options={**options, "report": str(report2),
                                                                              "lowering": "eager"})
    with torch.no_grad():
        gpt2(example_ids(1, 4))
    (decisions,) = _decisions(report2)
    # GPT-2's final norm is ln_f (a LayerNorm), its layers h.<i>: not the Llama structure the pass knows
    assert decisions[-1]["early-exit"] == "left as is"
    assert re.search("final norm|decoder layers", decisions[-1]["reason"]), decisions[-1]


@pytest.mark.parametrize("options, match", [
    ({"min_agreement": 0}, r"min_agreement: 0 is outside \(0, 1\]"),
    ({"min_agreement": 1.5}, r"outside \(0, 1\]"),
    ({"exit_layers": [0]}, r"exit_layers \[0\]"),
    ({"exit_layers": []}, r"exit_layers \[\]"),
    ({"gate": "open"}, r"give exit_layers: \[E\]"),
    ({"gate": "calibrated", "head": "lens"}, r"head 'lens' is for forced gates"),
    ({"hidden_units": -1}, r"hidden_units -1"),
    ({"distill_steps": 0}, r"distill_steps 0; expected ≥ 1"),
    ({"head": "tuned"}, r"key 'head' got 'tuned'"),
    ({"gate": "sometimes"}, r"key 'gate' got 'sometimes'"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(OptionError, match=match):
        EarlyExitPass(options)


def test_exit_outside_the_model_raises():
    model = _compile(tiny_model("llama", layers=LAYERS), {"passes": {"canonicalize": {}, "early-exit": {"gate": "open", "exit_layers": [4],
                                                                                "head": "lens"}}})
    with pytest.raises(Exception) as info:
        _steps(model, example_ids(1, 4), example_ids(1, 1), _static(model))
    cause = _root_cause(info.value)
    assert isinstance(cause, OptionError) and re.search(r"exit_layer: 4 is outside the model.*\[1, 3\]", str(cause))


def test_calibration_needs_data():
    model = _compile(tiny_model("llama", layers=LAYERS), {"passes": {"canonicalize": {}, "early-exit": {}}})
    with pytest.raises(Exception) as info:
        _steps(model, example_ids(1, 4), example_ids(1, 1), _static(model))
    assert isinstance(_root_cause(info.value), OptionError) and "calibration" in str(_root_cause(info.value))


@pytest.mark.fixtures
def test_tiny_llama_through_the_recipe(tmp_path):
    """tiny-llama: the recipe calibrates on train.txt, keeps exits the cost model says pay (or declines with the
    reason), and greedy decoding on a validation prompt equals the model-level cascade with the same plan."""
    if reason := missing(fixtures_dir()):
        pytest.skip(reason)
    f = fixtures_dir()
    tokenizer = load_tokenizer(f)
    eager, model = load_model(f, "tiny-llama"), load_model(f, "tiny-llama")
    calibration = spread_windows(f, tokenizer, "train.txt", 16, length=128)
    prompt = spread_windows(f, tokenizer, "validation.txt", 1, length=16)
    splits: list = []
    report = tmp_path / "r.json"
    _compile(model, {"recipe": "early-exit-cascade", "calibration": calibration, "calibration_samples": 16,
                     "calibration_seq_len": 128, "report": str(report)}, splits)
    with torch.no_grad():
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                             cache_implementation="static")
    decode = _decisions(report)[1]
    plan = next(d for d in decode if d["early-exit"] == "plan")
    agreement = plan["exit agreement (held-back, lens vs fitted)"]
    assert all(a["fitted"] > a["lens"] for a in agreement.values()), agreement
    branches = [b for b in splits if b is not None]
    if not branches:
        assert decode[-1]["reason"].startswith("declined"), decode[-1]
        return
    (branches,) = branches
    assert plan["held_back"]["agreement"] >= 0.99
    want = cascade_generate(eager, prompt, plan=branches.plan, max_new_tokens=24, do_sample=False,
                            cache_implementation="static")
    assert torch.equal(ids, want)
