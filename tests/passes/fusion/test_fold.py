"""The fold-into-weights pass: norm scales, layer-norm affines and scalar muls folded into linear weights, identity
muls and cast round trips dropped; where each fires (counts, graph structure), where it must not, numerics against
eager on tiny HF models through both lowerings, and derived weights cached across recompiles."""

from __future__ import annotations

import json

import pytest
import torch

import llmcompress.passes.fusion.fold  # noqa: F401  (registers the passes)
import llmcompress.testing.probe  # noqa: F401
from llmcompress.backend import make_backend
from llmcompress.passes.weights import DERIVED
from llmcompress.testing.models import example_ids, main_output, tiny_model
from llmcompress.testing.probe import ops_of_last_graph

FOLD = ["canonicalize", "fold-into-weights", "probe-graph"]
MUL, LINEAR, LN = "aten.mul.Tensor", "aten.linear.default", "aten.native_layer_norm.default"
# fp32: torch.testing's default. bf16: one rounding step (eps 7.8e-3) of the unit-scale outputs; its default atol
# (1e-5) fails any change of rounding order on outputs near zero, including Inductor's own.
TOL = {torch.float32: {}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm scales around 1 and shifts around 0: freshly initialised ones are exactly 1 and 0, which hides a wrong
    fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name or "layer_norm" in name):
                noise = torch.randn(p.shape, generator=g)
                p.copy_((1 + 0.5 * noise if name.endswith("weight") else 0.1 * noise).to(p.dtype))
    return model


def _run(model, inputs, passes=FOLD, lowering="eager", report=None, on_graph=None):
    options = {"passes": passes, "lowering": lowering, "strict": True}
    if report is not None:
        options["report"] = str(report)
    compiled = torch.compile(model, backend="llmcompress" if on_graph is None else make_backend(on_graph=on_graph),
                             options=options)
    with torch.no_grad():
        return compiled(*inputs)


def _pass(report, name="fold-into-weights", graph=0):
    data = json.loads(report.read_text())
    return next(p for p in data["graphs"][graph]["passes"] if p["name"] == name)


# --- HF models -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, dtype, lowering, expected", [
    # 2 layers x (input, post-attention) norms + the final norm; rotary's `* attention_scaling` (1.0) twice
    ("llama", torch.float32, "eager", {"norm scale": 5, "identity mul": 2}),
    ("llama", torch.bfloat16, "eager", {"norm scale": 5, "identity mul": 2}),
    ("qwen2", torch.float32, "inductor", {"norm scale": 5, "identity mul": 2}),
    # the post-attention norms feed the experts (index + grouped mm), not only linears: left as they are
    ("mixtral", torch.float32, "eager",
     {"norm scale": 3, "identity mul": 2, "skipped: a user that is not a linear": 2}),
    # layer norms: 2 x (attention, MLP) + final; GPT-2's lm_head is tied to the embedding (a derived copy is folded)
    ("gpt2", torch.float32, "eager", {"layer-norm affine": 5}),
    ("gpt2", torch.bfloat16, "inductor", {"layer-norm affine": 5}),
    # OPT scales q_proj's output by head_dim ** -0.5
    ("opt", torch.float32, "eager", {"layer-norm affine": 5, "scale after linear": 2}),
    ("opt", torch.bfloat16, "eager", {"layer-norm affine": 5, "scale after linear": 2}),
])
def test_folds_on_hf_models_match_eager(family, dtype, lowering, expected, tmp_path):
    model, ids = randomize_norms(tiny_model(family, dtype=dtype)), example_ids()
    with torch.no_grad():
        reference = main_output(model(ids))
    _run(model, [ids], passes=["canonicalize", "probe-graph"])
    before = ops_of_last_graph()
    torch._dynamo.reset()
    out = main_output(_run(model, [ids], lowering=lowering, report=tmp_path / "r.json"))
    after = ops_of_last_graph()
    torch.testing.assert_close(out, reference, **TOL[dtype])
    rec = _pass(tmp_path / "r.json")
    assert {k: v for k, v in rec["stats"].items() if k != "skipped: linear output used elsewhere"} == expected
    removed_muls = expected.get("norm scale", 0) + expected.get("identity mul", 0) + expected.get(
        "scale after linear", 0)
    assert before[MUL] - after[MUL] == removed_muls
    assert after[LINEAR] == before[LINEAR] and after[LN] == before[LN]
    folds = [d for d in rec["decisions"] if "skipped" not in d]
    assert folds and all(d["saved_s"] > 0 and d["saved_bytes"] >= 0 for d in folds)


