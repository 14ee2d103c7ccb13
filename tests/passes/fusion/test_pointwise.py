"""The fuse-pointwise pass: which groups it puts on generated kernels (cost model against the lowering), splitting
groups the generator refuses, the report's sources and savings, the dump folder, dynamic shapes."""

from __future__ import annotations

import json

import pytest
import torch

import llmcompress.testing.probe  # noqa: F401
from llmcompress.testing.models import example_ids, main_output, tiny_model
from llmcompress.testing.probe import ops_of_last_graph

FUSED = "llmcompress.fused.default"


class NormGate(torch.nn.Module):
    """RMSNorm (no linear after it, so nothing folds) then a sigmoid gate and a residual: one kernel's work."""

    def __init__(self, n: int = 37) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x, r):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return torch.sigmoid(h) * h + r


def _compile(model, lowering="eager", report=None, dynamic=None, **extra):
    options = {"passes": ["canonicalize", "fuse-pointwise", "probe-graph"], "lowering": lowering, "strict": True,
               **extra}
    if report is not None:
        options["report"] = str(report)
    return torch.compile(model, backend="llmcompress", options=options, dynamic=dynamic)


def _decisions(report):
    data = json.loads(report.read_text())
    return [d for g in data["graphs"] for p in g["passes"] if p["name"] == "fuse-pointwise" for d in p["decisions"]]


def _inputs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_a_chain_becomes_one_generated_kernel_under_eager(tmp_path):
    model, (x, r) = NormGate().eval(), _inputs(3, 5, 37)
    report = tmp_path / "r.json"
    with torch.no_grad():
        out = _compile(model, report=report)(x, r)
        torch.testing.assert_close(out, model(x, r))
    ops = ops_of_last_graph()
    assert ops[FUSED] == 1
    assert not any(k.startswith("aten.") and k not in ("aten.view.default",) for k in ops), ops
    (decision,) = _decisions(report)
    assert decision["fused"] and decision["after_s"] < decision["before_s"]
    assert decision["launches_saved"] == len(decision["nodes"]) - 1 > 3
    assert decision["bytes_saved"] > 0
    source = open(decision["source"]).read()
    assert "@triton.jit" in source and source.count("tl.sum") == 1


def test_inductor_fuses_such_chains_itself_so_the_pass_leaves_them(tmp_path):
    model, (x, r) = NormGate().eval(), _inputs(3, 5, 37)
    report = tmp_path / "r.json"
    with torch.no_grad():
        torch.testing.assert_close(_compile(model, "inductor", report)(x, r), model(x, r))
    assert ops_of_last_graph()[FUSED] == 0
    (decision,) = _decisions(report)
    assert not decision["fused"] and decision["after_s"] == decision["before_s"]


def test_single_ops_and_view_only_groups_stay_in_aten(tmp_path):
    def fn(x, w):
        return torch.matmul(torch.sigmoid(x), w).transpose(0, 1).reshape(-1)

    x, w = torch.randn(4, 6), torch.randn(6, 5)
    report = tmp_path / "r.json"
    torch.testing.assert_close(_compile(fn, report=report)(x, w), fn(x, w))
    assert ops_of_last_graph()[FUSED] == 0
    data = json.loads(report.read_text())
    stats = next(p for p in data["graphs"][0]["passes"] if p["name"] == "fuse-pointwise")["stats"]
    assert stats.get("kept: no predicted gain", 0) >= 1 and "groups fused" not in stats


def test_grouped_query_rotary_gets_one_kernel_per_row_space(tmp_path):
    """q (4 heads) and k (2 heads) share cos/sin but not rows: two kernels, not one refused group."""
    model, ids = tiny_model("llama"), example_ids()
    report = tmp_path / "r.json"
    with torch.no_grad():
        out = torch.compile(model, backend="llmcompress", options={"lowering": "triton", "strict": True,
                                                                    "report": str(report)})(ids)
        torch.testing.assert_close(main_output(out), main_output(model(ids)))
    decisions = _decisions(report)
    assert all(d["fused"] for d in decisions), [d.get("reason") for d in decisions if not d["fused"]]
    rotary = [d for d in decisions if "cat" in d["ops"] or "neg" in d["ops"]]
    assert len(rotary) >= 2


def test_dump_kernels_writes_readable_sources(tmp_path):
    model, (x, r) = NormGate().eval(), _inputs(2, 37)
    dump = tmp_path / "kernels"
    with torch.no_grad():
        _compile(model, dump_kernels=str(dump))(x, r)
    files = sorted(dump.glob("*.py"))
    assert len(files) == 1 and "rsqrt" in files[0].read_text()


