"""Roofline counts worked out by hand, symbolic vs concrete, and whole-model FLOPs."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import llmcompress.kernels  # noqa: F401 - registers llmcompress ops and their costs
from llmcompress.cost.hardware import HARDWARE
from llmcompress.cost.roofline import CostModel, io_bytes, numel, register_cost

H100 = HARDWARE["h100-sxm"]
aten = torch.ops.aten


def _graph(fn, *inputs, mode="fake"):
    return make_fx(fn, tracing_mode=mode)(*inputs)


def _single(target, *inputs, **kwargs):
    """A one-op graph (make_fx would decompose CompositeImplicit ops such as aten.linear)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode, graph = FakeTensorMode(), torch.fx.Graph()
    args = []
    for i, t in enumerate(inputs):
        ph = graph.placeholder(f"in{i}")
        ph.meta["val"] = mode.from_tensor(t)
        args.append(ph)
    node = graph.call_function(target, tuple(args), kwargs)
    with mode:
        node.meta["val"] = target(*[a.meta["val"] for a in args], **kwargs)
    graph.output(node)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _only(gm, target):
    nodes = [n for n in gm.graph.nodes if n.target == target]
    assert len(nodes) == 1, [n.target for n in gm.graph.nodes]
    return nodes[0]


def test_bf16_gemv_4096_by_hand():
    x, w = torch.randn(1, 4096, dtype=torch.bfloat16), torch.randn(4096, 4096, dtype=torch.bfloat16)
    gm = _single(aten.linear.default, x, w)
    cost = CostModel(H100).node_cost(_only(gm, aten.linear.default))
    assert cost.flops == 2 * 4096 * 4096  # 33,554,432
    assert cost.bytes == 4096 * 2 + 4096 * 4096 * 2 + 4096 * 2  # x, W (bf16), out: 33,570,816
    expected = max(33_554_432 / 989e12, 33_570_816 / 3.35e12) + 4e-6  # memory bound: 10.02 us + launch
    assert float(cost.time_s) == pytest.approx(expected)
    assert cost.bound() == "memory"
    assert float(cost.intensity) == pytest.approx(33_554_432 / 33_570_816)


def test_large_gemm_is_compute_bound():
    x, w = torch.randn(4096, 4096, dtype=torch.bfloat16), torch.randn(4096, 4096, dtype=torch.bfloat16)
    cost = CostModel(H100).node_cost(_only(_single(aten.linear.default, x, w), aten.linear.default))
    assert cost.flops == 2 * 4096**3
    assert cost.bound() == "compute"
    assert float(cost.compute_time_s) == pytest.approx(2 * 4096**3 / 989e12)


@pytest.mark.parametrize("fn, target, flops, nbytes", [
    (lambda a, b: torch.mm(a, b), aten.mm.default, 2 * 8 * 16 * 32, (8 * 16 + 16 * 32 + 8 * 32) * 4),
    (lambda a, b: torch.addmm(torch.ones(32), a, b), aten.addmm.default, 2 * 8 * 16 * 32 + 8 * 32,
     (32 + 8 * 16 + 16 * 32 + 8 * 32) * 4),
])
def test_matmul_family(fn, target, flops, nbytes):
    a, b = torch.randn(8, 16), torch.randn(16, 32)
    cost = CostModel(H100).node_cost(_only(_graph(fn, a, b), target))
    assert (cost.flops, cost.bytes) == (flops, nbytes)


def test_batched_matmul():
    a, b = torch.randn(3, 5, 7, dtype=torch.float16), torch.randn(3, 7, 11, dtype=torch.float16)
    cost = CostModel(H100).node_cost(_only(_graph(torch.bmm, a, b), aten.bmm.default))
    assert cost.flops == 2 * 3 * 5 * 7 * 11
    assert cost.bytes == (3 * 5 * 7 + 3 * 7 * 11 + 3 * 5 * 11) * 2


