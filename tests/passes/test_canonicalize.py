"""canonicalize: every linear spelling becomes one aten.linear on a frozen weight; numerics unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmcompress.testing.probe import ProbeGraphPass, ops_of_last_graph

LINEAR = "aten.linear.default"
MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default")


class Spelling(torch.nn.Module):
    def __init__(self, kind: str, k: int = 24, n: int = 20) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.w = torch.nn.Parameter(torch.randn(n, k, generator=g))
        self.b = torch.nn.Parameter(torch.randn(n, generator=g))
        self.w_kn = torch.nn.Parameter(torch.randn(k, n, generator=g))  # GPT-2 Conv1D layout

    def forward(self, x):
        k = self.kind
        if k == "F.linear":
            return F.linear(x, self.w, self.b)
        if k == "F.linear no bias":
            return F.linear(x, self.w)
        if k == "x @ w.T + b":
            return x @ self.w.T + self.b
        if k == "matmul(x, w.t())":
            return torch.matmul(x, self.w.t())
        if k == "addmm":
            return torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.w.t())
        if k == "mm":
            return torch.mm(x.reshape(-1, x.shape[-1]), self.w.t())
        if k == "conv1d addmm":
            return torch.addmm(self.b, x.view(-1, x.size(-1)), self.w_kn).view(*x.shape[:-1], -1)
        if k == "x @ w_kn":
            return x @ self.w_kn
        if k == "nn.Linear":
            return F.linear(x, self.w, self.b)
        raise AssertionError(k)


SPELLINGS = ["F.linear", "F.linear no bias", "x @ w.T + b", "matmul(x, w.t())", "addmm", "mm", "conv1d addmm",
             "x @ w_kn"]


def _compile(model, *inputs, lowering="eager", dynamic=None, **opts):
    ProbeGraphPass.seen.clear()
    options = {"passes": ["canonicalize", "probe-graph"], "lowering": lowering, "strict": True, **opts}
    compiled = torch.compile(model, backend="llmcompress", options=options, dynamic=dynamic)
    with torch.no_grad():
        return [compiled(x) for x in inputs]


@pytest.mark.parametrize("kind", SPELLINGS)
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (2, 3, 5, 24)], ids=["2d", "3d", "4d"])
def test_each_spelling_becomes_one_linear(kind, shape):
    model = Spelling(kind)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (out,) = _compile(model, x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    ops = ops_of_last_graph()
    assert ops[LINEAR] == 1, ops
    assert not any(ops[m] for m in MATMULS), ops
    assert ProbeGraphPass.seen[-1]["linear_weights_constant"] == [True]


def test_bias_add_folds_into_linear():
    model = Spelling("x @ w.T + b")
    x = torch.randn(3, 24)
    _compile(model, x)
    ops = ops_of_last_graph()
    assert ops[LINEAR] == 1 and ops["aten.add.Tensor"] == 0, ops


def test_dynamic_shapes_keep_leading_dims():
    model = Spelling("F.linear")
    xs = [torch.randn(2, s, 24) for s in (5, 9, 13)]
    outs = _compile(model, *xs, dynamic=True)
    with torch.no_grad():
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model(x))
    assert ops_of_last_graph()[LINEAR] == 1


class NotALayer(torch.nn.Module):
    """Activation x activation products (attention scores) are not linear layers."""

    def forward(self, q, k):
        return (q @ k.transpose(-1, -2)).softmax(-1) @ k


def test_activation_matmul_is_left_alone():
    q, k = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ProbeGraphPass.seen.clear()
    compiled = torch.compile(NotALayer(), backend="llmcompress",
                             options={"passes": ["canonicalize", "probe-graph"], "lowering": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k), NotALayer()(q, k))
    assert ops_of_last_graph()[LINEAR] == 0


class SiluSpelled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        h = F.linear(x, self.w)
        return h * torch.sigmoid(h)


def test_x_times_sigmoid_becomes_silu():
    model = SiluSpelled()
    x = torch.randn(3, 16)
    (out,) = _compile(model, x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    ops = ops_of_last_graph()
    assert ops["aten.silu.default"] == 1 and ops["aten.sigmoid.default"] == 0, ops


@pytest.mark.parametrize("kind", ["F.linear", "conv1d addmm"])
def test_inductor_lowering_of_canonical_linear(kind):
    model = Spelling(kind)
    x = torch.randn(2, 7, 24)
    (out,) = _compile(model, x, lowering="inductor")
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_options_are_typed():
    from llmcompress.errors import OptionError
    from llmcompress.passes.canonicalize import CanonicalizePass

    assert CanonicalizePass({"activations": False}).options.activations is False
    with pytest.raises(OptionError, match="pass 'canonicalize': unknown key 'linears'.*allowed keys: activations, linear"):
        CanonicalizePass({"linears": True})
    with pytest.raises(OptionError, match="key 'linear' got 'yes'.*expected bool"):
        CanonicalizePass({"linear": "yes"})