def test_layer_norm_keeps_no_affine(tmp_path):
    seen = []
    _run(randomize_norms(tiny_model("opt")), [example_ids()], on_graph=lambda b, a, ctx: seen.append(a))
    lns = [n for n in seen[0].graph.nodes if n.target is torch.ops.aten.native_layer_norm.default]
    assert len(lns) == 5 and all(n.args[2] is None and n.args[3] is None for n in lns)
    # every linear fed by a layer norm now has a bias b + W·β, q_proj's scaled by 0.25 too
    linears = [n for n in seen[0].graph.nodes if n.target is torch.ops.aten.linear.default]
    assert all(len(n.args) > 2 and n.args[2] is not None for n in linears[:-1])


# --- small modules: where each fold fires ----------------------------------------------------------------------


class RMSNormLinears(torch.nn.Module):
    """HF's RMSNorm (cast to fp32, normalise, cast back, times γ) feeding `n_linears` linears, optionally also a
    residual read of the normed value."""

    def __init__(self, k=24, n=40, n_linears=2, residual=False, gamma_dtype=None, reshape=False, bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.5 * torch.randn(k, dtype=gamma_dtype or torch.float32))
        self.linears = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=bias) for _ in range(n_linears))
        self.residual, self.reshape = residual, reshape

    def forward(self, x):
        dtype = x.dtype
        h = x if dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = self.weight * h.to(dtype)
        z = y.reshape(-1, y.shape[-1]) if self.reshape else y
        out = sum(lin(z) for lin in self.linears)
        return out + y.sum(-1, keepdim=True) if self.residual else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reshape", [False, True])
