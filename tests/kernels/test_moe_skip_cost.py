"""Dynamic expert skipping in the cost model: a fused experts node carrying the calibrated kept slots per token
(`KEPT_SLOTS_META`) is priced on the distinct experts those slots hit, E·(1 − (1 − k'/E)^T), and k'·T slots of
FLOPs; `fuse-moe` sets it from the calibrated skipped fraction; the compensation op has a registered cost."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.fx.experimental.proxy_tensor import make_fx

import llmcompress.kernels.moe_experts as mx
import llmcompress.kernels.moe_skip_compensation  # noqa: F401  (registers the op)
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel

OP = torch.ops.llmcompress.moe_experts.default


@pytest.mark.parametrize("kept", [2.0, 1.6, 1.0])
def test_cost_counts_the_experts_the_kept_slots_hit(kept):
    e, k, h, i = 8, 2, 64, 32

    def block(x, logits, w_gu, w_d):
        return OP(x, w_gu, w_d, *torch.ops.llmcompress.moe_route(logits, k, "softmax", True, 16, 0.3), 16, 0)

    model = CostModel(HARDWARE["h100-sxm"])
    per_expert = 3 * h * i * 2
    for t in (1, 4, 64):
        args = (torch.randn(t, h).bfloat16(), torch.randn(t, e), torch.randn(e, 2 * i, h).bfloat16(),
                torch.randn(e, h, i).bfloat16())
        gm = make_fx(block, tracing_mode="fake")(*args)
        node = next(n for n in gm.graph.nodes if n.target is OP)
        node.meta[mx.KEPT_SLOTS_META] = kept
        cost = model.node_cost(node)
        hit = e * (1 - (1 - kept / e) ** t)
        assert float(cost.flops) == pytest.approx(6 * t * kept * h * i)
        acts = 2 * t * h * 2 + 2 * t * kept * i * 2 + t * k * 8
        assert float(cost.bytes) == pytest.approx(hit * per_expert + acts)


def test_compensation_cost_is_registered():
    def f(out, w, ids, means):
        return torch.ops.llmcompress.moe_skip_compensate(out, w, ids, means, 0.3)

    t, k, e, h = 5, 2, 8, 64
    gm = make_fx(f, tracing_mode="fake")(torch.randn(t, h), torch.rand(t, k), torch.zeros(t, k, dtype=torch.int32),
                                         torch.randn(e, h))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    cost = CostModel(HARDWARE["h100-sxm"]).node_cost(node)
    assert float(cost.flops) == 2 * t * k * h
    assert float(cost.bytes) == 2 * t * h * 4 + t * k * (4 + 4) + e * h * 4


def test_fuse_moe_prices_the_fused_block_on_the_kept_slots(tmp_path):
    """The fused experts' predicted time with skip_beta is below the same block's without it, and the node carries
    k × (1 − the calibrated skipped fraction)."""
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, intermediate_size=40,
                                        num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    ids = torch.randint(2, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    seen = {}

    def run(fuse, name):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(config).eval().requires_grad_(False)
        with torch.no_grad():
            model.model.layers[0].mlp.gate.weight.mul_(30)
        options = {"lowering": "eager", "strict": True, "report": str(tmp_path / name), "calibration": ids,
                   "calibration_samples": 1, "calibration_seq_len": 9,
                   "passes": {"canonicalize": {}, "fuse-moe": {"objective": "always", **fuse}}}
        with torch.no_grad():
            torch.compile(model, backend="llmcompress", options=options)(ids)
        graphs = json.loads((tmp_path / name).read_text())["graphs"]
        record = next(p for g in graphs for p in g["passes"] if p["name"] == "fuse-moe")
        return record["decisions"][0]["moe"]

    seen["dense"] = run({}, "a.json")
    seen["skip"] = run({"skip_beta": 0.5, "skip_compensate": False}, "b.json")
    skipped = seen["skip"]["skip"]["skipped_fraction"]
    assert 0 < skipped < 1
    assert seen["skip"]["predicted"]["fused_s"] < seen["dense"]["predicted"]["fused_s"]