def test_dynamic_shapes_reuse_the_kernel():
    model = NormGate().eval()
    compiled = _compile(model, dynamic=True)
    with torch.no_grad():
        for rows, seed in ((3, 0), (9, 1), (1, 2)):
            x, r = _inputs(rows, 37, seed=seed)
            torch.testing.assert_close(compiled(x, r), model(x, r))
    assert ops_of_last_graph()[FUSED] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_eager(dtype):
    model, (x, r) = NormGate().eval().to(dtype), _inputs(4, 37)
    x, r = x.to(dtype), r.to(dtype)
    with torch.no_grad():
        ours, eager = _compile(model)(x, r), model(x, r)
        exact = model.double()(x.double(), r.double())
    # Each op rounds to half in both, but the sum of squares accumulates in another order: compare both errors
    # against float64 rather than ours against eager's rounding.
    ours_err, eager_err = (ours.double() - exact).abs().max(), (eager.double() - exact).abs().max()
    assert ours_err <= 2 * eager_err + torch.finfo(dtype).eps, (ours_err, eager_err)


@pytest.mark.parametrize("lowering", ["eager", "triton"])
def test_fusion_keeps_working_around_quantized_linears(lowering, tmp_path):
    """The default recipe's fusions with quantize-linear (w4a16) between them: q/k/v and gate/up quantized as fused
    layers, pointwise chains generated around the quantized ops, as accurate as quantizing without fusion."""
    from llmcompress.testing.numerics import sqnr_db

    model, ids = tiny_model("llama"), example_ids()
    quantize = {"scheme": "w4a16", "group_size": 32}
    fused_passes = {"canonicalize": {}, "fold-into-weights": {}, "fuse-sibling-linears": {}, "quantize-linear": quantize,
                    "fuse-linear-epilogue": {}, "fuse-pointwise": {"force": True}, "probe-graph": {}}
    with torch.no_grad():
        eager = main_output(model(ids))
        plain = main_output(torch.compile(model, backend="llmcompress", options={
            "passes": {"canonicalize": {}, "quantize-linear": quantize}, "lowering": "eager", "strict": True})(ids))
        torch._dynamo.reset()
        fused = main_output(torch.compile(model, backend="llmcompress", options={
            "passes": fused_passes, "lowering": lowering, "strict": True})(ids))
    ops = ops_of_last_graph()
    # per layer: q+k+v, o, gate+up, down; on the CPU (but for the Triton lowering) torch's packed kernels
    quantized = ops["llmcompress.linear_w4a16.default"] + ops["llmcompress.linear_w4a16_cpu.default"]
    assert quantized == 2 * 4
    assert ops[FUSED] >= 4
    assert sqnr_db(eager, plain) > 10.0
    # The same codes either way: the fresh model's norm weights are 1, so folding them leaves the quantized weights
    # as they were, and int4 groups run along K, so fusing q/k/v and gate/up does not mix rows. Then the fusions
    # only change fp32 rounding order: equal to torch.testing's float32 tolerance (measured: 1.3e-7 apart).
    torch.testing.assert_close(fused, plain)


def test_fusions_stand_aside_where_triton_does_not_run(monkeypatch, tmp_path):
    """A CPU without the Triton interpreter: our ops would run their references op by op and hide the graph from
    the lowering, so the cost model's fused price does not hold; `force` still fuses (lowering="triton" is refused
    there: tests/backend/test_lowering.py)."""
    import llmcompress.kernels.linear_common as common

    monkeypatch.setattr(common, "INTERPRETED", False)
    model, (x, r) = NormGate().eval(), _inputs(3, 5, 37)
    report = tmp_path / "r.json"
    with torch.no_grad():
        torch.testing.assert_close(_compile(model, report=report)(x, r), model(x, r))
    assert ops_of_last_graph()[FUSED] == 0
    data = json.loads(report.read_text())
    stats = next(p for p in data["graphs"][0]["passes"] if p["name"] == "fuse-pointwise")["stats"]
    assert stats == {"skipped: no Triton kernels on cpu (our ops would run their PyTorch references)": 1}
    torch._dynamo.reset()
    forced = tmp_path / "forced.json"
    with torch.no_grad():
        torch.testing.assert_close(_compile(model, "eager", forced, passes={
            "canonicalize": {}, "fuse-pointwise": {"force": True}, "probe-graph": {}})(x, r), model(x, r))
    data = json.loads(forced.read_text())
    stats = next(p for p in data["graphs"][0]["passes"] if p["name"] == "fuse-pointwise")["stats"]
    assert stats["groups fused"] == 1
