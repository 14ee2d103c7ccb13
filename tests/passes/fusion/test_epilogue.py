"""The fuse-linear-epilogue pass: where it fires (tiny models of several families, both lowerings, fp32 and bf16;
each spelling of SiLU(gate)·up; the RMSNorm prologue), what it leaves (a linear whose output is also used elsewhere,
an activation on a non-linear, a broadcasting residual, a weight that is an input), numerics against eager, the
cost model's decisions, and the Triton launcher through a whole model under the interpreter."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

import llmcompress.kernels.fused_linear as fl
import llmcompress.passes.fusion.fold  # `after` names its pass: a broken import fails here, never skips
import llmcompress.passes.fusion.siblings  # likewise
import llmcompress.testing.probe  # noqa: F401 - registers probe-graph
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel
from llmcompress.kernels.kernel_path import choose_gemv_max_m
from llmcompress.testing.models import example_ids, main_output, tiny_model
from llmcompress.testing.probe import ops_of_last_graph

FUSED = "llmcompress.fused_linear.default"
PASSES = ["canonicalize", "fuse-linear-epilogue", "probe-graph"]
# bf16: eager rounds every intermediate (y, act(y), the product, the sum) to bf16, the fused op once.
TOLS = {torch.float32: dict(atol=1e-5, rtol=1.3e-6), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _run(model, inputs, tmp_path, lowering="eager", passes=PASSES, **options):
    """(eager output, compiled output, the pass's report record, the probe's op counts)."""
    path = tmp_path / "report.json"
    with torch.no_grad():
        expected = model(*inputs)
        compiled = torch.compile(model, backend="llmcompress",
                                 options={"passes": passes, "lowering": lowering, "report": str(path), "strict": True,
                                          **options})
        out = compiled(*inputs)
    graph = json.loads(path.read_text())["graphs"][-1]  # the report accumulates the graphs of a test's compiles
    record = next(p for p in graph["passes"] if p["name"] == "fuse-linear-epilogue")
    return expected, out, record, ops_of_last_graph()


def _fused_patterns(record):
    return {k.removeprefix("fused: "): v for k, v in record["stats"].items() if k.startswith("fused: ")}


def _no_weight_rmsnorm(monkeypatch, module, cls):
    """HF's RMSNorm as `fold-into-weights` leaves it (γ folded into the next linears): here γ is 1, left out."""
    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return h.to(dtype)

    monkeypatch.setattr(getattr(importlib.import_module(module), cls), "forward", forward)


# family, dtype, lowering, fused patterns. Llama's and Qwen2's gate/up are two linears on one x; Phi-3's one
# linear + chunk (split); GPT-2's c_fc + spelled-out tanh GELU on a transposed (Conv1D) weight with bias; OPT relu;
# every family's o_proj / down_proj + residual (through a clone in GPT-2 and Phi-3). In bf16 the last layer's
# residual add is cast to fp32 for the final norm: that cast fuses too.
MODEL_CASES = [
    ("llama", torch.float32, "eager", {"linear+silu*up": 2, "linear+residual": 4}),
    ("llama", torch.bfloat16, "inductor", {"linear+silu*up": 2, "linear+residual": 3,
                                            "linear+residual+cast:float32": 1}),
    ("qwen2", torch.bfloat16, "eager", {"linear+silu*up": 2, "linear+residual": 3,
                                        "linear+residual+cast:float32": 1}),
    ("phi3", torch.float32, "inductor", {"linear+silu*up": 2, "linear+residual": 4}),
    ("phi3", torch.bfloat16, "eager", {"linear+silu*up": 2, "linear+residual": 3,
                                       "linear+residual+cast:float32": 1}),
    ("gpt2", torch.float32, "eager", {"linear+gelu_tanh": 2, "linear+residual": 4}),
    ("gpt2", torch.bfloat16, "eager", {"linear+gelu_tanh": 2, "linear+residual": 4}),
    ("opt", torch.float32, "eager", {"linear+relu": 2, "linear+residual": 4}),
]


