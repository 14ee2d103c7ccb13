"""Dynamic expert skipping: the rule on hand-built routings, the skip curve and the budget's β per layer, and the
interim `moe-skip` rewrite on a random Mixtral (the compiled model equals eager with the rule applied to its routers'
weights; it skips on the calibration data the fraction it reports)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llmcompress.errors import OptionError
from llmcompress.passes.moe.skip import SkipCurve, apply_skip, calibrate_betas, skip_curve, skip_slots
from llmcompress.testing.models import VOCAB, example_ids, tiny_model

WEIGHTS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.7, 0.2]], dtype=torch.float64)


def test_rule_on_a_hand_built_routing():
    # β = 0.3: 0.1 < 0.27 and 0.2 < 0.21 are skipped; 0.4 ≥ 0.18 and 0.5 ≥ 0.15 are not; the top slot never is.
    assert skip_slots(WEIGHTS, 0.3).tolist() == [[False, True], [False, False], [False, False], [False, True]]
    assert apply_skip(WEIGHTS, 0.3).tolist() == [[0.9, 0.0], [0.6, 0.4], [0.5, 0.5], [0.7, 0.0]]
    renorm = apply_skip(WEIGHTS, 0.3, renormalize=True)
    torch.testing.assert_close(renorm, torch.tensor([[1.0, 0], [0.6, 0.4], [0.5, 0.5], [0.9, 0]], dtype=torch.float64))
    assert not skip_slots(WEIGHTS, 0.0).any()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        skip_slots(WEIGHTS, 1.0)


def test_skip_curve_on_orthogonal_outputs():
    """Expert outputs along orthogonal unit vectors: the error of skipping is the skipped weights' squared sum over
    the dense output's squared norm, worked out by hand."""
    chosen = torch.zeros(4, 2, 8, dtype=torch.float64)
    for t in range(4):
        chosen[t, 0, 2 * t] = 1.0
        chosen[t, 1, 2 * t + 1] = 1.0
    curve = skip_curve(WEIGHTS, chosen, betas=(0.0, 0.3, 0.9))
    energy = float((WEIGHTS**2).sum())
    assert curve.skipped == [0.0, 2 / 8, 3 / 8]  # β 0.9 also skips 0.6 × 0.9 > 0.4
    assert curve.error[0] == 0.0
    assert abs(curve.error[1] - (0.1**2 + 0.2**2) / energy) < 1e-6  # float32 arithmetic
    assert abs(curve.error[2] - (0.1**2 + 0.2**2 + 0.4**2) / energy) < 1e-6  # float32 arithmetic


def test_calibrate_betas_spends_the_budget_where_skipping_is_cheap():
    betas = (0.0, 0.1, 0.2)
    cheap = SkipCurve(betas, [0.0, 0.2, 0.4], [0.0, 0.001, 0.002])
    dear = SkipCurve(betas, [0.0, 0.2, 0.4], [0.0, 0.05, 0.5])
    assert calibrate_betas([cheap, dear], budget=0.001) == [0.2, 0.0]  # mean error 0.001
    assert calibrate_betas([cheap, dear], budget=0.03) == [0.2, 0.1]  # mean error 0.026
    assert calibrate_betas([cheap, dear], budget=1.0) == [0.2, 0.2]
    assert calibrate_betas([cheap, dear], budget=0.0) == [0.0, 0.0]


def _calibration(seq=11):
    return torch.randint(2, VOCAB, (4, seq), generator=torch.Generator().manual_seed(3))


def _model():
    """The random Mixtral with routers 30× their initial scale: freshly initialised routers give every token
    about equal top-2 weights, which no β below 1 would skip."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(30)
    return model


def _compile(skip, report, cal=True):
    options = {"lowering": "eager", "strict": True, "report": str(report),
               "passes": {"canonicalize": {}, "moe-skip": skip}}
    if cal:
        c = _calibration()
        options.update(calibration=c, calibration_samples=c.shape[0], calibration_seq_len=c.shape[1])
    return torch.compile(_model(), backend="llmcompress", options=options)


def _decisions(path):
    graphs = json.loads(path.read_text())["graphs"]
    record = next(p for g in graphs for p in g["passes"] if p["name"] == "moe-skip")
    return record["decisions"], record["stats"]


def _with_rule(model, betas, counts=None):
    """Hooks applying the rule to each router's top-k weights (optionally counting skipped / all slots)."""
    handles = []
    for layer, beta in zip(model.model.layers, betas):
        def hook(_m, _i, out, beta=beta):
            if counts is not None:
                mask = skip_slots(out[1], beta)
                counts[0] += int(mask.sum())
                counts[1] += mask.numel()
            return out[0], apply_skip(out[1], beta), out[2]
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("skip", [{"beta": 0.5}, {"budget": 0.05}])
def test_compiled_skip_equals_eager_with_the_rule_and_skips_what_it_reports(skip, tmp_path):
    ids = example_ids()
    with torch.no_grad():
        out = _compile(skip, tmp_path / "r.json")(ids).logits
    decisions, stats = _decisions(tmp_path / "r.json")
    betas = [d["beta"] for d in decisions]
    assert len(betas) == 2 and any(b > 0 for b in betas)
    model = _model()
    with torch.no_grad():
        dense = model(ids).logits
        counts = [0, 0]
        handles = _with_rule(model, betas, counts)
        expected = model(ids).logits
        counts[:] = [0, 0]
        model(_calibration())  # the calibration data: the fraction the pass reports
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-4  # something was skipped
    assert counts[0] > 0
    assert abs(stats["expert evaluations skipped"] - counts[0] / counts[1]) < 1e-5


@pytest.mark.parametrize("skip, cal, match", [
    ({"beta": 1.0}, True, r"beta must be in \[0, 1\)"),
    ({"beta": -0.1}, True, r"beta must be in \[0, 1\)"),
    ({"budget": -1.0}, True, r"budget must be ≥ 0"),
    ({}, False, r"calibrating β needs calibration data"),
])
def test_bad_options_raise(skip, cal, match, tmp_path):
    compiled = _compile(skip, tmp_path / "r.json", cal=cal)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(example_ids())
    e = info.value
    while e.__cause__ is not None or getattr(e, "inner_exception", None) is not None:
        e = e.__cause__ or e.inner_exception
    assert isinstance(e, OptionError) and re.search(match, str(e)), repr(e)
