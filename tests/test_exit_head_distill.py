"""`exit_heads.distill_heads`: refined from the least-squares fit, the exit heads' KL to the full model on the tokens
they were refined on is lower (a float64 KL computed here, not the function's own loss); the model's norm and LM head
are left as they were; bad head kinds raise. On held-back text of the trained fixture: tests/fixtures/
test_exit_head_distill_fixture.py; the compiled form with distilled heads: tests/passes/early_exit."""

from __future__ import annotations

import pytest
import torch

from llmcompress.errors import OptionError
from llmcompress.exit_gates import calibrate_cascade
from llmcompress.exit_heads import decoder_parts, distill_heads, fit_heads_from_states, layer_states
from llmcompress.testing.models import example_ids, tiny_model

EXITS = (1, 2, 3)


def _kl64(parts, head, states) -> float:
    """Mean KL(full ‖ exit) in float64 over the tokens of `states`."""
    with torch.no_grad():
        full = torch.log_softmax(parts.lm_head(parts.norm(states[-1])).double(), -1)
        exit_ = torch.log_softmax(head.logits(parts, states[head.layer]).double(), -1)
    return float((full.exp() * (full - exit_)).sum(-1).mean())


def test_distilled_heads_lower_the_kl():
    """A random tiny model's exits already nearly match it (KL ~ 1e-3) and 512 tokens overfit the 64 × 64 map, so
    this checks the tokens it was refined on; held-back text needs the trained fixture."""
    model = tiny_model("llama", layers=4)
    parts = decoder_parts(model)
    fit = layer_states(model, example_ids(16, 32, seed=1))
    fitted = fit_heads_from_states(fit, EXITS)
    distilled = distill_heads(parts, fit, fitted, steps=300, lr=3e-3, batch=256)
    for e in EXITS:
        before, after = _kl64(parts, fitted[e], fit), _kl64(parts, distilled[e], fit)
        assert after < 0.99 * before, (e, before, after)
        assert distilled[e].weight.dtype == fitted[e].weight.dtype and distilled[e].layer == e


def test_distill_leaves_the_norm_and_head_alone():
    model = tiny_model("llama", layers=4).requires_grad_(True)
    parts = decoder_parts(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = layer_states(model, example_ids(4, 16, seed=3))
    distill_heads(parts, states, fit_heads_from_states(states, [2]), steps=5, lr=1e-2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad, n


def test_bad_head_kind_raises():
    model = tiny_model("llama", layers=4)
    with pytest.raises(OptionError, match="head: 'tuned'; expected one of fitted, distilled"):
        calibrate_cascade(model, example_ids(4, 16, seed=3), min_agreement=0.9, head="tuned")