@pytest.mark.parametrize("family,dtype,lowering,patterns", MODEL_CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-{c[2]}" for c in MODEL_CASES])
def test_fires_on_tiny_models(family, dtype, lowering, patterns, tmp_path):
    model = tiny_model(family, dtype)
    expected, out, record, ops = _run(model, (example_ids(),), tmp_path, lowering)
    torch.testing.assert_close(main_output(out), main_output(expected), **TOLS[dtype])
    assert _fused_patterns(record) == patterns
    assert ops[FUSED] == sum(patterns.values())
    for op in ("aten.silu.default", "aten.relu.default", "aten.tanh.default"):
        assert ops[op] == 0
    for d in record["decisions"]:
        assert d["fused"] and d["after_s"] < d["before_s"] and d["gemv_max_m"] >= 1


@pytest.mark.parametrize("dtype,lowering", [(torch.float32, "eager"), (torch.bfloat16, "eager"),
                                            (torch.bfloat16, "inductor")])
def test_rms_prologue_on_llama(monkeypatch, dtype, lowering, tmp_path):
    # The MLP's norm feeds only gate and up, the final norm only the LM head (through an alias): both prologues
    # fuse; the attention norm feeds q, k and v and stays. The last residual's cast to fp32 is the final norm's
    # upcast, so it is left to that norm rather than fused into down_proj.
    _no_weight_rmsnorm(monkeypatch, "transformers.models.llama.modeling_llama", "LlamaRMSNorm")
    model = tiny_model("llama", dtype)
    expected, out, record, ops = _run(model, (example_ids(),), tmp_path, lowering)
    torch.testing.assert_close(main_output(out), main_output(expected), **TOLS[dtype])
    assert _fused_patterns(record) == {"rms+linear+silu*up": 2, "rms+linear": 1, "linear+residual": 4}
    assert ops["aten.rsqrt.default"] == 2 and ops["aten.linear.default"] == 6  # the two attention norms; q, k, v


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("qwen2", torch.float32)])
def test_after_fold_and_siblings(family, dtype, tmp_path):
    # The pipeline the passes are written for: γ folded, q/k/v and gate/up one linear each. Then every linear
    # fuses: q/k/v and the LM head with their norm, gate/up with its norm and SiLU·up (slices), o/down with the
    # residual; no norm, activation or plain linear is left.
    passes = ["canonicalize", "fold-into-weights", "fuse-sibling-linears", "fuse-linear-epilogue", "probe-graph"]
    model = tiny_model(family, dtype)
    expected, out, record, ops = _run(model, (example_ids(),), tmp_path, "eager", passes=passes)
    torch.testing.assert_close(main_output(out), main_output(expected), **TOLS[dtype])
    assert _fused_patterns(record) == {"rms+linear": 3, "rms+linear+silu*up": 2, "linear+residual": 4}
    assert ops["aten.linear.default"] == ops["aten.silu.default"] == ops["aten.rsqrt.default"] == 0


class _GatedSliced(torch.nn.Module):
    """gate_up as one linear followed by last-dim slices: what fuse-sibling-linears leaves."""

    def __init__(self, k=24, n=20, bias=True):
        super().__init__()
        self.n = n
        self.gate_up = torch.nn.Linear(k, 2 * n, bias=bias)

    def forward(self, x, r):
        y = self.gate_up(x)
        return F.silu(y[..., :self.n]) * y[..., self.n:] + r


class _GatedPair(torch.nn.Module):
    def __init__(self, k=24, n=20, bias=True, act=F.silu, up_first=False):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(k, n, bias=bias), torch.nn.Linear(k, n, bias=bias)
        self.act, self.up_first = act, up_first

    def forward(self, x):
        if self.up_first:
            u = self.up(x)
            return u * self.act(self.gate(x))
        return self.act(self.gate(x)) * self.up(x)


def _inputs(*shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=g).to(dtype) for s in shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_sliced_form_with_bias_and_residual(dtype, tmp_path):
    model = _GatedSliced().to(dtype).eval()
    expected, out, record, ops = _run(model, _inputs((2, 3, 24), (2, 3, 20), dtype=dtype), tmp_path)
    torch.testing.assert_close(out, expected, **TOLS[dtype])
    assert _fused_patterns(record) == {"linear+silu*up+residual": 1}
    assert ops[FUSED] == 1 and ops["aten.slice.Tensor"] == 0 and ops["aten.add.Tensor"] == 0


@pytest.mark.parametrize("act,name,up_first", [(F.silu, "silu", False), (F.gelu, "gelu", True),
                                               (F.relu, "relu", False)])
def test_gated_pair_of_linears(act, name, up_first, tmp_path):
    # Two linears on one x (with biases): one op on the concatenated weight and bias, whichever linear comes first.
    model = _GatedPair(act=act, up_first=up_first).eval()
    expected, out, record, ops = _run(model, _inputs((5, 24)), tmp_path)
    torch.testing.assert_close(out, expected, **TOLS[torch.float32])
    assert _fused_patterns(record) == {f"linear+{name}*up": 1}
    assert ops[FUSED] == 1 and ops["aten.linear.default"] == 0
    (decision,) = record["decisions"]
    assert decision["weight"] == "gate+up.weight"


class _RmsLinear(torch.nn.Module):
    def __init__(self, k=24, n=20, eps=1e-5, act=None):
        super().__init__()
        self.lin, self.eps, self.act = torch.nn.Linear(k, n), eps, act

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.lin(h.to(x.dtype))
        return y if self.act is None else self.act(y)


