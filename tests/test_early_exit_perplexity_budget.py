"""The cascade's perplexity side (`llmcompress.exit_gates`, `llmcompress.cascade`, the `early-exit` pass): the KL an
exit adds against a float64 oracle; the fitted exit temperature recovers a known over- or under-confidence; the
thresholds hold a perplexity budget as they hold the error budget (and the budget binds); an exited token's logits are
its exit head's divided by the temperature, in the model-level cascade (against the exit head run on the full
model's states) and in the compiled pass (against the model-level cascade)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llmcompress.cascade import cascade, recalibrate
from llmcompress.errors import OptionError
from llmcompress.exit_gates import (
    TEMPERATURES,
    CascadeCosts,
    CascadePlan,
    Gate,
    GateScores,
    allowed_nll,
    check_max_perplexity_increase,
    fit_temperature,
    fit_thresholds,
    kl_to_full,
    nll_contributions,
    simulate_cascade,
)
from llmcompress.exit_heads import DecoderParts, decoder_parts, fit_exit_heads, layer_states
from llmcompress.testing.models import _COMMON_DECODER, example_ids, tiny_model

HIDDEN = _COMMON_DECODER["hidden_size"]


def test_kl_to_full_matches_float64():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(5, 7, 33, generator=g) * 3, torch.randn(5, 7, 33, generator=g) * 3
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    want = (p * (p.log() - q.log())).sum(-1)
    got = kl_to_full(torch.log_softmax(p_logits, -1), q_logits)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert bool((want > 0.1).all())


@pytest.mark.parametrize("scale", [2.0, 1 / 1.5])
def test_fit_temperature_recovers_a_known_confidence_error(scale):
    """Exit logits = full logits × scale: the KL is least at T = scale (the grid point nearest it)."""
    g = torch.Generator().manual_seed(1)
    hidden, vocab, n = 16, 64, 3000
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    parts = DecoderParts(None, [None, None], torch.nn.Identity(), head, None)
    last = torch.randn(n, hidden, generator=g) * 0.5
    with torch.no_grad():
        exit_logits = head(last) * scale
    t = fit_temperature(parts, exit_logits, last, torch.ones(n, dtype=torch.bool))
    nearest = min(TEMPERATURES, key=lambda x: abs(math.log(x / scale)))
    assert t == pytest.approx(nearest)
    # only the agreeing tokens count: with none, no temperature
    assert fit_temperature(parts, exit_logits, last, torch.zeros(n, dtype=torch.bool)) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_fit_temperature_is_the_grid_point_of_least_kl(seed):
    """Against every temperature of the grid tried in float64: exit logits that are a noisy, scaled copy of the full
    model's, so the best T falls anywhere on the grid, not only at a known scale (here at grid points 0, 3, 9, 14,
    23 and 30: both ends)."""
    g = torch.Generator().manual_seed(10 + seed)
    hidden, vocab, n = 16, 64, 500
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    parts = DecoderParts(None, [None, None], torch.nn.Identity(), head, None)
    last = torch.randn(n, hidden, generator=g) * (0.3 + 0.2 * seed)
    agree = torch.rand(n, generator=g) < 0.8
    scale = [0.3, 0.6, 0.9, 1.3, 2.5, 6.0][seed]
    with torch.no_grad():
        full = head(last).double()
        noise = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 0.3 * min(scale, 1.0) ** 2
        exit_logits = (full * scale + noise).float()
    p = torch.softmax(full[agree], -1)
    kl = {t: (p * (p.log() - torch.log_softmax(exit_logits[agree].double() / t, -1))).sum(-1).mean().item()
          for t in TEMPERATURES}
    got = fit_temperature(parts, exit_logits, last, agree)
    best = min(kl.values())
    assert kl[got] <= best + 1e-6 * abs(best), (got, min(kl, key=kl.get))
    assert TEMPERATURES.index(got) == [0, 3, 9, 14, 23, 30][seed]  # the cases cover the grid, its ends included


def _scores(n: int = 2000) -> GateScores:
    """Every exit agrees (the error budget never binds); an exit's KL falls with its score: exit 1 costs more."""
    g = torch.Generator().manual_seed(2)
    score = torch.rand(n, generator=g, dtype=torch.float64)
    agree = torch.ones(n, dtype=torch.bool)
    return GateScores({1: score, 3: score}, {1: agree, 3: agree},
                      kl={1: 0.5 * (1 - score), 3: 0.1 * (1 - score)})


