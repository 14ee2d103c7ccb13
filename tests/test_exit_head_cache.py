"""Fitted exit heads as derived weights (`llmcompress.exit_head_cache`): a second call with the same model weights,
calibration, exit layer and ridge loads the translation instead of fitting it (from memory, and from the disk cache
in a fresh model object); another calibration, an edited weight or another ridge fits again."""

from __future__ import annotations

import copy

import pytest
import torch

import llmcompress.exit_head_cache as cache_mod
from llmcompress import self_speculative_generate
from llmcompress.errors import OptionError
from llmcompress.exit_head_cache import FitExitHeads, cached_exit_heads, calibration_digest
from llmcompress.exit_heads import fit_exit_heads
from llmcompress.passes.weights import DERIVED
from llmcompress.testing.models import _COMMON_DECODER, example_ids


def _llama(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(**{**_COMMON_DECODER, "num_hidden_layers": 3})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def fits(monkeypatch):
    """The exit layers each call of `fit_exit_heads` fitted, in order."""
    calls: list[list[int]] = []

    def counting(model, calibration, exit_layers=None, **kw):
        calls.append(list(exit_layers))
        return fit_exit_heads(model, calibration, exit_layers, **kw)

    monkeypatch.setattr(cache_mod, "fit_exit_heads", counting)
    return calls


def _same(a, b):
    assert a.keys() == b.keys()
    for e in a:
        assert torch.equal(a[e].weight, b[e].weight) and torch.equal(a[e].bias, b[e].bias)


def test_second_call_reuses_and_matches_a_plain_fit(fits):
    model, cal = _llama(), example_ids(3, 24)
    first = cached_exit_heads(model, cal, [1, 2])
    _same(first, fit_exit_heads(model, cal, [1, 2]))
    misses = DERIVED.misses
    _same(cached_exit_heads(model, cal, [2, 1]), first)
    assert fits == [[1, 2]] and DERIVED.misses == misses
    cached_exit_heads(model, cal, [1, 2])
    assert fits == [[1, 2]]
    cached_exit_heads(model, cal)  # every exit of 3 layers (1, 2): both cached
    assert fits == [[1, 2]]


def test_other_calibration_weights_or_ridge_fit_again(fits):
    model, cal = _llama(), example_ids(3, 24)
    base = cached_exit_heads(model, cal, [1])
    other = example_ids(3, 24, seed=7)
    assert calibration_digest(other) != calibration_digest(cal)
    cached_exit_heads(model, other, [1])
    assert fits == [[1], [1]]
    cached_exit_heads(model, cal, [1], ridge=0.1)
    assert fits == [[1], [1], [1]]
    model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # an in-place edit of a weight before the exit
    edited = cached_exit_heads(model, cal, [1])
    assert fits == [[1], [1], [1], [1]]
    assert not torch.equal(edited[1].weight, base[1].weight)


def test_disk_cache_serves_a_fresh_model_with_the_same_weights(fits, monkeypatch):
    model, cal = _llama(), example_ids(3, 24)
    first = cached_exit_heads(model, cal, [2])
    twin = copy.deepcopy(model)  # new tensors (no memory hit), same content: loaded from disk
    disk_hits = DERIVED.disk_hits
    _same(cached_exit_heads(twin, cal, [2]), first)
    assert fits == [[2]] and DERIVED.disk_hits == disk_hits + 1
    other = _llama(seed=1)  # other weights: fitted
    cached_exit_heads(other, cal, [2])
    assert fits == [[2], [2]]
    monkeypatch.setenv("LLMCOMPRESS_DISK_CACHE", "0")
    cached_exit_heads(copy.deepcopy(model), cal, [2])
    assert fits == [[2], [2], [2]]


def test_self_speculative_generate_fits_once(fits):
    model, cal, prompt = _llama(), example_ids(3, 24), example_ids(1, 5, seed=2)
    a = self_speculative_generate(model, prompt, max_new_tokens=8, calibration=cal, exit_layer=2, draft_len=2)
    b = self_speculative_generate(model, prompt, max_new_tokens=8, calibration=cal, exit_layer=2, draft_len=2)
    assert torch.equal(a, b) and fits == [[2]]


def test_key_names_the_pass_and_rejects_bad_ridge():
    key = FitExitHeads({"ridge": 0.01}).cache_key("translation", 1, "d", torch.float32)
    assert key.name == "fit-exit-heads" and key != FitExitHeads({"ridge": 0.02}).cache_key("translation", 1, "d",
                                                                                          torch.float32)
    with pytest.raises(OptionError, match=r"ridge: 0; expected a number > 0"):
        cached_exit_heads(_llama(), example_ids(2, 8), [1], ridge=0)
    with pytest.raises(OptionError, match=r"exit_layer: 3 is outside the model"):
        cached_exit_heads(_llama(), example_ids(2, 8), [3])
