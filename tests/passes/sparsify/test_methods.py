"""The pruning algorithms of `passes/sparsify/`: masks (N:M and unstructured), magnitude, Wanda, SparseGPT (prune
only and jointly with int4), their ordering on a layer's output error, and their bad input."""

from __future__ import annotations

import pytest
import torch

from llmcompress.calibration.hessian import HessianAccumulator
from llmcompress.errors import OptionError
from llmcompress.passes.sparsify.magnitude import magnitude_mask
from llmcompress.passes.sparsify.masks import nm_mask, parse_pattern, unstructured_mask
from llmcompress.passes.sparsify.sparsegpt import sparsegpt_prune
from llmcompress.passes.sparsify.wanda import wanda_mask
from llmcompress.testing.fixtures import fixtures_dir, load_model, missing


def _layer(n=37, k=96, rows=600, seed=0):
    """A weight and activations with unequal, correlated channels (outliers, as LLM activations have), so the three
    methods' choices differ: Wanda sees the channel norms, SparseGPT also the correlations."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g) * (0.2 + 3 * torch.rand(k, generator=g))
    x[:, :12] += torch.randn(rows, 1, generator=g) * 2.0
    return w, x


def _rel_err(x, w, pruned):
    y = x.double() @ w.double().T
    return float((x.double() @ pruned.double().T - y).norm() / y.norm())


def _three(w, x, pattern):
    acc = HessianAccumulator(w.shape[1])
    acc.add(x)
    sgpt = sparsegpt_prune(w, acc.hessian, pattern).weight
    wanda = w * wanda_mask(w, x.square().sum(0), pattern, 0.5)
    mag = w * magnitude_mask(w, pattern, 0.5)
    return [_rel_err(x, w, p) for p in (sgpt, wanda, mag)]


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nm_masks_keep_exactly_n_of_every_m(pattern, dtype):
    p = parse_pattern(pattern, "test")
    w, x = _layer(n=37, k=96)  # 37 rows: not a multiple of any block
    w = w.to(dtype)
    acc = HessianAccumulator(96)
    acc.add(x)
    for name, pruned in (("magnitude", w * magnitude_mask(w, p, 0.5)),
                         ("wanda", w * wanda_mask(w, x.square().sum(0), p, 0.5)),
                         ("sparsegpt", sparsegpt_prune(w, acc.hessian, p, block_size=24).weight)):
        nonzero = (pruned != 0).reshape(37, 96 // p.m, p.m).sum(-1)
        assert (nonzero == p.n).all(), f"{name}: {nonzero.unique().tolist()} non-zeros per group of {p.m}"


def test_nm_mask_keeps_the_highest_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.9, 0.7]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]


def test_unstructured_masks_prune_the_asked_fraction():
    w, x = _layer(n=40, k=100)
    for sparsity in (0.3, 0.5, 0.7):
        per_row = unstructured_mask(w.abs(), sparsity, per_row=True)
        assert ((~per_row).sum(1) == round(sparsity * 100)).all()  # Wanda's comparison group: each row
        whole = magnitude_mask(w, parse_pattern("unstructured", "t"), sparsity)
        assert int((~whole).sum()) == round(sparsity * w.numel())
        assert w.abs()[~whole].max() <= w.abs()[whole].min()  # the smallest go, over the whole matrix
        acc = HessianAccumulator(100)
        acc.add(x)
        pruned = sparsegpt_prune(w, acc.hessian, parse_pattern("unstructured", "t"), sparsity=sparsity,
                                 block_size=32).weight
        assert abs(float((pruned == 0).float().mean()) - sparsity) < 0.01


def test_wanda_scores_weight_times_input_norm_per_row():
    w = torch.tensor([[1.0, 3.0, 2.5, 0.2], [4.0, 3.0, 2.0, 1.0]])
    sqnorm = torch.tensor([4.0, 1.0, 1.0, 1.0])  # channel 0 is louder: norm 2
    keep = wanda_mask(w, sqnorm, parse_pattern("unstructured", "t"), 0.5)
    # scores row 0: 2, 3, 2.5, 0.2 -> keep 1 and 2 (with the squared norm, 4 would keep 0); row 1: 8, 3, 2, 1
    assert keep.tolist() == [[False, True, True, False], [True, True, False, False]]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_a_layer(pattern):
    w, x = _layer()
    sgpt, wanda, mag = _three(w, x, parse_pattern(pattern, "t"))
    assert sgpt < wanda < mag, (sgpt, wanda, mag)


@pytest.mark.fixtures
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_tiny_llama_activations(pattern):
    """Real activations: the inputs of tiny-llama's layer-2 o_proj and down_proj on 4 x 256 train tokens. Measured
    relative output errors (SparseGPT / Wanda / magnitude): o_proj 0.103 / 0.158 / 0.183 unstructured, 0.134 / 0.258
    / 0.279 2:4; down_proj 0.142 / 0.219 / 0.240, 0.201 / 0.305 / 0.330. The linears after an RMSNorm (q, k, v,
    gate, up) see channels of about equal norm, where Wanda and magnitude tie (q_proj 0.136 / 0.135): not used."""
    from llmcompress.testing.fixtures import corpus_windows, load_tokenizer

    fixtures = fixtures_dir()
    if missing(fixtures):
        pytest.fail(missing(fixtures))
    model = load_model(fixtures, "tiny-llama")
    ids = corpus_windows(fixtures, load_tokenizer(fixtures), "train.txt", 4, 256)
    layers = {n: m for n, m in model.named_modules() if n in ("model.layers.2.self_attn.o_proj",
                                                               "model.layers.2.mlp.down_proj")}
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in layers.items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for name, module in layers.items():
        x, w = seen[name].float(), module.weight.detach().float()
        sgpt, wanda, mag = _three(w, x, parse_pattern(pattern, "t"))
        assert sgpt < wanda < mag, (name, sgpt, wanda, mag)


def test_joint_int4_mode_stores_codes_the_weight_dequantizes_from():
    w, x = _layer(n=19, k=128)
    acc = HessianAccumulator(128)
    acc.add(x)
    r = sparsegpt_prune(w, acc.hessian, parse_pattern("2:4", "t"), group_size=32, block_size=64)
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 15
    assert r.scales.shape == r.zeros.shape == (19, 4) and r.scales.dtype == r.zeros.dtype == torch.float16
    assert torch.equal(r.zeros, r.zeros.round())
    assert (r.mask.reshape(19, 32, 4).sum(-1) == 2).all()
    deq = (r.codes.float() - r.zeros.float().repeat_interleave(32, 1)) * r.scales.float().repeat_interleave(32, 1)
    torch.testing.assert_close(r.weight, deq * r.mask, rtol=0, atol=0)
    assert (r.weight[~r.mask] == 0).all()
    # Rounding the kept weights costs little over pruning alone (measured 0.2907 against 0.2773, 1.048x; without the
    # rounding errors fed back it fails). Pruning by SparseGPT then rounding to nearest measured 0.285 here: the
    # joint sweep is not better than that on this random layer.
    pruned = sparsegpt_prune(w, acc.hessian, parse_pattern("2:4", "t"), block_size=64).weight
    assert _rel_err(x, w, r.weight) < 1.05 * _rel_err(x, w, pruned)


def test_sparsegpt_bad_input_says_what_is_allowed():
    w, x = _layer(n=8, k=96)
    acc = HessianAccumulator(96)
    acc.add(x)
    with pytest.raises(OptionError, match="multiple of 8"):
        sparsegpt_prune(w[:, :90], acc.hessian[:90, :90], parse_pattern("4:8", "t"))
    with pytest.raises(OptionError, match=r"fraction in \(0, 1\)"):
        sparsegpt_prune(w, acc.hessian, parse_pattern("unstructured", "t"), sparsity=1.0)
    with pytest.raises(OptionError, match="block_size 30 must be a multiple of M=4"):
        sparsegpt_prune(w, acc.hessian, parse_pattern("2:4", "t"), block_size=30)
    for bad in ("2-4", "4:2", "0:4", "half"):
        with pytest.raises(OptionError, match="unstructured' or N:M|0 < N < M"):
            parse_pattern(bad, "t")