def _excess(s: GateScores, thresholds: dict[int, float]) -> float:
    """The oracle: the KL of each token at the first exit whose gate opens, summed in float64."""
    left = torch.ones_like(s.score[1], dtype=torch.bool)
    total = 0.0
    for e in (1, 3):
        go = left & (s.score[e] >= thresholds[e])
        total += s.kl[e][go].double().sum().item()
        left &= ~go
    return total


def test_thresholds_hold_the_perplexity_budget():
    costs = CascadeCosts(layer=1.0, head=0.0, translation=0.0, fill=0.0, gate_hidden=0.0, gate_logits=0.0,
                         num_layers=4)
    s = _scores()
    free, _ = fit_thresholds([1, 3], s, costs, True, allowed=math.inf)
    unbounded = _excess(s, free)
    budget = 0.1 * unbounded
    bound, time = fit_thresholds([1, 3], s, costs, True, allowed=math.inf, allowed_kl=budget)
    assert _excess(s, bound) <= budget < unbounded  # the budget binds and holds
    # with its 90 % margin: the sum plus 1.28 standard deviations of a sum of n per-token contributions
    _, _, exit_at = simulate_cascade([1, 3], bound, s, costs, True)
    per_token = torch.where(exit_at == 1, s.kl[1], torch.where(exit_at == 3, s.kl[3], 0.0))
    assert _excess(s, bound) + 1.28 * per_token.std(correction=0).item() * math.sqrt(len(per_token)) <= budget
    assert nll_contributions(s, exit_at, 4).sum().item() == pytest.approx(_excess(s, bound), rel=1e-9)
    assert bool((exit_at > 0).any()) and time < costs.full  # and it still skips
    # drift: every approximate fill (layers after the first skipped one) is charged
    drifted = dataclasses.replace(s, drift_kl_per_fill=0.01)
    fills = torch.where(exit_at > 0, 4 - exit_at - 1, 0).sum().item()
    assert nll_contributions(drifted, exit_at, 4).sum().item() == pytest.approx(_excess(s, bound) + 0.01 * fills, rel=1e-9)
    # budget_z = 0 (thresholds judged on the very tokens they are set on): the plain sum, so more skip, still within
    plain, plain_time = fit_thresholds([1, 3], s, costs, True, allowed=math.inf, allowed_kl=budget, budget_z=0.0)
    assert _excess(s, bound) < _excess(s, plain) <= budget
    assert plain_time < time


def test_allowed_nll_is_the_log_of_the_perplexity_ratio():
    assert allowed_nll(1000, 0.02) == pytest.approx(1000 * math.log(1.02))
    assert allowed_nll(1000, None) == math.inf


@pytest.mark.parametrize("value", [0, -0.1, True, "0.02", math.nan])
def test_bad_perplexity_budget_raises(value):
    with pytest.raises(OptionError, match="max_perplexity_increase"):
        check_max_perplexity_increase(value)


def _open_plan(heads, temperatures) -> CascadePlan:
    f = HIDDEN + 3
    gates = {e: Gate(e, torch.zeros(f), 0.0, torch.zeros(f), torch.ones(f), False, -math.inf) for e in heads}
    return CascadePlan(heads, gates, 0.99, "hidden", {}, {}, {}, None, temperatures=temperatures)


def test_cascade_returns_the_tempered_exit_logits():
    """First decode step after a full prefill, gate open at exit 2 (T = 1.7): the logits are the exit head's on the
    full model's layer-2 state of that token, divided by 1.7 (layers ≤ 2 and the prefill's cache are exact)."""
    from transformers import DynamicCache

    model = tiny_model("llama", layers=4)
    parts = decoder_parts(model)
    heads = fit_exit_heads(model, example_ids(4, 40), [2])
    prompt, token = example_ids(2, 6, seed=5), example_ids(2, 1, seed=6)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        with cascade(model, _open_plan(heads, {2: 1.7})):
            got = model(token, cache=cache, use_cache=True).logits[:, -1]
        state = layer_states(model, torch.cat([prompt, token], 1))[2][:, -1]
        want = heads[2].logits(parts, state) / 1.7
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, want * 1.7, rtol=1e-2, atol=1e-2)