def test_norm_scale_fold(dtype, reshape, tmp_path):
    torch.manual_seed(0)
    model = RMSNormLinears(reshape=reshape, bias=True).to(dtype).eval()
    x = torch.randn(3, 5, 24, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    out = _run(model, [x], report=tmp_path / "r.json")
    torch.testing.assert_close(out, expected, **TOL.get(dtype, {"atol": 2e-3, "rtol": 2e-3}))
    assert _pass(tmp_path / "r.json")["stats"] == {"norm scale": 1}
    assert ops_of_last_graph()[MUL] == 1  # h * rsqrt(...) is left; γ * h is gone


def test_norm_scale_fold_matches_float64_reference():
    """Folding rounds W·diag(γ) once: fp32 stays within fp32 tolerance of a float64 model."""
    torch.manual_seed(1)
    model = RMSNormLinears(k=37, n=53, n_linears=3).eval()
    x = torch.randn(4, 37)
    with torch.no_grad():
        expected = model.double()(x.double())
    model.float()
    out = _run(model, [x])
    torch.testing.assert_close(out.double(), expected, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("case, reason", [
    ("residual", "a user that is not a linear"),
    ("output", "a user that is not a linear"),
    ("dynamic weight", "a user that is not a linear"),  # canonicalize leaves it an mm: not a linear
    ("split rows", "a reshape that splits rows"),
])
def test_norm_scale_not_folded(case, reason, tmp_path):
    torch.manual_seed(0)

    class SplitRows(RMSNormLinears):
        def forward(self, x):
            y = self.weight * x
            return self.linears[0](y.view(*y.shape[:-1], 2, -1))

    class DynamicWeight(RMSNormLinears):
        def forward(self, x, w):
            y = self.weight * x
            return torch.nn.functional.linear(y, w) + self.linears[0](y)

    class Output(RMSNormLinears):
        def forward(self, x):
            y = self.weight * x
            return self.linears[0](y), y

    x = torch.randn(2, 3, 24)
    inputs = [x]
    if case == "residual":
        model = RMSNormLinears(residual=True)
    elif case == "output":
        model = Output()
    elif case == "dynamic weight":
        model = DynamicWeight()
        inputs.append(torch.randn(40, 24))
    else:
        model = SplitRows()
        model.linears[0] = torch.nn.Linear(12, 40)
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
    out = _run(model, inputs, report=tmp_path / "r.json")
    torch.testing.assert_close(out, expected)
    assert _pass(tmp_path / "r.json")["stats"] == {f"skipped: {reason}": 1}


def test_norm_scale_not_folded_when_the_mul_promotes(tmp_path):
    """mul(γ fp32, h bf16) is fp32: without the mul the linear would read bf16."""
    torch.manual_seed(0)

    class Promoting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(1 + torch.randn(24))
            self.lin = torch.nn.Linear(24, 16)

        def forward(self, x):
            return self.lin(self.weight * x.to(torch.bfloat16))

    model, x = Promoting().eval(), torch.randn(2, 24)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run(model, [x], report=tmp_path / "r.json"), expected)
    assert _pass(tmp_path / "r.json")["stats"] == {"skipped: dtype promotion": 1}


def test_norm_scale_not_folded_when_gamma_is_not_constant(tmp_path):
    torch.manual_seed(0)
    model = RMSNormLinears().eval()

    def forward(x, gamma):
        y = gamma * x
        return model.linears[0](y) + model.linears[1](y)

    x, gamma = torch.randn(2, 24), torch.randn(24)
    with torch.no_grad():
        expected = forward(x, gamma)
        out = torch.compile(forward, backend="llmcompress",
                            options={"passes": FOLD, "lowering": "eager", "report": str(tmp_path / "r.json")})(x, gamma)
    torch.testing.assert_close(out, expected)
    assert _pass(tmp_path / "r.json")["status"] == "unchanged"
    assert ops_of_last_graph()[MUL] == 1


class ScaledLinear(torch.nn.Module):
    def __init__(self, where, scale, dtype=torch.float32):
        super().__init__()
        self.lin = torch.nn.Linear(24, 40).to(dtype)
        self.where = where
        if isinstance(scale, torch.Tensor):
            self.register_buffer("scale", scale.to(dtype))
        else:
            self.scale = scale

    def forward(self, x):
        if self.where == "before":
            return self.lin(x * self.scale)
        return self.lin(x) * self.scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where, scale", [("before", 0.37), ("after", 0.25), ("after", 3), ("before", "0-d"),
                                          ("after", "1-element")])
def test_scalar_folds(where, scale, dtype, tmp_path):
    torch.manual_seed(0)
    scale = {"0-d": torch.tensor(0.7), "1-element": torch.tensor([1.3])}.get(scale, scale)
    model, x = ScaledLinear(where, scale, dtype).eval(), torch.randn(3, 7, 24, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    out = _run(model, [x], report=tmp_path / "r.json")
    torch.testing.assert_close(out, expected, **TOL[dtype])
    kind = "scale before linear" if where == "before" else "scale after linear"
    assert _pass(tmp_path / "r.json")["stats"] == {kind: 1}
    assert ops_of_last_graph()[MUL] == 0


def test_scale_after_linear_not_folded_when_the_output_is_read_twice(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(24, 40)

        def forward(self, x):
            y = self.lin(x)
            return y * 0.5 + y.relu()

    model, x = Twice().eval(), torch.randn(2, 24)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run(model, [x], report=tmp_path / "r.json"), expected)
    assert _pass(tmp_path / "r.json")["stats"] == {"skipped: linear output used elsewhere": 1}


def test_scale_that_overflows_fp16_is_not_folded(tmp_path):
    model = ScaledLinear("after", 1e4, torch.float16).eval()
    with torch.no_grad():
        model.lin.weight[0, 0] = 60.0  # 60 * 1e4 overflows fp16 (max 65504)
    x = torch.randn(2, 24, dtype=torch.float16) * 1e-3
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run(model, [x], report=tmp_path / "r.json"), expected)
    assert _pass(tmp_path / "r.json")["stats"] == {"skipped: scaled weight overflows or underflows": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_fold_on_a_module(dtype, tmp_path):
    torch.manual_seed(0)

    class LNLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(24)
            self.a, self.b = torch.nn.Linear(24, 40), torch.nn.Linear(24, 8, bias=False)

        def forward(self, x):
            h = self.ln(x)
            return self.a(h).sum(-1) + self.b(h).sum(-1)

    model = LNLinears().to(dtype).eval()
    with torch.no_grad():
        model.ln.weight.copy_(1 + 0.5 * torch.randn(24))
        model.ln.bias.copy_(0.3 * torch.randn(24))
    x = torch.randn(3, 5, 24, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    out = _run(model, [x], report=tmp_path / "r.json")
    torch.testing.assert_close(out, expected, **({} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}))
    rec = _pass(tmp_path / "r.json")
    assert rec["stats"] == {"layer-norm affine": 1}
    (decision,) = rec["decisions"]
    assert decision["saved_s"] > 0  # the affine's reads and FLOPs go; b (no bias before) gains one


def test_layer_norm_feeding_a_non_linear_is_kept(tmp_path):
    class LNRelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.lin = torch.nn.LayerNorm(24), torch.nn.Linear(24, 8)

        def forward(self, x):
            h = self.ln(x)
            return self.lin(h) + h.relu().sum(-1, keepdim=True)

    model, x = LNRelu().eval(), torch.randn(2, 24)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run(model, [x], report=tmp_path / "r.json"), expected)
    assert _pass(tmp_path / "r.json")["stats"] == {"skipped: a user that is not a linear": 1}