def test_rms_prologue_and_gelu_tanh_epilogue(tmp_path):
    model = _RmsLinear(act=lambda y: F.gelu(y, approximate="tanh")).eval()
    (x,) = _inputs((4, 24))
    expected, out, record, ops = _run(model, (3 * x,), tmp_path)
    torch.testing.assert_close(out, expected, **TOLS[torch.float32])
    assert _fused_patterns(record) == {"rms+linear+gelu_tanh": 1}
    assert ops[FUSED] == 1 and ops["aten.rsqrt.default"] == 0 and ops["aten.gelu.default"] == 0


class _Negative(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case, self.lin, self.up = case, torch.nn.Linear(24, 20), torch.nn.Linear(24, 20)

    def forward(self, x, r, w):
        if self.case == "output-also-used":
            y = self.lin(x)
            return F.silu(y), y
        if self.case == "act-output-also-used":
            a = F.silu(self.lin(x))
            return a * self.up(x), a
        if self.case == "act-on-non-linear":
            return F.silu(r * 2.0) * self.up(x)
        if self.case == "residual-broadcast":
            return self.lin(x) + r[0, 0]
        if self.case == "norm-also-used":
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            return self.lin(h), h
        return F.silu(F.linear(x, w))  # "dynamic-weight"


# case -> what fuses: a linear whose output is also used elsewhere keeps it; an activation whose output is also used
# elsewhere is the chain's end, so linear + activation still fuse (the op computes that output), but not the gate.
NEGATIVE_CASES = {"output-also-used": {}, "act-output-also-used": {"linear+silu": 1}, "act-on-non-linear": {},
                  "residual-broadcast": {}, "norm-also-used": {}, "dynamic-weight": {}}


@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_does_not_fire(case, tmp_path):
    model = _Negative(case).eval()
    expected, out, record, ops = _run(model, _inputs((3, 24), (3, 20), (20, 24)), tmp_path)
    torch.testing.assert_close(out, expected)
    assert _fused_patterns(record) == NEGATIVE_CASES[case]
    assert ops[FUSED] == sum(NEGATIVE_CASES[case].values())


def test_cost_model_can_refuse(monkeypatch, tmp_path):
    # A fused op priced above what it replaces is left alone (and counted); `force` fuses it anyway.
    from llmcompress.passes.fusion import epilogue

    model = _GatedPair().eval()
    monkeypatch.setattr(epilogue.FuseLinearEpiloguePass, "_time_before", lambda self, m, ctx: 0.0)
    _, _, record, ops = _run(model, _inputs((5, 24)), tmp_path)
    assert record["stats"] == {"skipped: not faster": 1} and ops[FUSED] == 0
    assert record["decisions"][0]["fused"] is False
    torch._dynamo.reset()
    passes = {"canonicalize": {}, "fuse-linear-epilogue": {"force": True}, "probe-graph": {}}
    _, _, record, ops = _run(model, _inputs((5, 24)), tmp_path, passes=passes)
    assert record["stats"]["fused"] == 1 and ops[FUSED] == 1


def test_choose_gemv_max_m_h100():
    # Memory bound at M <= 16 for a 7B-shaped layer: the GEMV (CUDA cores up to 4 rows) ties with the GEMM, and
    # ties go to the GEMV.
    cm = CostModel(HARDWARE["h100-sxm"])
    gemv_max_m, priced = choose_gemv_max_m(cm, 2 * 11008, 4096, torch.bfloat16)
    assert gemv_max_m == 16 and set(priced) == {"m=1", "m=4", "m=16"}
    assert choose_gemv_max_m(None, 64, 64, torch.float32)[0] == 16


def test_launcher_through_a_whole_model(monkeypatch, tmp_path):
    # The CPU op runs the reference; route its real (not fake) calls through the Triton launcher, which runs under
    # the interpreter here, to check the kernels on a whole model's shapes (M = 22 rows: the GEMM; M = 1: the GEMV).
    reference, calls = fl.fused_linear_reference, []

    def launcher(x, *args):
        if isinstance(x, FakeTensor):
            return reference(x, *args)
        calls.append(x.shape)
        return fl.fused_linear_triton(x, *args)

    monkeypatch.setattr(fl, "fused_linear_reference", launcher)
    _no_weight_rmsnorm(monkeypatch, "transformers.models.llama.modeling_llama", "LlamaRMSNorm")
    model = tiny_model("llama")
    for ids in (example_ids(), example_ids(batch=1, seq=1)):
        expected, out, record, _ = _run(model, (ids,), tmp_path)
        torch.testing.assert_close(main_output(out), main_output(expected), atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()
    assert len(calls) == 2 * 7