def _running_nll(model, plan, held) -> float:
    """Σ KL(full ‖ the cascade's own logits) over held (n, seq), token by token through a DynamicCache."""
    from transformers import DynamicCache

    with torch.no_grad():
        full = torch.log_softmax(model(held).logits[:, :-1].float(), -1)
        cache, total = DynamicCache(config=model.config), 0.0
        with cascade(model, plan, rows="each"):
            for t in range(held.shape[1] - 1):
                logits = model(held[:, t: t + 1], cache=cache, use_cache=True).logits[:, -1].float()
                total += kl_to_full(full[:, t], logits).double().sum().item()
    return total


def test_recalibrate_holds_the_perplexity_budget_on_the_running_cascade():
    """Re-set on a random model's running cascade: with a third of the perplexity increase the agreement-only thresholds
    give as its budget, the KL its own logits add over the held-back rows (recomputed here token by token against
    the full model) is within the budget, and exits still open."""
    model = tiny_model("llama", layers=4)
    heads = fit_exit_heads(model, example_ids(4, 40), [1, 2, 3])
    held = example_ids(3, 24, seed=9)
    g = torch.Generator().manual_seed(4)
    gates = {e: Gate(e, torch.randn(HIDDEN + 3, generator=g), 0.0, torch.zeros(HIDDEN + 3),
                     torch.ones(HIDDEN + 3), False, 0.5) for e in heads}
    plan = CascadePlan(heads, gates, 0.5, "hidden", {}, {}, {}, None, temperatures={1: 1.3, 2: 1.0, 3: 0.8})
    n = held.shape[0] * (held.shape[1] - 1)
    free = recalibrate(model, plan, held, rounds=2)
    unbounded = math.expm1(_running_nll(model, free, held) / n)
    budget = unbounded / 3
    out = recalibrate(model, dataclasses.replace(plan, max_perplexity_increase=budget), held, rounds=3)
    assert out.declined is None, out.declined
    total = _running_nll(model, out, held)
    assert total <= n * math.log1p(budget) + 1e-6 and out.held_back["cascade"]["skip_fraction"] > 0
    assert out.held_back["cascade"]["perplexity_increase"] == pytest.approx(math.expm1(total / n), rel=1e-4)


def test_compiled_cascade_returns_the_tempered_exit_logits():
    """The pass's calibrated plan (exit temperatures ≠ 1): each decode step's logits equal the model-level cascade's
    with the same plan, the exited steps included (a skip piece without the division fails)."""
    from transformers import StaticCache

    from llmcompress.backend import make_backend
    from llmcompress.passes.early_exit.split import META_KEY
    from llmcompress.testing.models import VOCAB

    eager, model = tiny_model("llama", layers=4), tiny_model("llama", layers=4)
    splits: list = []
    hook = lambda before, after, ctx: splits.append(after.meta.get(META_KEY))
    calibration = torch.randint(2, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))
    model.forward = torch.compile(model.forward, backend=make_backend(on_graph=hook), options={
        "lowering": "eager", "strict": True, "calibration": calibration, "calibration_samples": 8,
        "calibration_seq_len": 32, "passes": {"canonicalize": {}, "early-exit": {"min_agreement": 0.5}}})
    prompt, tokens = example_ids(2, 6, seed=5), example_ids(2, 6, seed=6)

    def steps(m):
        cache = StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            m(prompt, cache=cache, use_cache=True)
            return torch.cat([m(tokens[:, t: t + 1], cache=cache, use_cache=True).logits for t in range(6)])

    got = steps(model)
    (branches,) = [b for b in splits if b is not None]
    plan = branches.plan
    assert any(plan.temperatures[e] != 1.0 for e in plan.exits), plan.temperatures
    assert set(branches.counts) - {0}  # some steps exited
    stats: dict = {}
    with cascade(eager, plan, stats=stats):
        want = steps(eager)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