def test_causal_attention():
    q = torch.randn(1, 32, 512, 128, dtype=torch.bfloat16)
    gm = _graph(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, q.clone(), q.clone())
    node = next(n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
    cost = CostModel(H100).node_cost(node)
    assert cost.kind == "attention"
    assert cost.flops == 4 * 32 * 512 * 512 * 128 // 2
    assert cost.bytes >= 4 * 32 * 512 * 128 * 2  # q, k, v read and the output written (+ any logsumexp)


def test_broadcast_add_reads_stored_elements_only():
    gm = _graph(lambda a, b: a + b, torch.randn(4, 8), torch.randn(8))
    cost = CostModel(H100).node_cost(_only(gm, aten.add.Tensor))
    assert cost.kind == "pointwise" and cost.flops == 32
    assert cost.bytes == (32 + 8 + 32) * 4


def test_views_are_free():
    gm = _graph(lambda a: a.view(8, 4).t(), torch.randn(4, 8))
    costs = CostModel(H100).estimate(gm)
    assert all(c.kind == "free" and c.time_s == 0 for c in costs.nodes)
    assert costs.summary()["kernels"] == 0


def test_norm_reduction_and_embedding():
    w = torch.randn(100, 16)
    gm = _graph(lambda ids, w: F.embedding(ids, w).pow(2).mean(-1), torch.randint(0, 100, (2, 5)), w)
    model = CostModel(H100)
    emb = model.node_cost(_only(gm, aten.embedding.default))
    assert emb.flops == 0 and emb.kind == "data"
    assert emb.bytes == 10 * 8 + 2 * 10 * 16 * 4  # the ids, the 10 rows read from the table and written out
    mean = model.node_cost(_only(gm, aten.mean.dim))
    assert mean.kind == "reduction" and mean.flops == 10 * 16 and mean.bytes == (10 * 16 + 10) * 4


def test_custom_op_cost_is_declared_next_to_the_op():
    x, w = torch.randn(3, 384, dtype=torch.bfloat16), torch.randn(384, dtype=torch.bfloat16)
    gm = _graph(lambda x, w: torch.ops.llmcompress.rms_norm(x, w, 1e-6), x, w)
    cost = CostModel(H100).node_cost(_only(gm, torch.ops.llmcompress.rms_norm.default))
    assert cost.kind == "custom"
    assert cost.flops == 4 * 3 * 384 and cost.bytes == (3 * 384 + 384 + 3 * 384) * 2


@torch.library.custom_op("llmcompress_test::int4_linear", mutates_args=())
def _int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], packed.shape[0])


@_int4_linear.register_fake
def _(x, packed, scales):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@register_cost(torch.ops.llmcompress_test.int4_linear.default)
def _int4_cost(node):
    x, packed = node.args[0].meta["val"], node.args[1].meta["val"]
    n, k = packed.shape[0], packed.shape[1] * 2
    return 2 * numel(x) / x.shape[-1] * n * k, io_bytes(node)


def test_quantized_custom_op_counts_packed_bytes():
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    packed = torch.zeros(4096, 2048, dtype=torch.uint8)  # two int4 per byte
    scales = torch.ones(4096, 32, dtype=torch.bfloat16)  # group size 128
    gm = _graph(lambda x, p, s: torch.ops.llmcompress_test.int4_linear(x, p, s), x, packed, scales)
    cost = CostModel(H100).node_cost(_only(gm, torch.ops.llmcompress_test.int4_linear.default))
    assert cost.flops == 2 * 4096 * 4096
    assert cost.bytes == 4096 * 2 + 4096 * 2048 + 4096 * 32 * 2 + 4096 * 2  # a quarter of the bf16 GEMV's bytes


def test_symbolic_costs_equal_concrete_ones():
    def fn(x, w):
        return F.silu(aten.linear.default(x, w)).sum(-1)

    w = torch.randn(24, 16)
    sym_gm = _graph(fn, torch.randn(3, 5, 16), w, mode="symbolic")
    model = CostModel(H100)
    symbolic = model.estimate(sym_gm)
    symbols = sorted(symbolic.symbols())
    assert len(symbols) >= 2
    for b, s in ((2, 7), (9, 33)):
        concrete = model.estimate(_graph(fn, torch.randn(b, s, 16), w)).summary()
        sizes = {}
        for ph, real in zip((n for n in sym_gm.graph.nodes if n.op == "placeholder"), (torch.empty(b, s, 16), w)):
            sizes.update({d.node.expr: v for d, v in zip(ph.meta["val"].shape, real.shape)
                          if isinstance(d, torch.SymInt)})
        got = symbolic.summary(sizes)
        assert got["flops"] == concrete["flops"] and got["bytes"] == concrete["bytes"]
        assert got["time_s"] == pytest.approx(concrete["time_s"])


def test_model_linear_flops_are_two_params_per_token():
    from llmcompress.report.trace import trace_model
    from llmcompress.testing.models import tiny_model

    model = tiny_model("llama")
    (graph,) = trace_model(model, torch.zeros(3, 10, dtype=torch.long), passes=["canonicalize"])
    linear_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    costs = CostModel(H100).estimate(graph.after, graph.sizes)
    linear_flops = sum(c.flops for c in costs.nodes if c.op == "aten.linear.default")
    assert linear_flops == 2 * linear_params * 3 * 10
    assert set(graph.names.values()) == {"batch", "seq"}
    tensors = list(model.parameters()) + [model.model.rotary_emb.inv_freq]  # what the graph reads
    assert graph.weight_bytes == sum(t.numel() * t.element_size() for t in tensors)
    # the same symbolic graph evaluated at another size
    sym = {s: v for s, v in graph.sizes.items()}
    for s in graph.sizes:
        if graph.names.get(str(s)) == "seq":
            sym[s] = 20
    assert sum(c.flops for c in CostModel(H100).estimate(graph.after, sym).nodes
               if c.op == "aten.linear.default") == 2 * linear_params * 3 * 20


