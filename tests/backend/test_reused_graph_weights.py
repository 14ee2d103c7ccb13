"""One Dynamo graph called with other modules' weights: with `inline_inbuilt_nn_modules` (torch's default) the
parameters are graph inputs that Dynamo does not guard by identity, so a graph traced inside one layer after a graph
break serves every layer. The backend froze the first layer's weights into it; it must compile the graph again for
each other set of weights, never run it with stale constants (the oracle is the eager model)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers

from llmcompress.backend import make_backend


class _Block(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.first = torch.nn.Linear(12, 20)
        self.second = torch.nn.Linear(20, 12)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.first(x))
        torch._dynamo.graph_break()
        return x + self.second(y)


class _Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(seed) for seed in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_a_graph_dynamo_reuses_across_layers_runs_each_layers_own_weights(lowering, tmp_path):
    model = _Stack().eval()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="llmcompress",
                                 options={"lowering": lowering, "report": str(tmp_path / "r.json")})
        out = compiled(x)
        again = compiled(x)  # the variants are kept: no new compiles
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)
    graphs = json.loads((tmp_path / "r.json").read_text())["graphs"]
    # Dynamo's graphs (before the first break, between breaks, after the last) times the weight sets they met.
    assert len(graphs) < 3 * 3 + 2


def test_transformers_eager_experts_loop_matches_the_eager_model():
    """The case that showed it: Mixtral's `eager` experts implementation breaks the graph in its expert loop, and
    the graph after the break served every layer with layer 0's weights (logits off by 1e-2 on a random config)."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
                                     num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    graphs = []
    with torch.no_grad():
        expected = model(ids).logits
        torch._dynamo.reset()
        out = torch.compile(model, backend=make_backend(on_graph=lambda b, a, ctx: graphs.append(a)),
                            options={"lowering": "eager"})(ids).logits
    assert len(graphs) > 2  # the loop did break the graph
    torch.testing.assert_close(out, expected)


def test_weight_variants_of_a_dynamic_graph_stay_dynamic():
    """The other layers' variants compile at call time, outside Dynamo's tracing context; compiled without it they
    came out static at the first call's sizes and failed at the next size ("expected size 2==24")."""
    model = _Stack().eval()
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(rows, 12, generator=gen) for rows in (5, 7, 2)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="llmcompress", dynamic=True, options={"lowering": "inductor"})
        outs = [compiled(x) for x in xs]
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp)


def test_a_variant_that_cannot_compile_runs_dynamos_graph_with_its_weights(monkeypatch):
    """Where even Inductor's fallback fails for the other weights, the graph runs as Dynamo traced it, warned."""
    from llmcompress.backend import pipeline

    real = pipeline._compile_graph_once

    def failing_after_first(*args, **kwargs):
        if sys._getframe(1).f_code.co_name == "dispatch":  # a variant for other weights
            raise RuntimeError("deliberate compile failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_compile_graph_once", failing_after_first)
    model = _Stack().eval()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="llmcompress", options={"lowering": "eager"})
        with pytest.warns(pipeline.FallbackWarning, match="reused with other weights"):
            out = compiled(x)
    torch.testing.assert_close(out, expected)


class _Norm(torch.nn.Module):
    """An RMSNorm with its epsilon a float attribute, which `dynamic=True` leaves an unspecialised scalar input."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(seed)))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_variants_of_a_graph_with_an_unspecialised_scalar_compile():
    """Modules compiled one by one (regional compile) share Dynamo's graph; the other modules' compiles read the
    epsilon with `.item()`, which failed as data-dependent (strict mode raises on any fallback)."""
    norms = [_Norm(seed) for seed in range(3)]
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(rows, 16, generator=gen) for rows in (5, 7, 2)]
    with torch.no_grad():
        expected = [[n(x) for n in norms] for x in xs]
        torch._dynamo.reset()
        for n in norms:
            n.forward = torch.compile(n.forward, backend="llmcompress", dynamic=True, options={"strict": True})
        outs = [[n(x) for n in norms] for x in xs]
    for row, exp in zip(outs, expected):
        for out, e in zip(row, exp):
            torch.testing.assert_close(out, e)