@pytest.mark.parametrize("src, mid, folds", [(torch.bfloat16, torch.float32, True),
                                             (torch.float16, torch.float64, True),
                                             (torch.float32, torch.bfloat16, False),  # narrowing: not exact
                                             (torch.bfloat16, torch.float16, False)])
def test_round_trip_cast(src, mid, folds, tmp_path):
    def fn(x):
        return (x.to(mid).to(src) + 1).to(mid).to(src) * 2  # the first round trip is on the input: kept distinct

    x = torch.randn(4, 8, dtype=src)
    with torch.no_grad():
        out = torch.compile(fn, backend="llmcompress",
                            options={"passes": FOLD, "lowering": "eager", "report": str(tmp_path / "r.json")})(x)
    torch.testing.assert_close(out, fn(x), atol=0, rtol=0)
    stats = _pass(tmp_path / "r.json")["stats"]
    assert stats == ({"round-trip cast": 2} if folds else {})
    assert ops_of_last_graph()["aten._to_copy.default"] == (0 if folds else 4)


def test_identity_mul_that_would_alias_an_output_is_kept(tmp_path):
    def fn(x):
        y = x + 1
        return x * 1, (x + 2) * 1.0, y, y * 1  # the 1st would return the input, the 4th alias the 3rd output

    x = torch.randn(4, 8)
    with torch.no_grad():
        a, b, c, d = torch.compile(fn, backend="llmcompress", options={
            "passes": FOLD, "lowering": "eager", "report": str(tmp_path / "r.json")})(x)
    assert a.data_ptr() != x.data_ptr() and c.data_ptr() != d.data_ptr()
    assert torch.equal(a, x) and torch.equal(b, x + 2) and torch.equal(d, c)
    assert _pass(tmp_path / "r.json")["stats"] == {"identity mul": 1, "skipped: would alias an output": 2}


# --- derived weights -------------------------------------------------------------------------------------------


def test_folded_weights_are_cached_across_recompiles_and_invalidated_by_gamma(tmp_path):
    torch.manual_seed(0)
    model = RMSNormLinears(n_linears=3).eval()
    compiled = torch.compile(model, backend="llmcompress",
                             options={"passes": FOLD, "lowering": "eager", "report": str(tmp_path / "r.json")})
    with torch.no_grad():
        compiled(torch.randn(2, 24))
        hits = DERIVED.hits
        out = compiled(torch.randn(2, 3, 24))  # a new rank: recompile
        assert DERIVED.hits - hits == 3  # the three folded weights come from the cache
        model.weight.mul_(2)  # a change to γ (the second base of each entry) invalidates them
        torch._dynamo.reset()
        x = torch.randn(2, 3, 24)
        misses = DERIVED.misses
        out = compiled(x)
        assert DERIVED.misses - misses == 3
        torch.testing.assert_close(out, model(x))