def test_compare_before_and_after():
    x, w = torch.randn(1, 4096, dtype=torch.bfloat16), torch.randn(4096, 4096, dtype=torch.bfloat16)
    dense = _single(aten.linear.default, x, w)
    packed, scales = torch.zeros(4096, 2048, dtype=torch.uint8), torch.ones(4096, 32, dtype=torch.bfloat16)
    quant = _graph(lambda x, p, s: torch.ops.llmcompress_test.int4_linear(x, p, s), x, packed, scales)
    result = CostModel(H100).compare(dense, quant)
    assert result["faster"] and result["speedup"] > 1.5


def test_unresolved_symbols_are_a_clear_error():
    gm = _graph(lambda x: x * 2, torch.randn(3, 5), mode="symbolic")
    with pytest.raises(ValueError, match="depends on .*give their sizes"):
        CostModel(H100).estimate(gm).summary()
    assert isinstance(sympy.sympify(CostModel(H100).estimate(gm).nodes[0].flops), sympy.Expr)


def test_passes_read_the_cost_model_through_the_context(tmp_path):
    """A pass asks ctx.cost_model at ctx.sizes; the compile report carries predictions before and after passes."""
    import json
    from typing import ClassVar

    from llmcompress import Pass, PassResult, register_pass
    from llmcompress.passes.registry import unregister_pass

    seen = []

    @register_pass
    class AskCostModel(Pass):
        name: ClassVar[str] = "t-ask-cost"
        description: ClassVar[str] = "test: cost every linear"
        after: ClassVar[tuple[str, ...]] = ("canonicalize",)

        def run(self, gm, ctx):
            for n in gm.graph.nodes:
                if n.target is aten.linear.default:
                    cost = ctx.cost_model.estimate(n, ctx.sizes)
                    seen.append((cost.flops, cost.bytes))
            return PassResult(False, decisions=[{"flops": f, "bytes": b} for f, b in seen])

    try:
        report = tmp_path / "r.json"
        compiled = torch.compile(torch.nn.Linear(16, 8, bias=False), backend="llmcompress",
                                 options={"passes": ["canonicalize", "t-ask-cost"], "lowering": "eager",
                                          "hardware": "h100-sxm", "report": str(report)})
        with torch.no_grad():
            compiled(torch.randn(3, 16))
    finally:
        unregister_pass("t-ask-cost")
    assert seen == [(2 * 3 * 16 * 8, (3 * 16 + 16 * 8 + 3 * 8) * 4)]
    graph = json.loads(report.read_text())["graphs"][0]
    assert graph["predicted_before"]["hardware"] == "h100-sxm"
    assert graph["predicted_after"]["flops"] == 2 * 3 * 16 * 8


def test_cache_update_moves_the_new_slot_only():
    cache, new, pos = torch.randn(1, 4, 512, 64), torch.randn(1, 4, 1, 64), torch.tensor([7])

    def update(cache, new, pos):
        return cache.index_copy_(2, pos, new)

    from torch._functorch.aot_autograd import aot_function

    graphs = []
    aot_function(update, fw_compiler=lambda gm, _: graphs.append(gm) or gm, keep_inference_input_mutations=True)(
        cache.clone(), new, pos)
    costs = CostModel(H100).estimate(graphs[0])
    moved = costs.summary()["bytes"]
    assert moved == 2 * new.numel() * 4 + 8, "read and write the new slot, read the index; not the 512-slot cache"


def test_decode_trace_on_meta_prices_weights_and_kv_cache():
    """A decode step traced on the meta device: bytes ~ weights read once + the KV cache attention reads."""
    import transformers

    from llmcompress.report.trace import trace_model

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    (graph,) = trace_model(model, torch.zeros(1, 1, dtype=torch.long, device="meta"), passes=["canonicalize"],
                           kv_len=512)
    costs = CostModel(H100).estimate(graph.after, graph.sizes)
    attention = [c for c in costs.nodes if c.kind == "attention"]
    assert len(attention) == 2
    kv_bytes = 2 * 2 * 512 * 256 * 2  # layers x (k, v) x slots x hidden x bf16
    total = costs.summary()["bytes"]
    weights_read = graph.weight_bytes - 1000 * 256 * 2 + 256 * 2  # the embedding reads one row of its table
    assert weights_read + kv_bytes <= total <= 1.05 * (weights_read + kv_bytes)


def test_group_cost_reads_inputs_once_and_writes_only_escaping_values():
    # y = (a * w + a).sigmoid(): three pointwise nodes; fused, a (4x8) and w (8) are read once, y written once.
    gm = _graph(lambda a, w: (a * w + a).sigmoid(), torch.randn(4, 8), torch.randn(8))
    model = CostModel(H100)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(nodes) == 3
    fused = model.group_cost(nodes, {})
    assert fused.flops == 3 * 32
    assert fused.bytes == (32 + 8 + 32) * 4
    assert fused.time_s == pytest.approx(max(fused.compute_time_s, fused.memory_time_s) + H100.launch_overhead_s)
    separate = model.estimate(nodes, {})
    assert separate.total("time_s") > fused.time_s  # three launches and two round trips of the intermediates
    # A member whose value is used outside the group is written too.
    head = model.group_cost(nodes[:2], {})
    assert head.bytes == (32 + 8 + 32) * 4
